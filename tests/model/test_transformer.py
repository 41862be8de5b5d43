"""The small Transformer: checkpoints in both namings, cached decode == full forward."""

import pytest
import torch

from moela.model.checkpoint import load_checkpoint, read_safetensors, save_checkpoint
from moela.model.transformer import Transformer
from moela.reference import ModelArgs


def _model(dtype=torch.float64, **overrides):
    args = ModelArgs.from_name("tiny", backend="reference", **overrides)
    model = Transformer(args).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.2 if "norm" in name else p.shape[-1] ** -0.5)
    return model.eval()


def test_hf_sharded_checkpoint_round_trip(tmp_path):
    src, dst = _model(), _model()
    save_checkpoint(src, tmp_path / "hf", naming="hf", max_shard_bytes=50_000)
    keys = set(read_safetensors(tmp_path / "hf"))
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
            "model.layers.1.mlp.experts.15.down_proj.weight", "model.layers.1.mlp.gate.e_score_correction_bias",
            "model.layers.0.mlp.gate_proj.weight", "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"} <= keys
    load_checkpoint(dst, tmp_path / "hf")
    tokens = torch.randint(0, 256, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(dst(tokens), src(tokens), rtol=0, atol=0)


@pytest.mark.parametrize("attn_impl", ["naive", "absorb"])
def test_prefill_then_decode_equals_full_forward(attn_impl):
    model = _model()
    for layer in model.layers:
        layer.attn.attn_impl = attn_impl
    tokens = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        full = model(tokens)
        caches = model.new_caches(2, 16)
        out = [model(tokens[:, :5], 0, caches)]
        out += [model(tokens[:, i:i + 1], i, caches) for i in range(5, 9)]
    torch.testing.assert_close(torch.cat(out, 1), full, rtol=1e-10, atol=1e-10)


def test_bad_tokens_and_caches_raise():
    model = _model()
    with pytest.raises(ValueError, match="tokens"):
        model(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="caches"):
        model(torch.zeros(2, 3, dtype=torch.long), 0, [])
