"""GPU benchmarks for people who live in pytest: the registry's ``quick`` problems, every
implementation, through pytest-benchmark.

    pytest --benchmark-enable --benchmark-only tests/profiling     # (pyproject's addopts disable benchmarks)

Each test times the implementation twice: pytest-benchmark's own statistics over calls that
end in ``torch.cuda.synchronize()`` (GPU-synchronised wall clock, launch overhead included),
and the harness's CUDA-event timer (``moela.profiling.timing.time_cuda``), whose median,
TFLOP/s and GB/s go into ``extra_info`` (``--benchmark-json`` saves them). Outputs of
implementations of the same function are checked against the op's reference. Without
benchmarks enabled (the default) each case runs once as a GPU smoke test. Skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch

from moela.profiling import Unavailable, all_ops
from moela.profiling.runner import derive
from moela.profiling.timing import time_cuda

pytestmark = pytest.mark.gpu

CASES = [
    pytest.param(op.name, p, impl.name, id=f"{op.name}-{p.name}-{impl.name}".replace(" ", "_"))
    for op in all_ops().values() for p in op.problems("quick") for impl in op.impls()
]


_LAST: dict[str, tuple] = {}  # the inputs and truth of the last problem: its impls run one after another


def _case_and_truth(op, problem):
    if problem.key not in _LAST:
        _LAST.clear()
        torch.cuda.empty_cache()
        case = op.make_case(problem, torch.device("cuda"), seed=0)
        try:
            truth = op.impl(op.truth).prepare(case)()
        except Unavailable:
            truth = None
        _LAST[problem.key] = (case, truth)
    return _LAST[problem.key]


@pytest.mark.parametrize(("op_name", "problem", "impl_name"), CASES)
def test_benchmark(benchmark, op_name, problem, impl_name):
    op = all_ops()[op_name]
    impl = op.impl(impl_name)
    case, truth = _case_and_truth(op, problem)
    try:
        fn = impl.prepare(case)
    except Unavailable as e:
        pytest.skip(str(e))
    benchmark.group = f"{op_name}: {problem.name}"
    out = fn()
    torch.cuda.synchronize()
    if impl.same_function and impl.name != op.truth and truth is not None:
        check = op.compare(out, truth)
        assert check.ok, f"{impl_name} differs from {op.truth}: {check}"
    if benchmark.disabled:
        return

    timing, _ = time_cuda([fn])
    row = {"flops": case.flops, "bytes": case.bytes, "median_ms": timing.median_ms}
    derive(row, {}, op.compute)
    benchmark.extra_info.update(impl=impl_name, kind=impl.kind, cuda_median_ms=timing.median_ms,
                                cuda_p20_ms=timing.p20_ms, cuda_p80_ms=timing.p80_ms, tflops=row.get("tflops"),
                                gbps=row.get("gbps"), flops=case.flops, bytes=case.bytes)

    def synchronized():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(synchronized, rounds=20, warmup_rounds=3, iterations=1)
