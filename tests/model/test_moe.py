"""moela.model.MoE against moela.reference.MoE: same weights, same numbers, same gradients."""

import pytest
import torch

from moela.model.moe import MoE, sequence_balance_loss
from moela.reference import ModelArgs, calc_diff
from moela.reference import MoE as RefMoE


def _pair(dtype=torch.float64, **overrides):
    args = ModelArgs.from_name("tiny", backend="reference", **overrides)
    ref = RefMoE(args).to(dtype)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.3)
    model = MoE(args).to(dtype)
    model.load_state_dict(ref.state_dict())
    return ref, model


def test_state_dict_speaks_deepseek_names():
    ref, model = _pair()
    assert set(model.state_dict()) == set(ref.state_dict())
    for k, v in ref.state_dict().items():  # the reference's values in the layer's dtypes (gate.bias: float32)
        assert torch.equal(model.state_dict()[k], v.to(model.state_dict()[k].dtype)), k
    assert model.w13.shape == (16, 64, 64) and model.w2.shape == (16, 64, 32)


@pytest.mark.parametrize("overrides", [{}, {"score_func": "softmax", "n_expert_groups": 1, "n_limited_groups": 1,
                                            "gate_bias": False}, {"n_shared_experts": 0}],
                         ids=["v3-like", "v2-lite-like", "no-shared"])
