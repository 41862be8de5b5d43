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


FP8_DIMS = dict(dim=128, inter_dim=256, moe_inter_dim=128, q_lora_rank=128, kv_lora_rank=128,
                qk_nope_head_dim=32, v_head_dim=32)  # every projection a multiple of the 128 block


def test_fp8_model_keeps_fp8_weights_and_round_trips_checkpoints(tmp_path):
    args = ModelArgs.from_name("tiny", backend="reference", dtype="fp8", **FP8_DIMS)
    fp8 = Transformer(args).bfloat16().eval()  # .bfloat16() must not touch the FP8 weights
    assert fp8.layers[1].attn.wkv_b.weight.dtype == torch.float8_e4m3fn
    assert fp8.layers[1].ffn.w13.dtype == torch.float8_e4m3fn
    assert fp8.layers[0].ffn.w1.weight_scale_inv.dtype == torch.float32
    keys = set(fp8.state_dict())
    assert {"layers.0.attn.wkv_b.weight_scale_inv", "layers.1.ffn.experts.3.w2.weight_scale_inv",
            "layers.1.ffn.shared_experts.w1.weight_scale_inv", "layers.0.ffn.w3.weight_scale_inv"} <= keys
    save_checkpoint(fp8, tmp_path / "fp8.safetensors", naming="hf")
    again = Transformer(args).bfloat16().eval()
    load_checkpoint(again, tmp_path / "fp8.safetensors")
    tokens = torch.randint(0, 256, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(again(tokens), fp8(tokens), rtol=0, atol=0)


def test_fp8_model_is_close_to_its_dequantized_twin():
    """Dense blocks only: an MoE would let activation-quantization error flip routing decisions."""
    from moela.reference import calc_diff, dequant

    args = ModelArgs.from_name("tiny", backend="reference", dtype="fp8", n_dense_layers=2, **FP8_DIMS)
    fp8 = Transformer(args).bfloat16().eval()
    twin = Transformer(args.replace(dtype="bf16")).bfloat16().eval()
    state = {}
    for k, v in fp8.state_dict().items():
        scale = fp8.state_dict().get(k.removesuffix("weight") + "weight_scale_inv")
        if not k.endswith("weight_scale_inv"):
            state[k] = dequant(v, scale).bfloat16() if scale is not None else v
    twin.load_state_dict(state)
    tokens = torch.randint(0, 256, (2, 6))
    with torch.no_grad():
        # measured ~1e-4 (the activations' e4m3 rounding); DeepGEMM's bar for one GEMM is 1e-3
        assert calc_diff(fp8(tokens).float(), twin(tokens).float()) < 1e-3


def test_decoding_past_the_cache_raises():
    model = _model()
    caches = model.new_caches(1, 8)
    with torch.no_grad():
        model(torch.randint(0, 256, (1, 8)), 0, caches)
        with pytest.raises(ValueError, match="max_seq_len|past"):
            model(torch.randint(0, 256, (1, 1)), 8, caches)
