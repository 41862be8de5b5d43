"""``triton.testing.perf_report`` sweeps built from the op registry, for kernel engineers to copy
and edit (``profiling/examples/perf_report_*.py`` are the starting points, one per family).

One generic builder makes a perf_report benchmark of any registered op over one of its shape
sets: x is the set's problems (by name), one line per implementation (the moela kernel, the
reference, the baselines), y the metric: ``"ms"``, ``"TFLOP/s"`` or ``"GB/s"`` (the op's counted
FLOPs and fewest bytes over the time)::

    from moela.profiling.perf_reports import perf_report_for, run
    bench = perf_report_for("grouped_gemm", "v3-decode", ["moela", "torch grouped_mm"], "TFLOP/s")
    run(bench, save_path="plots")          # prints the table; the plot and CSV go to plots/

On a GPU each point is ``triton.testing.do_bench`` (median, with the 20th/80th percentiles as
the band). Without one only the ``tiny`` set runs (another set is refused with a message): the
moela kernels go through the Triton interpreter and every point is CPU wall clock, which shows
that the sweep works and says nothing about GPU speed. An implementation that cannot run on a
problem (:class:`~moela.profiling.registry.Unavailable`) is a NaN point with its reason printed.
triton prints and plots with pandas and matplotlib; without pandas :func:`run` prints the same
table itself.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["METRICS", "device_and_set", "benchmark", "measure", "perf_report_for", "run"]

METRICS = ("ms", "TFLOP/s", "GB/s")
_SLUG = {"ms": "ms", "TFLOP/s": "tflops", "GB/s": "gbps"}


def device_and_set(gpu_set: str, device: str | torch.device | None = None) -> tuple[torch.device, str]:
    """The device to run on (CUDA when there is one) and the shape set for it: ``gpu_set`` on a
    GPU, ``tiny`` on a CPU, where the Triton interpreter is turned on. Call it before triton is
    imported (the interpreter is chosen when triton's functions are defined): a triton imported
    without the interpreter is a :class:`RuntimeError` on a CPU."""
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        return dev, gpu_set
    if os.environ.get("TRITON_INTERPRET") != "1" and "triton.language" in sys.modules:
        raise RuntimeError("triton was imported without TRITON_INTERPRET=1, so its kernels cannot run on a CPU: call "
                           "device_and_set() before importing triton (or set TRITON_INTERPRET=1 in the shell)")
    os.environ["TRITON_INTERPRET"] = "1"
    return dev, "tiny"


def _check(op_name: str, set_name: str, impls: Sequence[str] | None, metric: str, device: torch.device):
    from .registry import get_op

    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {METRICS}, got {metric!r}")
    op = get_op(op_name)
    if set_name not in op.shape_sets:
        raise ValueError(f"op {op_name!r} has no shape set {set_name!r}; it has {', '.join(op.shape_sets)}")
    if device.type != "cuda" and set_name != "tiny":
        raise ValueError(f"shape set {set_name!r} is DeepSeek-sized: without a GPU only 'tiny' runs (through the "
                         "Triton interpreter)")
    names = [i.name for i in op.impls()]
    wanted = names if impls is None else list(impls)
    unknown = [n for n in wanted if n not in names]
    if unknown:
        raise ValueError(f"op {op_name!r} has no implementation(s) {unknown}; it has {names}")
    return op, wanted


def benchmark(op_name: str, set_name: str, impls: Sequence[str] | None = None, metric: str = "ms",
              device: torch.device | None = None):
    """A ``triton.testing.Benchmark``: x ``problem`` (the set's problem names), line ``impl``."""
    import triton.testing

    dev = device if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    op, names = _check(op_name, set_name, impls, metric, dev)
    return triton.testing.Benchmark(
        x_names=["problem"], x_vals=[p.name for p in op.problems(set_name)], line_arg="impl", line_vals=names,
        line_names=names, plot_name=f"{op_name}-{set_name}-{_SLUG[metric]}", args={},
        xlabel=f"{op_name} problem ({set_name})", ylabel=metric)


_CASES: dict[tuple[str, str, str, str], Any] = {}  # (op, set, problem, device) -> Case: inputs built once


def measure(op_name: str, set_name: str, problem: str, impl: str, device: torch.device, metric: str = "ms",
            seed: int = 0) -> tuple[float, float, float]:
    """``(median, low, high)`` of ``impl`` on one problem in ``metric`` (low/high: the 20th/80th
    percentile times, turned into the metric). NaN where the implementation cannot run here."""
    from .registry import Unavailable, get_op
    from .timing import time_cpu

    op = get_op(op_name)
    key = (op_name, set_name, problem, str(device))
    if key not in _CASES:
        p = next(p for p in op.problems(set_name) if p.name == problem)
        _CASES[key] = op.make_case(p, device, seed)
    case = _CASES[key]
    try:
        fn = op.impl(impl).prepare(case)
    except Unavailable as e:
        print(f"  {op_name} / {impl} / {problem}: skipped: {e}", file=sys.stderr)
        return math.nan, math.nan, math.nan
    if device.type == "cuda":
        import triton.testing

        ms, lo, hi = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
    else:
        t, _ = time_cpu([fn], rep_ms=50.0, min_reps=1, max_reps=5, interpreter=op.impl(impl).kind == "moela")
        ms, lo, hi = t.median_ms, t.p20_ms, t.p80_ms
    if metric == "ms":
        return ms, lo, hi
    amount = case.flops / 1e12 if metric == "TFLOP/s" else case.bytes / 1e9
    rate = lambda t: amount / (t * 1e-3) if amount else math.nan  # noqa: E731
    return rate(ms), rate(hi), rate(lo)  # a longer time is a lower rate


def perf_report_for(op_name: str, set_name: str, impls: Sequence[str] | None = None, metric: str = "ms",
                    device: str | torch.device | None = None):
    """A ``triton.testing.perf_report``-decorated sweep of any registered op (see the module doc);
    on a CPU ``set_name`` must be ``tiny``."""
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type != "cuda":
        device_and_set(set_name, dev)  # the interpreter on, before triton is imported
    import triton.testing

    @triton.testing.perf_report(benchmark(op_name, set_name, impls, metric, dev))
    def sweep(problem: str, impl: str) -> tuple[float, float, float]:
        return measure(op_name, set_name, problem, impl, dev, metric)

    return sweep


def run(mark, save_path: str = "", print_data: bool = True) -> list[list[Any]]:
    """Run a perf_report sweep: triton's ``mark.run`` (table, and plot + CSV in ``save_path``) where
    pandas is installed, else the same points printed as a plain table. Returns the rows
    ``[x, y of each line...]`` of every benchmark."""
    import importlib.util

    benches = mark.benchmarks if isinstance(mark.benchmarks, list) else [mark.benchmarks]
    if importlib.util.find_spec("pandas") is not None:
        dfs = mark.run(print_data=print_data, save_path=save_path, return_df=True)
        dfs = dfs if isinstance(dfs, list) else [dfs]
        return [row for df in dfs for row in df.values.tolist()]
    print("(pandas is not installed: triton's perf_report table and plot need it; the same points, printed here)")
    out: list[list[Any]] = []
    for bench in benches:
        rows = []
        for x in bench.x_vals:
            args = dict(zip(bench.x_names, x if isinstance(x, (list, tuple)) else [x] * len(bench.x_names),
                            strict=True))
            ys = [mark.fn(**args, **{bench.line_arg: y}, **bench.args)[0] for y in bench.line_vals]
            rows.append([x, *ys])
        if print_data:
            _print_table(bench, rows)
        out += rows
    return out


def _print_table(bench, rows: list[list[Any]]) -> None:
    width = max(len(str(r[0])) for r in rows) + 2
    cols = [max(12, len(n) + 2) for n in bench.line_names]
    print(f"{bench.plot_name} ({bench.ylabel}):")
    print(f"{'':<{width}}" + "".join(f"{n:>{w}}" for n, w in zip(bench.line_names, cols, strict=True)))
    for x, *ys in rows:
        print(f"{x!s:<{width}}" + "".join(f"{y:>{w}.4g}" for y, w in zip(ys, cols, strict=True)))


def main(sweep_of: Callable[[], Any], argv: Sequence[str] | None = None) -> int:
    """The examples' command line: ``--save DIR`` (plot and CSV, needs pandas)."""
    import argparse

    parser = argparse.ArgumentParser(description="run a triton.testing.perf_report sweep")
    parser.add_argument("--save", default="", metavar="DIR", help="folder for triton's plot and CSV")
    args = parser.parse_args(argv)
    sweep = sweep_of()
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("no GPU: the tiny set, CPU wall clock, moela's kernels through the Triton interpreter (this shows that "
              "the sweep runs, nothing about GPU speed)")
    run(sweep, save_path=args.save)
    return 0
