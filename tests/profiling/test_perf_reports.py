"""profiling.perf_reports and the example scripts: triton.testing.perf_report sweeps built from the
op registry construct and run (tiny, through the interpreter, without a GPU) and refuse what
cannot run here with a message."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import triton.testing

from moela.profiling import get_op
from moela.profiling.perf_reports import perf_report_for, run

GPU = torch.cuda.is_available()


@pytest.mark.parametrize(("module", "op"), [("perf_report_moe", "grouped_gemm"), ("perf_report_fp8", "fp8_gemm"),
                                            ("perf_report_mla", "mla_decode")])
def test_example_builds_and_runs(module, op, capsys):
    mod = importlib.import_module(f"moela.profiling.examples.{module}")
    assert mod.OP == op
    mark = mod.sweep()
    assert isinstance(mark, triton.testing.Mark) and isinstance(mark.benchmarks, triton.testing.Benchmark)
    bench = mark.benchmarks
    shape_set = mod.GPU_SET if GPU else "tiny"
    assert bench.x_vals == [p.name for p in get_op(op).problems(shape_set)]
    assert bench.ylabel == mod.METRIC and bench.line_vals[0] == "moela"
    if GPU:
        pytest.skip("the GPU sets are DeepSeek-sized: the tiny sweep below is the CPU check")
    rows = run(mark, print_data=True)
    assert [r[0] for r in rows] == bench.x_vals
    moela = [r[1] for r in rows]
    assert all(v > 0 and math.isfinite(v) for v in moela), rows  # the kernel ran on every problem
    out = capsys.readouterr().out
    assert bench.plot_name in out and "moela" in out


@pytest.mark.skipif(GPU, reason="the refusals are those of a machine without a GPU")
def test_generic_builder_and_refusals():
    mark = perf_report_for("quant_act", "tiny", ["moela", "reference"], "GB/s")
    rows = run(mark, print_data=False)
    assert len(rows) == len(get_op("quant_act").problems("tiny")) and all(len(r) == 3 for r in rows)
    assert all(v > 0 for r in rows for v in r[1:])
    with pytest.raises(ValueError, match="DeepSeek-sized: without a GPU only 'tiny' runs"):
        perf_report_for("grouped_gemm", "v3-decode")
    with pytest.raises(ValueError, match="metric: expected one of"):
        perf_report_for("grouped_gemm", "tiny", metric="flops")
    with pytest.raises(ValueError, match="has no implementation"):
        perf_report_for("grouped_gemm", "tiny", ["nope"])
    with pytest.raises(ValueError, match="has no shape set 'nope'"):
        perf_report_for("grouped_gemm", "nope")


@pytest.mark.skipif(GPU, reason="CPU: a baseline that needs a GPU")
def test_unavailable_implementation_is_a_nan_point_with_its_reason(capsys):
    rows = run(perf_report_for("fp8_gemm", "tiny", ["torch scaled_mm blockwise"], "ms"), print_data=False)
    assert all(math.isnan(r[1]) for r in rows)
    assert "skipped: cuBLAS block-wise FP8" in capsys.readouterr().err
