"""``python -m moela.profiling``: exit codes and messages for good and bad arguments."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from moela.profiling.cli import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse errors and --help
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(("argv", "message"), [
    (["bench", "--ops", "nope"], "unknown op(s) nope; known ops: route, gate"),
    (["check", "--sets", "nope"], "unknown shape set(s) nope"),
    (["bench", "--impls", "nope"], "unknown implementation(s) nope"),
    (["bench", "--rep-ms", "-1"], "expected a positive float, got '-1'"),
    (["bench", "--rep-ms", "abc"], "expected a positive float, got 'abc'"),
    (["layers", "--reps", "0"], "expected a positive int"),
    (["bench", "--ops", "quant_weight", "--sets", "v3-decode"], "unknown shape set(s) v3-decode for the chosen ops"),
    (["nope"], "invalid choice: 'nope'"),
    (["report"], "the following arguments are required: RESULT.json"),
    (["list", "--ops", "nope"], "unknown op(s) nope"),
    (["layers", "--configs", "nope"], "'nope' is neither a preset (deepseek-v3"),
])
def test_bad_arguments_exit_2_with_a_message(capsys, argv, message):
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert message in err
    assert "usage: python -m moela.profiling" in err


def test_cuda_requested_without_cuda(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, _, err = run(capsys, "check", "--device", "cuda")
    assert code == 2 and "CUDA is not available" in err


def test_deepseek_sets_refused_on_cpu(capsys):
    code, _, err = run(capsys, "bench", "--device", "cpu", "--ops", "grouped_gemm", "--sets", "tiny", "v3-decode")
    assert code == 2 and "v3-decode are DeepSeek-sized: on a CPU only `tiny` runs" in err
    code, _, err = run(capsys, "check", "--device", "cpu", "--sets", "check")
    assert code == 2 and "--cpu-large" in err


def test_report_errors(capsys, tmp_path):
    code, _, err = run(capsys, "report", str(tmp_path / "missing.json"))
    assert code == 2 and "no such result file" in err
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"hello": 1}))
    code, _, err = run(capsys, "report", str(other))
    assert code == 2 and "not a moela.profiling result" in err
    code, _, err = run(capsys, "report", str(other), str(other), str(other))
    assert code == 2 and "one or two result files" in err


def test_bench_saves_and_reports(capsys, tmp_path):
    code, out, _ = run(capsys, "bench", "--device", "cpu", "--ops", "route", "permute", "--sets", "tiny", "--impls",
                       "reference", "torch", "--rep-ms", "1", "--out", str(tmp_path), "--name", "r", "--no-progress",
                       "--interleave", "--graphs")
    assert code == 0, out
    assert "ceilings on cpu" in out and "CPU wall clock" in out and "torch index_select" in out
    assert (tmp_path / "r.json").exists() and (tmp_path / "r.csv").exists()
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["settings"]["interleave"] is True and data["settings"]["graphs"] is True
    assert not any("graph" in r for r in data["rows"])  # CUDA graphs: a GPU-only measurement
    assert set(data["stats"]["seconds_by_op"]) == {"route", "permute"} and "seconds by op" in out
    ok = [r for r in data["rows"] if r["status"] == "ok"]
    assert ok and all({"setup", "prepare", "timing"} <= set(r["wall_s"]) for r in ok)
    assert [r["op"] for r in data["rows"] if r["impl"] == "reference"][:2] == ["route", "permute"]
    code, out, _ = run(capsys, "report", str(tmp_path / "r.json"), "--no-plots", "--out", str(tmp_path / "rep"))
    assert code == 0 and (tmp_path / "rep" / "report.md").exists()


def test_check_missing_kernel_is_skipped(capsys, register_op, fake_op):
    register_op(fake_op("zz_missing"))
    code, out, _ = run(capsys, "check", "--ops", "zz_missing", "--no-progress")
    assert code == 0
    assert "not implemented in moela.kernels yet" in out and "0 failed" in out


def test_check_wrong_kernel_fails(capsys, register_op, fake_op):
    register_op(fake_op("zz_wrong", kernel=lambda: (lambda x: 3 * x)))
    register_op(fake_op("zz_right", kernel=lambda: (lambda x: x + x)))
    code, out, _ = run(capsys, "check", "--ops", "zz_wrong", "zz_right", "--no-progress")
    assert code == 1
    assert "FAIL" in out and "pass" in out and "2 passed, 2 failed" in out


def test_bench_wrong_kernel_fails(capsys, register_op, fake_op):
    register_op(fake_op("zz_wrong2", kernel=lambda: (lambda x: 3 * x)))
    code, out, _ = run(capsys, "bench", "--ops", "zz_wrong2", "--sets", "tiny", "--rep-ms", "1", "--no-save",
                       "--no-ceilings", "--no-progress")
    assert code == 1 and "FAIL" in out


def test_list(capsys):
    code, out, _ = run(capsys, "list", "--ops", "grouped_gemm", "fp8_gemm")
    assert code == 0
    assert "grouped_gemm:" in out and "deepgemm-grouped (3)" in out and "torch grouped_mm" in out
    assert "fp8_gemm:" in out and "deepgemm-dense (18)" in out


def test_module_entry_point_help():
    r = subprocess.run([sys.executable, "-m", "moela.profiling", "--help"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0
    for cmd in ("check", "bench", "report", "layers", "list"):
        assert cmd in r.stdout


def test_bench_line_and_report_cell_show_graph_replays():
    from moela.profiling.cli import bench_line
    from moela.profiling.report import _cell

    row = {"status": "ok", "op": "permute", "problem": "v3 T=1", "impl": "moela", "median_ms": 0.078,
           "tflops": None, "gbps": 1.0, "frac_roofline": 0.01, "speedup": 0.3, "check": {"ok": True},
           "graph": {"median_ms": 0.0061, "p20_ms": 0.006, "p80_ms": 0.0062, "reps": 50}}
    assert bench_line(row).endswith("ok  graph 6.1 us") and "graph 6.1 µs" in _cell(row)
    row["graph"] = {"reason": "RuntimeError: operation not permitted when stream is capturing"}
    assert "graph: RuntimeError" in bench_line(row) and "graph" not in _cell(row)
    del row["graph"]
    assert "graph" not in bench_line(row)
