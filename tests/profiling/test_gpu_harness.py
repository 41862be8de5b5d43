"""The harness itself on a GPU: CUDA-event timer, ceilings, one benchmark row (skipped on CPU)."""

from __future__ import annotations

import pytest
import torch

from moela.profiling import get_op
from moela.profiling.ceilings import measure_ceilings
from moela.profiling.registry import make_plan
from moela.profiling.runner import BenchSettings, _graph_timing, run_bench
from moela.profiling.timing import l2_bytes, time_cuda, time_cuda_graphs

pytestmark = pytest.mark.gpu


def test_cuda_timer_statistics_and_modes():
    x = torch.randn(1 << 24, device="cuda")  # 64 MiB
    y = torch.empty_like(x)
    timing, first = time_cuda([lambda: y.copy_(x)], rep_ms=5, min_reps=5)
    assert first is y and timing.method == "cuda-events" and timing.reps >= 5
    assert 0 < timing.min_ms <= timing.p20_ms <= timing.median_ms <= timing.p80_ms <= timing.max_ms
    flush = torch.empty(2 * l2_bytes(torch.device("cuda")), dtype=torch.int8, device="cuda")
    flushed, _ = time_cuda([lambda: y.copy_(x)], rep_ms=5, flush=flush)
    assert flushed.l2_flush and flushed.median_ms > 0
    rotated, _ = time_cuda([lambda: y.copy_(x), lambda: x.copy_(y)], rep_ms=5)
    assert rotated.rotation == 2
    calls = []
    slow, _ = time_cuda([lambda: calls.append(y.copy_(x))], rep_ms=0.001, warmup_ms=0.001, min_reps=1,
                        estimate_from_first=True)
    assert slow.reps == 1 and len(calls) == 2  # the first call sized the repetitions


def test_ceilings_are_measured():
    c = measure_ceilings(torch.device("cuda"), quick=True)
    assert c["copy"]["unit"] == "GB/s" and c["copy"]["value"] > 100
    assert c["matmul_bf16"]["unit"] == "TFLOP/s" and c["matmul_bf16"]["value"] > 1
    assert "value" in c["matmul_fp8"] or "skipped" in c["matmul_fp8"]


def test_one_benchmark_problem_on_cuda():
    plan = make_plan([get_op("grouped_gemm")], ["tiny"])[:1]
    s = BenchSettings(torch.device("cuda"), impls=["reference", "torch"], rep_ms=5, progress=False)
    rows = run_bench(plan, measure_ceilings(torch.device("cuda"), quick=True), s)
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["impl"] for r in ok} >= {"reference", "torch loop"}
    assert all(r["method"] == "cuda-events" and r["tflops"] > 0 and r["frac_roofline"] > 0 for r in ok)
    assert all(r["check"]["ok"] for r in ok if r["same_function"] and r["impl"] != "reference")


def test_cuda_graph_replays_and_uncapturable_calls():
    x = torch.randn(1 << 12, device="cuda")
    y = torch.empty_like(x)
    t = time_cuda_graphs([lambda: y.copy_(x)], rep_ms=5)
    assert t.method == "cuda-graph replay" and t.reps >= 3 and t.median_ms > 0
    x.fill_(3.0)
    t = time_cuda_graphs([lambda: y.copy_(x * 2)], rep_ms=1)  # replays run on the current data
    assert torch.equal(y, torch.full_like(y, 6.0))
    bad = _graph_timing([lambda: float(x.sum())], {"warmup_ms": 1, "rep_ms": 1}, None)  # a host sync
    assert set(bad) == {"reason"} and bad["reason"]
    torch.cuda.synchronize()
    assert float((x + 1).sum()) == 4.0 * x.numel()  # the device is still usable


def test_bench_graphs_times_small_rows():
    plan = make_plan([get_op("route")], ["tiny"])[:1]
    s = BenchSettings(torch.device("cuda"), impls=["moela", "torch"], rep_ms=5, progress=False, graphs=True,
                      telemetry=False)
    rows = [r for r in run_bench(plan, {}, s) if r["status"] == "ok"]
    assert rows and all("graph" in r for r in rows)
    assert any("median_ms" in r["graph"] for r in rows)
