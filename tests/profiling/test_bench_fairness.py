"""The bench refuses a busy GPU (or flags every row), and cross-checks its clock with do_bench."""

import argparse

import pytest
import torch
import triton.testing

from moela.profiling import cli, environment, runner
from moela.profiling.cli import bench_line


def test_a_busy_gpu_is_refused_or_flagged(monkeypatch, capsys):
    monkeypatch.setattr(environment, "other_gpu_processes", lambda index=0: [{"pid": 4242, "used_mib": 900}])
    monkeypatch.setattr(environment, "nvml_index", lambda i=0: 0)
    parser = argparse.ArgumentParser(prog="bench")
    with pytest.raises(SystemExit):
        cli._busy_gpu(parser, torch.device("cuda"), allow=False)
    assert "another process holds the GPU (4242)" in capsys.readouterr().err
    assert cli._busy_gpu(parser, torch.device("cuda"), allow=True) == [{"pid": 4242, "used_mib": 900}]
    assert "WARNING: timing on a busy GPU" in capsys.readouterr().out
    assert cli._busy_gpu(parser, torch.device("cpu"), allow=False) == []  # a CPU run: nothing to share


def test_do_bench_cross_check(monkeypatch):
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, warmup, rep, return_mode: 1.3)
    timer = {"warmup_ms": 1.0, "rep_ms": 2.0}
    got = runner._do_bench_check(lambda: None, 1.0, timer)
    assert got["ms"] == 1.3 and not got["agree"]  # 30 % apart: flagged
    assert runner._do_bench_check(lambda: None, 1.25, timer)["agree"]
    row = {"status": "ok", "op": "x", "problem": "p", "impl": "moela", "median_ms": 1.0, "do_bench": got,
           "gpu_busy": [4242]}
    line = bench_line(row)
    assert "[do_bench 1.3 ms: 1.30x the events' median]" in line and "[GPU busy]" in line

    def broken(*a, **k):
        raise RuntimeError("no driver")

    monkeypatch.setattr(triton.testing, "do_bench", broken)
    assert runner._do_bench_check(lambda: None, 1.0, timer)["reason"].startswith("RuntimeError: no driver")