def test_forward_and_gradients_match_the_reference_float64(overrides):
    ref, model = _pair(**overrides)
    x = torch.randn(2, 11, 64, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y_ref, y = ref(x), model(x2)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(y)
    y_ref.backward(dy)
    y.backward(dy)
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-11, atol=1e-11)
    grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    E, I = len(ref.experts), ref.args.moe_inter_dim
    def grad(p):  # experts no token chose get no gradient in the loop: zeros in the stacked layout
        return torch.zeros_like(p) if p.grad is None else p.grad

    w1 = torch.stack([grad(e.w1.weight) for e in ref.experts])
    w3 = torch.stack([grad(e.w3.weight) for e in ref.experts])
    w2 = torch.stack([grad(e.w2.weight) for e in ref.experts])
    torch.testing.assert_close(grads["w13"], torch.cat([w1, w3], 1), rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(grads["w2"], w2, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(grads["gate.weight"], ref.gate.weight.grad, rtol=1e-10, atol=1e-11)
    assert grads["w13"].shape == (E, 2 * I, 64)


def test_bf16_forward_is_as_close_as_the_reference_is():
    ref64, model64 = _pair()
    ref16, model16 = _pair(torch.bfloat16)
    ref16.load_state_dict(ref64.state_dict())
    model16.load_state_dict(ref64.state_dict())
    x = torch.randn(40, 64, dtype=torch.float64)
    with torch.no_grad():
        exact = ref64(x)
        err_ref = (ref16(x.bfloat16()).double() - exact).abs().max()
        err = (model16(x.bfloat16()).double() - exact).abs().max()
    assert err <= 2 * err_ref, (err, err_ref)


def test_fp8_experts_load_quantized_checkpoints_and_stay_close():
    args = ModelArgs.from_name("tiny", backend="reference", dtype="fp8", dim=128, moe_inter_dim=128)
    model = MoE(args).bfloat16()  # the FP8 experts keep their dtypes
    assert model.w13.dtype == torch.float8_e4m3fn and model.w13_scale_inv.dtype == torch.float32
    assert model.w13_scale_inv.shape == (16, 2, 1)
    sd = model.state_dict()
    assert sd["experts.3.w1.weight"].dtype == torch.float8_e4m3fn
    assert sd["experts.3.w1.weight_scale_inv"].shape == (1, 1)
    again = MoE(args)
    again.load_state_dict(sd)
    assert torch.equal(again.w13.view(torch.uint8), model.w13.view(torch.uint8))
    # against a bf16-weight layer holding the dequantized weights
    bf16 = MoE(args.replace(dtype="bf16")).to(torch.float32)
    from moela.reference import dequant
    with torch.no_grad():
        bf16.w13.copy_(dequant(model.w13, model.w13_scale_inv))
        bf16.w2.copy_(dequant(model.w2, model.w2_scale_inv))
        bf16.gate.load_state_dict(model.gate.state_dict())
        for name in ("w1", "w2", "w3"):
            fp8 = getattr(model.shared_experts, name)
            getattr(bf16.shared_experts, name).weight.copy_(dequant(fp8.weight, fp8.weight_scale_inv))
        x = torch.randn(32, 128)
        assert calc_diff(model(x.bfloat16()).float(), bf16(x)) < 2e-3
    with pytest.raises(ValueError, match="moe_inter_dim"):
        MoE(ModelArgs.from_name("tiny", dtype="fp8"))


def test_balancing_bias_update_and_sequence_loss():
    _, model = _pair(torch.float32)
    model.train()
    x = torch.randn(2, 16, 64)
    model(x)
    load = model.expert_load.clone()
    assert load.sum() == 2 * 16 * 4
    before = model.gate.bias.clone()
    model.update_gate_bias(0.01)
    torch.testing.assert_close(model.gate.bias - before, 0.01 * torch.sign(load.mean() - load))
    assert (model.expert_load == 0).all()
    # the sequence-wise loss is minimal (= 1) for perfectly uniform scores and routing
    args = model.args
    logits = torch.zeros(8, 16)
    ids = torch.arange(32).view(8, 4) % 16
    torch.testing.assert_close(sequence_balance_loss(logits, ids, args, 8), torch.tensor(1.0))
    model.seq_aux_alpha = 1e-3
    model(x)
    assert model.aux_loss is not None and model.aux_loss.requires_grad


def test_bad_input_raises():
    _, model = _pair(torch.float32)
    with pytest.raises(ValueError, match="x: expected a last dim of 64"):
        model(torch.randn(3, 63))
    with pytest.raises(TypeError, match="x: expected dtype torch.float32"):
        model(torch.randn(3, 64, dtype=torch.float64))
    with pytest.raises(ValueError, match="x: expected device cpu"):
        model(torch.randn(3, 64, device="meta"))
    with pytest.raises(ValueError, match="backend"):
        MoE(ModelArgs.from_name("tiny").replace(backend="cuda"))


@pytest.mark.parametrize("cast", ["bfloat16", "half", "double"])
def test_gate_bias_stays_float32_through_dtype_casts(cast):
    """DeepSeek (and HF's e_score_correction_bias) keep the selection bias in float32: a bf16
    bias would round checkpoint values and swallow ``update_gate_bias`` steps below its ulp."""
    args = ModelArgs.from_name("tiny", backend="reference")
    layer = getattr(MoE(args), cast)()
    assert layer.gate.bias.dtype == torch.float32
    assert layer.gate.weight.dtype == layer.w13.dtype == getattr(torch, cast if cast != "half" else "float16")
    model = MoE(args).bfloat16()
    assert model.expert_load.dtype == torch.float32  # token counts: exact in float32, not in bf16 past 256
    model.load_state_dict({**model.state_dict(), "gate.bias": torch.full((16,), 1 + 2**-12)})
    assert (model.gate.bias == 1 + 2**-12).all()  # not rounded to bf16's 1.0
    model.expert_load[0] = 1.0  # expert 0 over the mean load: its bias goes down by the rate
    model.update_gate_bias(1e-3)
    # one float32 rounding (ulp 2**-23 below 2); bf16 (ulp 2**-8) would have kept 1.0
    torch.testing.assert_close(model.gate.bias[0], torch.tensor(1 + 2**-12 - 1e-3), rtol=0, atol=2**-23)
    assert not model.gate.bias.requires_grad


def test_frozen_router_still_passes_the_routing_gradient_to_x():
    """A frozen gate.weight (e.g. fine-tuning the experts only) must not cut d y / d x through the
    routing weights: the reference differentiates them with respect to x."""
    ref, model = _pair()
    for layer in (ref, model):
        layer.gate.weight.requires_grad_(False)
    x = torch.randn(2, 7, 64, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    dy = torch.randn(2, 7, 64, dtype=torch.float64)
    ref(x).backward(dy)
    model(x2).backward(dy)
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-11, atol=1e-11)
    assert model.gate.weight.grad is None
