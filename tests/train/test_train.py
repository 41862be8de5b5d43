"""moela.train end to end at a size CI affords: the three runs (references, Triton bf16, Triton FP8
through the interpreter) of the tiny model for a few steps of 8 bytes, their final held-out losses
within the trainer's 2 % of each other, the plots and results written; a distilled student from a
saved teacher; the presets' sizes and the FLOP count."""

from __future__ import annotations

import json
import math

import pytest
import torch

from moela.train import cli
from moela.train.data import ByteBatches, stdlib_corpus
from moela.train.loop import build_model
from moela.train.metrics import active_params, flops_per_token
from moela.train.presets import PRESETS, student_args


def test_three_runs_agree_and_write_their_plots(tmp_path):
    out = tmp_path / "run"
    summary = cli.run(["--preset", "tiny", "--steps", "3", "--batch", "1", "--seq-len", "8", "--out", str(out),
                       "--no-progress", "--save"])
    assert [r["name"] for r in summary["runs"]] == ["reference", "triton-bf16", "triton-fp8"]
    for r in summary["runs"]:
        assert len(r["losses"]) == 3 and all(math.isfinite(v) for v in r["losses"])
        assert r["losses"][-1] < r["losses"][0]  # it learns
        assert len(r["expert_load"]) == 3 and abs(sum(r["expert_load"][-1][0]) - 1) < 1e-5
    assert summary["within_max_gap"], summary["final_eval"]
    for name in ("loss.png", "expert_load.png", "results.json"):
        assert (out / name).stat().st_size > 0
    assert json.loads((out / "results.json").read_text())["final_eval"] == summary["final_eval"]

    # a student of half the layers and experts, trained on the saved reference model's logits
    student = cli.run(["--preset", "tiny", "--steps", "2", "--batch", "1", "--seq-len", "16", "--runs", "reference",
                       "--distill-from", str(out / "reference"), "--out", str(tmp_path / "student"), "--no-progress"])
    assert student["teacher_eval"] is not None and len(student["runs"][0]["losses"]) == 2
    assert student["model"]["n_routed_experts"] == PRESETS["tiny"].args.n_routed_experts // 2


def test_bad_run_names_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="--runs: unknown run"):
        cli.run(["--runs", "reference,cuda-fp4", "--out", str(tmp_path)])


def test_presets_sizes_and_flops():
    small = build_model(PRESETS["small"].args.replace(backend="reference"), torch.device("meta"), torch.bfloat16)
    n = sum(p.numel() for p in small.parameters())
    assert 10e6 <= n <= 50e6  # the default GPU model: 10-50 M parameters
    tiny = build_model(PRESETS["tiny"].args.replace(backend="reference"), torch.device("cpu"), torch.float32)
    a = tiny.args
    routed = 3 * a.dim * a.moe_inter_dim * a.n_activated_experts  # one layer's active routed experts
    assert active_params(tiny) < sum(p.numel() for p in tiny.parameters())
    assert active_params(tiny) >= routed
    assert flops_per_token(tiny, 32) > 6 * active_params(tiny)
    s = student_args(PRESETS["small"].args)
    assert s.n_layers == 4 and s.n_routed_experts == 8 and not s.train_fp8


def test_corpus_and_batches_are_deterministic():
    data = stdlib_corpus(1 << 16)
    assert len(data) == 1 << 16 and b"def " in data
    a, b = ByteBatches(data, 3, 8, seed=1), ByteBatches(data, 3, 8, seed=1)
    x, y = a.train(5)
    assert torch.equal(x, b.train(5)[0]) and torch.equal(x[:, 1:], y[:, :-1])
    assert not torch.equal(x, a.train(6)[0])
    ev = a.eval_batches()
    assert len(ev) == 4 and all(torch.equal(e[0], f[0]) for e, f in zip(ev, b.eval_batches(), strict=True))
