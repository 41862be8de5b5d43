"""Checkpoint naming (DeepSeek <-> Hugging Face) and safetensors round trips."""

import pytest
import torch

from moela.model.checkpoint import (
    CheckpointKeyError,
    hf_to_moela,
    is_hf_naming,
    load_checkpoint,
    moela_to_hf,
    read_safetensors,
    save_checkpoint,
    to_moela_names,
)
from moela.reference import MLA, ModelArgs, MoE

# (Hugging Face DeepSeek-V3 name, DeepSeek inference name) — from the two published formats
PAIRS = [
    ("model.embed_tokens.weight", "embed.weight"),
    ("model.layers.0.input_layernorm.weight", "layers.0.attn_norm.weight"),
    ("model.layers.0.post_attention_layernorm.weight", "layers.0.ffn_norm.weight"),
    ("model.layers.0.self_attn.q_a_proj.weight", "layers.0.attn.wq_a.weight"),
    ("model.layers.0.self_attn.q_a_layernorm.weight", "layers.0.attn.q_norm.weight"),
    ("model.layers.0.self_attn.q_b_proj.weight", "layers.0.attn.wq_b.weight"),
    ("model.layers.0.self_attn.q_proj.weight", "layers.0.attn.wq.weight"),
    ("model.layers.0.self_attn.kv_a_proj_with_mqa.weight", "layers.0.attn.wkv_a.weight"),
    ("model.layers.0.self_attn.kv_a_layernorm.weight", "layers.0.attn.kv_norm.weight"),
    ("model.layers.0.self_attn.kv_b_proj.weight", "layers.0.attn.wkv_b.weight"),
    ("model.layers.0.self_attn.o_proj.weight_scale_inv", "layers.0.attn.wo.weight_scale_inv"),
    ("model.layers.0.mlp.gate_proj.weight", "layers.0.ffn.w1.weight"),
    ("model.layers.3.mlp.gate.weight", "layers.3.ffn.gate.weight"),
    ("model.layers.3.mlp.gate.e_score_correction_bias", "layers.3.ffn.gate.bias"),
    ("model.layers.3.mlp.experts.255.gate_proj.weight", "layers.3.ffn.experts.255.w1.weight"),
    ("model.layers.3.mlp.experts.7.down_proj.weight", "layers.3.ffn.experts.7.w2.weight"),
    ("model.layers.3.mlp.experts.7.up_proj.weight_scale_inv", "layers.3.ffn.experts.7.w3.weight_scale_inv"),
    ("model.layers.3.mlp.shared_experts.up_proj.weight", "layers.3.ffn.shared_experts.w3.weight"),
    ("model.norm.weight", "norm.weight"),
    ("lm_head.weight", "head.weight"),
]


@pytest.mark.parametrize("hf,ours", PAIRS, ids=[p[1] for p in PAIRS])
def test_names_translate_both_ways(hf, ours):
    assert hf_to_moela(hf) == ours
    assert moela_to_hf(ours) == hf


def test_naming_detection_and_deepseek_scale_alias():
    assert is_hf_naming([p[0] for p in PAIRS]) and not is_hf_naming([p[1] for p in PAIRS])
    assert is_hf_naming(["experts.0.gate_proj.weight"])
    out = to_moela_names({"layers.0.attn.wo.scale": torch.ones(1), "layers.0.attn.wo.weight": torch.ones(1)})
    assert set(out) == {"layers.0.attn.wo.weight_scale_inv", "layers.0.attn.wo.weight"}


def _random_(module):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    return module


@pytest.mark.parametrize("naming", ["moela", "hf"])
@pytest.mark.parametrize("sharded", [False, True], ids=["one-file", "shards"])
def test_round_trip_through_safetensors(tmp_path, naming, sharded):
    args = ModelArgs.from_name("tiny")
    src = torch.nn.ModuleDict({"ffn": _random_(MoE(args)), "attn": _random_(MLA(args))})
    dst = torch.nn.ModuleDict({"ffn": MoE(args), "attn": MLA(args)})
    target = tmp_path / ("ckpt" if sharded else "model.safetensors")
    files = save_checkpoint(src, target, naming=naming, max_shard_bytes=20_000 if sharded else None)
    assert len(files) > 1 if sharded else len(files) == 1
    if naming == "hf":
        assert "model.ffn.gate.e_score_correction_bias" not in read_safetensors(target)  # "ffn" is not HF's
        assert "model.mlp.gate.e_score_correction_bias" in read_safetensors(target)
    load_checkpoint(dst, target)
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


def test_strict_loading_names_missing_and_unexpected_keys(tmp_path):
    args = ModelArgs.from_name("tiny")
    moe = MoE(args)
    state = moe.state_dict()
    del state["experts.3.w2.weight"]
    state["experts.99.w1.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointKeyError, match=r"missing keys: experts\.3\.w2\.weight.*unexpected keys: experts\.99"):
        load_checkpoint(moe, state)
    state = moe.state_dict()
    state["gate.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointKeyError, match=r"gate\.weight: expected shape \(16, 64\), got \(3, 3\)"):
        load_checkpoint(moe, state)
    extra = {**moe.state_dict(), "layers.61.eh_proj.weight": torch.zeros(1)}
    load_checkpoint(moe, extra, ignore=[r"^layers\.61\."])
    with pytest.raises(FileNotFoundError, match="path"):
        load_checkpoint(moe, tmp_path / "nothing.safetensors")
    with pytest.raises(ValueError, match="naming"):
        save_checkpoint(moe, tmp_path / "x.safetensors", naming="gguf")
