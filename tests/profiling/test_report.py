"""Result files and reports: JSON + CSV saved with the environment, markdown and PNGs from one
or two saved runs."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from moela.profiling import get_op
from moela.profiling.environment import collect_environment
from moela.profiling.registry import make_plan
from moela.profiling.report import write_report
from moela.profiling.results import SCHEMA, load_results, save_results
from moela.profiling.runner import BenchSettings, run_bench

PNG = b"\x89PNG\r\n\x1a\n"
CEILINGS = {"copy": {"value": 20.0, "unit": "GB/s", "median_ms": 1.0, "what": "copy"},
            "matmul_fp32": {"value": 0.2, "unit": "TFLOP/s", "median_ms": 1.0, "what": "matmul"},
            "matmul_fp8": {"skipped": "FP8 needs sm_89 or newer"}}


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A real (tiny, CPU) benchmark of two ops, saved, plus a synthetic second run."""
    plan = make_plan([get_op("grouped_gemm"), get_op("quant_act")], ["tiny"])
    rows = run_bench(plan, CEILINGS, BenchSettings(torch.device("cpu"), impls=["reference", "torch"], rep_ms=1,
                                                   progress=False))
    env = collect_environment()
    out = tmp_path_factory.mktemp("results")
    a = save_results({"kind": "bench", "environment": env, "ceilings": CEILINGS, "rows": rows,
                      "stats": {"problems_run": len(plan)}}, out, "a")
    faster = [{**r, "median_ms": r["median_ms"] / 2} if r.get("median_ms") else r for r in rows]
    faster[0] = {**faster[0], "check": {"metric": "calc_diff", "value": 0.5, "tol": 1e-5, "ok": False, "detail": ""}}
    telemetry = {"samples": 3, "sm_clock_mhz_min": 1500, "sm_clock_mhz_max": 1980, "mem_clock_mhz": 3201,
                 "power_w_max": 690.0, "temperature_c_max": 70, "memory_used_gib_max": 10.0, "throttled": True,
                 "throttle_reasons": ["SwPowerCap"]}
    faster[1] = {**faster[1], "telemetry": telemetry}
    faster[2] = {**faster[2], "graph": {"median_ms": 0.0042, "p20_ms": 0.004, "p80_ms": 0.0044, "reps": 40}}
    stats = {"problems_run": len(plan), "seconds_by_op": {"grouped_gemm": 12.3, "quant_act": 1.0},
             "graph_not_capturable": {"quant_act / reference": "RuntimeError: capture invalidated"}}
    b = save_results({"kind": "bench", "environment": {**env, "device": "NVIDIA H200"}, "ceilings": CEILINGS,
                      "rows": faster, "stats": stats}, out, "b")
    return rows, a, b


def test_saved_json_and_csv(saved_run):
    rows, (a_json, a_csv), _ = saved_run
    data = load_results(a_json)
    assert data["schema"] == SCHEMA and data["environment"]["torch"] == torch.__version__
    assert len(data["rows"]) == len(rows)
    ok = [r for r in data["rows"] if r["status"] == "ok"]
    assert ok and all(r["median_ms"] > 0 and r["method"] == "cpu-wall" for r in ok)
    gg = [r for r in ok if r["op"] == "grouped_gemm" and r["impl"] == "torch grouped_mm"]
    assert gg and all(r["check"]["ok"] for r in gg) and all(r["speedup"] == 1.0 for r in gg)
    with a_csv.open() as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == len(rows)
    assert {"device", "driver", "torch", "triton", "git_ref", "date", "median_ms", "tflops"} <= set(lines[0])
    assert lines[0]["torch"] == torch.__version__


def test_report_of_one_run(saved_run, tmp_path):
    _, (a_json, _), _ = saved_run
    md, pngs = write_report([a_json], tmp_path)
    text = md.read_text()
    assert "## grouped_gemm" in text and "## quant_act" in text and "matmul_fp32" in text
    assert "CPU wall-clock" in text and "skipped" in text
    names = {p.name for p in pngs}
    assert {"throughput-grouped_gemm.png", "throughput-quant_act.png", "roofline.png", "bandwidth.png"} <= names
    for p in pngs:
        assert p.read_bytes()[:8] == PNG and f"]({p.name})" in text


def test_report_of_two_runs_side_by_side(saved_run, tmp_path):
    _, (a_json, _), (b_json, _) = saved_run
    md, _ = write_report([a_json, b_json], tmp_path, plots=False)
    text = md.read_text()
    assert "A: a" in text and "B: b" in text and "NVIDIA H200" in text
    assert "(×2.00)" in text  # B took half the time
    assert "check failed" in text and "throttled during 1 of 1" in text and "SwPowerCap" in text
    assert "graph 4.2 µs" in text  # B's third row: its CUDA-graph replay time
    assert "wall time by op (inputs, compiling, tuning, timing, checks): grouped_gemm 12 s, quant_act 1 s" in text
    assert "CUDA graph replay not timed for quant_act / reference: RuntimeError: capture invalidated" in text
    md, pngs = write_report([a_json, b_json], tmp_path / "qa", ops=["quant_act"])
    assert "## quant_act" in md.read_text() and "## grouped_gemm" not in md.read_text()
    assert {p.name for p in pngs} == {"throughput-quant_act.png", "bandwidth.png"}
    assert all(p.read_bytes()[:8] == PNG for p in pngs)


def test_report_markdown_only_and_bad_inputs(saved_run, tmp_path):
    _, (a_json, _), _ = saved_run
    md, pngs = write_report([a_json], tmp_path / "md", plots=False)
    assert md.exists() and pngs == []
    with pytest.raises(ValueError, match="one or two"):
        write_report([a_json] * 3, tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="not a moela.profiling result"):
        load_results(bad)
    (tmp_path / "junk.json").write_text("{")
    with pytest.raises(ValueError, match="not a JSON"):
        load_results(tmp_path / "junk.json")
    with pytest.raises(FileNotFoundError):
        load_results(tmp_path / "missing.json")
