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


@pytest.mark.slow
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


def test_main_job_on_a_cpu_times_the_kernels_through_the_interpreter(capsys, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("the CPU main job")
    code, out, _ = run(capsys, "--device", "cpu", "--only", "route", "permute", "--no-layers", "--no-progress",
                       "--out", str(tmp_path), "--name", "run")
    assert code == 0, out
    assert "pass    route" in out
    assert "== quick benchmark (tiny shapes, moela kernels through the Triton interpreter)" in out
    assert "columns: median per call" in out and "roof%: share of the roofline" in out  # the legend line
    assert "moela interp" in out and " base " in out and "CPU: every time is wall clock" in out
    data = json.loads((tmp_path / "run.json").read_text())
    moela = [r for r in data["rows"] if r["impl"] == "moela"]
    assert moela and all(r["status"] == "ok" and r["method"] == "cpu-wall (triton interpreter)" and r["reps"] == 1
                         for r in moela)
    assert all(r["check"]["ok"] for r in moela)
    assert all(r["memory"] == {"skipped": "not measured on CPU (torch tracks peak memory on CUDA devices only)"}
               for r in data["rows"] if r["status"] == "ok")


@pytest.mark.slow
def test_main_job_streams_its_lines_into_a_pipe(tmp_path):
    """Each check line reaches a log as its problem is done, not with the others at the end: the
    first line (route) arrives while moe_layer's checks, seconds of interpreter, still run."""
    import time

    cmd = [sys.executable, "-m", "moela.profiling", "--device", "cpu", "--only", "route", "moe_layer", "--no-layers",
           "--no-save"]
    arrived: dict[str, float] = {}
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=tmp_path) as proc:
        for line in proc.stdout:
            for key in ("  pass    route", "== quick benchmark"):
                if line.startswith(key):
                    arrived.setdefault(key, time.perf_counter())
            if len(arrived) == 2:  # the benchmark itself is not needed here
                proc.kill()
                break
    assert len(arrived) == 2
    assert arrived["== quick benchmark"] - arrived["  pass    route"] > 0.3


def test_main_sets_stdout_line_buffered(capsys):
    assert run(capsys, "list", "--names")[0] == 0
    assert sys.stdout.line_buffering


def test_bench_line_marks_the_base_row_and_prints_a_failed_check_in_full():
    from moela.profiling.cli import bench_line, check_line

    row = {"status": "ok", "op": "grouped_gemm", "problem": "v3 T=1", "impl": "torch grouped_mm", "median_ms": 0.1,
           "tflops": 1.0, "gbps": 2.0, "frac_roofline": 0.5, "speedup": 1.0, "baseline": "torch grouped_mm",
           "check": {"metric": "calc_diff", "value": 0.5, "tol": 1e-5, "ok": False, "detail": ""},
           "memory": {"peak_mib": 20.0, "above_start_mib": 12.25}, "method": "cuda-events"}
    line = bench_line(row)
    assert " base " in line and "12.2" in line and line.endswith("FAIL (calc_diff 0.5 > tol 1e-05)")
    oom = {"metric": None, "value": None, "tol": None, "ok": False,
           "detail": "compare: OutOfMemoryError: CUDA out of memory. Tried to allocate 56.00 GiB." + " x" * 300}
    line = check_line({"status": "FAIL", "op": "grouped_gemm_dw", "impl": "moela", "set": "s", "problem": "p",
                       "check": oom, "reason": ""})
    assert "None" not in line and line.endswith(oom["detail"])
