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
    assert "**a (git " in text and "**b (git " in text and "NVIDIA H200" in text  # labelled by file, git ref, date
    assert "(×2.00)" in text  # B took half the time
    assert "check failed ×1 — calc_diff 0.5 > tol 1e-05" in text
    assert "throttled during 1 of 1" in text and "SwPowerCap" in text
    assert "×1.00 vs torch grouped_mm → ×1.00 vs torch grouped_mm" not in text  # moela did not run: no speedup
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


def _row(**kw):
    base = {"op": "grouped_gemm", "set": "s", "problem": "p", "series": "x", "tokens": 8, "impl": "moela",
            "kind": "moela", "same_function": True, "note": "", "status": "ok", "reason": "", "median_ms": 1.0,
            "flops": 2e12, "bytes": 1e9, "intensity": 2e3, "tflops": 2000.0, "gbps": 1000.0, "bound": "compute",
            "compute_ceiling": "matmul_bf16", "frac_compute": 0.5, "frac_bandwidth": 0.2, "frac_roofline": 0.5,
            "method": "cuda-events", "rotation": 1, "l2_flush": False}
    return {**base, **kw}


def _save(folder, rows, git, date, ceilings=None):
    env = {"device": "NVIDIA H200", "git_ref": git, "date": date, "torch": "2.11", "triton": "3.6",
           "l2_cache_mib": 60.0}
    ceilings = ceilings or {"copy": {"value": 4000.0, "unit": "GB/s"},
                            "matmul_bf16": {"value": 700.0, "unit": "TFLOP/s"}}
    return save_results({"kind": "bench", "environment": env, "ceilings": ceilings, "rows": rows, "stats": {}},
                        folder, "bench")[0]


def test_two_runs_with_equal_file_names(tmp_path):
    """Folders, git refs and dates label the runs; speedups are each run's own; rows of one run
    only are marked; a failed check prints in full; an out-of-memory check or row is no ✗."""
    oom = ("compare: OutOfMemoryError: CUDA out of memory. Tried to allocate 56.00 GiB. GPU 0 has a total capacity "
           "of 139.80 GiB" + " and more" * 40)
    a = _save(tmp_path / "run-old", [
        _row(median_ms=2.0, speedup=0.5, baseline="torch grouped_mm"),
        _row(impl="torch grouped_mm", kind="torch", speedup=1.0, baseline="torch grouped_mm"),
        _row(problem="only-old", check={"metric": "calc_diff", "value": 0.5, "tol": 1e-5, "ok": False, "detail": ""}),
        _row(problem="oom", check={"metric": None, "value": None, "tol": None, "ok": False, "detail": oom}),
    ], "aaaaaaa11111", "2026-11-28T17:17:36+00:00")
    b = _save(tmp_path / "run-new", [
        _row(median_ms=0.5, speedup=2.0, baseline="torch grouped_mm"),
        _row(impl="torch grouped_mm", kind="torch", speedup=1.0, baseline="torch grouped_mm"),
        _row(problem="only-new"),
        _row(problem="oom", status="skipped", reason="out of memory: OutOfMemoryError: CUDA out of memory."),
    ], "bbbbbbb22222", "2026-12-01T09:00:00+00:00")
    md, pngs = write_report([a, b], tmp_path / "cmp")
    text = md.read_text()
    assert "**run-old (git aaaaaaa11111, 2026-11-28 17:17)**" in text
    assert "**run-new (git bbbbbbb22222, 2026-12-01 09:00)**" in text and "A: bench" not in text
    assert "| ×0.50 vs torch grouped_mm → ×2.00 vs torch grouped_mm |" in text  # per run
    assert "(×4.00)" in text  # moela 2 ms -> 0.5 ms
    only_old = next(line for line in text.splitlines() if "| only-old |" in line)
    assert "✗ → —" in only_old
    assert "| — → 1.00 ms" in next(line for line in text.splitlines() if "| only-new |" in line)
    assert "check failed ×1 — calc_diff 0.5 > tol 1e-05" in text and "None" not in text
    oom_line = next(line for line in text.splitlines() if "| oom |" in line)
    assert "✗" not in oom_line and "(not checked) → skipped (out of memory)" in oom_line
    assert f"not checked ×1 — {oom}" in text  # the full reason
    assert [p.name for p in pngs if p.name.startswith("throughput")] == ["throughput-grouped_gemm.png"]


def test_rows_in_the_unit_that_bounds_them_and_flags_above_a_ceiling(tmp_path):
    rows = [
        _row(),  # compute-bound, below: TF/s, no flag
        _row(problem="fast", frac_compute=1.1, frac_roofline=1.1),  # above the matmul ceiling
        _row(problem="decode", tflops=1.0, bound="memory", frac_compute=0.01, frac_bandwidth=1.2, frac_roofline=1.2,
             bytes=10 * 2**20),  # fits L2
        _row(problem="decode", impl="torch dense", kind="torch", same_function=False, note="one expert's matmul",
             tflops=1.0, bound="memory", frac_compute=0.01, frac_bandwidth=5.07, frac_roofline=5.07, bytes=4e8),
        _row(problem="big", impl="moela", tflops=1.0, bound="memory", frac_compute=0.01, frac_bandwidth=1.05,
             frac_roofline=1.05, bytes=4e8, rotation=3),
    ]
    md, _ = write_report([_save(tmp_path / "r", rows, "c" * 12, "2026-12-01T09:00:00+00:00")], tmp_path / "rep")
    text = md.read_text()
    line = {p: next(x for x in text.splitlines() if f"| {p} |" in x) for p in ("p", "fast", "decode", "big")}
    assert "2e+03 TF/s · 50%" in line["p"] and "⚠" not in line["p"]
    assert "1e+03 GB/s · 120% ⚠" in line["decode"]  # memory-bound: GB/s
    assert "faster than the matmul_bf16 ceiling measured at the start of the run (700 TF/s)" in text
    assert "10 MiB of data that can stay in the 60 MiB L2 cache between calls" in text
    assert "a baseline doing other work than the op (one expert's matmul) measured with the op's byte count" in text
    assert "above the measured copy bandwidth (4000 GB/s): a copy reads and writes in equal parts" in text
