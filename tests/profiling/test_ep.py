"""torchrun --nproc_per_node=N -m moela.profiling.ep: the README's command on 2 CPU ranks, tiny shapes."""

import json
import subprocess
import sys

import pytest
import torch

from moela.profiling import ep


@pytest.mark.slow
def test_runs_under_torchrun_on_two_gloo_ranks(tmp_path):
    if torch.cuda.device_count() == 1:
        pytest.skip("one GPU cannot hold two NCCL ranks")
    out = tmp_path / "ep.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "moela.profiling.ep",
           "--tokens", "6", "--dim", "32", "--experts", "4", "--topk", "2", "--inter", "16", "--reps", "2",
           "--warmup", "1", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "expert parallelism: 2 ranks, " in done.stdout
    result = json.loads(out.read_text())
    assert result["world_size"] == 2 and result["backend"] in ("gloo", "nccl") and result["tokens_per_rank"] == 6
    names = [r["name"] for r in result["rows"]]
    assert names[0] == "all_gather (baseline)"
    for d in ("all_to_all", "all_reduce"):
        assert {f"{d} dispatch", f"{d} combine", f"{d} dispatch+combine"} <= set(names)
        assert any(n.startswith(f"MoE layer fwd ({d}, 2 experts/rank") for n in names)
    for row in result["rows"]:
        assert row["median_ms"] > 0 and row["reps"] == 2
        if row["bytes_per_rank"] is not None:
            assert row["bytes_per_rank"] > 0 and row["gbps_per_rank"] > 0
    baseline = result["rows"][0]
    assert baseline["bytes_per_rank"] == 6 * 32 * 4  # (W-1)·T·D float32 values


def test_bad_arguments_exit_2():
    with pytest.raises(SystemExit) as e:
        ep.main(["--reps", "0"])
    assert e.value.code == 2
