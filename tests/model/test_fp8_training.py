"""FP8 training (``ModelArgs.train_fp8``, ``FP8Linear(master_weights=True)``, the MoE's routed experts).

What is checked, at small shapes (kernels through the interpreter on CPU):

- Structure: the Triton and reference backends run the same steps on the same quantized operands.
  A linear with a given dy: y, dx, dW, db agree within one bf16 rounding (the GEMMs differ only
  in float32 summation order). The MoE layer: the backends quantize the same values except where
  an upstream bf16 rounding differed, so their difference is a small part of FP8's own error:
  calc_diff(Triton, reference) < 0.1 · calc_diff(FP8, BF16).
- Against BF16 (the same weights, the bf16 path): DeepGEMM's bar is calc_diff < 1e-3 per FP8 GEMM;
  independent quantization errors add in squared norm, so a result that n FP8 GEMMs feed stays
  below n · 1e-3. A GEMM whose output enters SwiGLU counts twice (gate and up both carry its
  error into the product); n is counted per quantity below.
- Memory: the tensors saved for backward (parameters and the per-step FP8 weight copies
  excluded) take no more bytes than the bf16 path's.
- Master weights: gradients in the master dtype; the e4m3 copies are remade after an optimizer
  step, and only then.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moela.model import FP8Linear, MoE, Transformer
from moela.model.fp8_training import FP8WeightCache
from moela.reference import ModelArgs, calc_diff

BF16_ULP = 2.0**-7  # a bf16 rounding is within 2^-8 of |x|; two of them within 2^-7


def _grads(module, x, dy):
    x = x.detach().clone().requires_grad_()
    y = module(x)
    y.backward(dy)
    named = {k: p.grad for k, p in module.named_parameters() if p.grad is not None}
    return {"y": y.detach(), "x": x.grad, **named}


def _within_one_rounding(a, b, name):
    a, b = a.double(), b.double()
    assert ((a - b).abs() <= BF16_ULP * b.abs() + 1e-6 * b.abs().max()).all(), name


# ------------------------------------------------------------------------------------ FP8Linear
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_fp8_linear_training_triton_and_reference_agree(bias, device):
    torch.manual_seed(0)
    lin = nn.Linear(256, 200, bias=bias, device=device, dtype=torch.bfloat16)
    x = torch.randn(3, 48, 256, device=device, dtype=torch.bfloat16)
    dy = torch.randn(3, 48, 200, device=device, dtype=torch.bfloat16)
    got = {b: _grads(FP8Linear.from_linear(lin, backend=b, master_weights=True), x, dy)
           for b in ("triton", "reference")}
    assert set(got["triton"]) == set(got["reference"]) == {"y", "x", "weight", *(["bias"] if bias else [])}
    for key, value in got["triton"].items():
        assert value.dtype == got["reference"][key].dtype == torch.bfloat16, key
        _within_one_rounding(value, got["reference"][key], key)
    # against the bf16 linear: one FP8 GEMM feeds each of y (fprop), dx (dgrad), dW (wgrad)
    bf16 = _grads(lin, x, dy)
    for key in ("y", "x", "weight"):
        assert calc_diff(got["triton"][key], bf16[key]) < 1e-3, key
    if bias:
        _within_one_rounding(got["triton"]["bias"], bf16["bias"], "bias")


def test_fp8_linear_training_keeps_a_master_weight_and_saves_less_than_bf16(device):
    torch.manual_seed(0)
    lin = nn.Linear(256, 128, device=device, dtype=torch.bfloat16)
    layer = FP8Linear.from_linear(lin, backend="triton", master_weights=True)
    assert list(layer.state_dict()) == ["weight", "bias"] and layer.weight.requires_grad
    assert torch.equal(layer.weight, lin.weight) and layer.weight.dtype == torch.bfloat16
    x = torch.randn(256, 256, device=device, dtype=torch.bfloat16, requires_grad=True)
    assert _saved_bytes(layer, x) <= 0.53 * _saved_bytes(lin, x)  # e4m3 + a float32 scale per 128 vs bf16
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    (w_q, _, _), = layer.fp8_cache.get(_ops(), layer.weight)
    layer(x).sum().backward()
    assert layer.fp8_cache.get(_ops(), layer.weight)[0][0] is w_q  # no weight change: the same copy
    opt.step()
    assert layer.fp8_cache.get(_ops(), layer.weight)[0][0] is not w_q  # re-quantized from the master
    with pytest.raises(ValueError, match="backend: 'dequant' is an inference path"):
        FP8Linear(256, 128, backend="dequant", master_weights=True)
    with pytest.raises(TypeError, match="dtype: master weights are"):
        FP8Linear(256, 128, dtype=torch.float8_e4m3fn, master_weights=True)


def _ops():
    import moela.kernels

    return moela.kernels


def _saved_bytes(module, x) -> int:
    """Bytes of the tensors saved for backward, parameters and FP8 weight copies excluded."""

    def state() -> set[int]:  # what the module holds anyway (its FP8 copies are made during the call)
        held = {p.untyped_storage().data_ptr() for p in module.parameters()}
        for m in module.modules():
            cache = getattr(m, "fp8_cache", None)
            if isinstance(cache, FP8WeightCache):
                held |= {t.untyped_storage().data_ptr() for pair in cache._copies for t in pair}
        return held

    storages = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in state():
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(storages.values())


# ------------------------------------------------------------------------------------ MoE
DIMS = dict(dim=128, moe_inter_dim=128, n_routed_experts=4, n_activated_experts=2, n_expert_groups=1,
            n_limited_groups=1, n_shared_experts=1)


def _moe(device, **overrides):
    torch.manual_seed(0)
    return MoE(ModelArgs.from_name("tiny", **{**DIMS, **overrides})).to(device=device, dtype=torch.bfloat16)


def test_moe_fp8_training_against_bf16_and_between_backends(device):
    x = torch.randn(40, 128, device=device, dtype=torch.bfloat16)
    dy = torch.randn(40, 128, device=device, dtype=torch.bfloat16)
    got = {name: _grads(_moe(device, **kw), x, dy) for name, kw in (
        ("fp8-triton", dict(backend="triton", train_fp8=True)),
        ("fp8-reference", dict(backend="reference", train_fp8=True)),
        ("bf16", dict(backend="reference")),
    )}
    keys = {"y", "x", "w13", "w2", "gate.weight", "shared_experts.w1.weight", "shared_experts.w2.weight",
            "shared_experts.w3.weight"}
    assert set(got["fp8-triton"]) == set(got["fp8-reference"]) == set(got["bf16"]) == keys
    # FP8 GEMMs feeding each result, the ones before SwiGLU twice (routed and shared experts alike):
    # y: fprop w13 (2) + fprop w2; dW2: h (2) + its wgrad; dW13: h (2) + dgrad w2 + its wgrad;
    # dx: h (2) + dgrad w2 + dgrad w13; the router: ys (3, through the routing weights' gradient)
    n_gemms = {"y": 3, "w2": 3, "w13": 4, "x": 4, "gate.weight": 3, "shared_experts.w1.weight": 4,
               "shared_experts.w3.weight": 4, "shared_experts.w2.weight": 3}
    for key, n in n_gemms.items():
        fp8_err = calc_diff(got["fp8-triton"][key], got["bf16"][key])
        assert fp8_err < n * 1e-3, (key, fp8_err)
        assert calc_diff(got["fp8-triton"][key], got["fp8-reference"][key]) < 0.1 * fp8_err + 1e-9, key
        assert got["fp8-triton"][key].dtype == got["bf16"][key].dtype, key


def test_moe_fp8_training_saves_no_more_than_bf16_and_requantizes_per_step(device):
    x = torch.randn(32, 128, device=device, dtype=torch.bfloat16, requires_grad=True)
    fp8, bf16 = _moe(device, backend="triton", train_fp8=True), _moe(device, backend="triton")
    assert _saved_bytes(fp8, x) <= _saved_bytes(bf16, x)
    assert list(fp8.state_dict()) == list(bf16.state_dict())  # the same checkpoint names and master weights
    fp8 = _moe(device, backend="reference", train_fp8=True)  # the cache is the backends' common code
    opt = torch.optim.SGD(fp8.parameters(), lr=0.1)
    fp8(x).sum().backward()
    copies = fp8.fp8_cache._copies
    fp8(x).sum().backward()  # a second micro-batch: the same e4m3 copies
    assert fp8.fp8_cache._copies is copies
    opt.step()
    fp8(x).sum().backward()
    assert fp8.fp8_cache._copies is not copies


def test_train_fp8_config_rules():
    with pytest.raises(ValueError, match="ModelArgs.train_fp8: trains from floating-point master weights"):
        ModelArgs.from_name("tiny", dtype="fp8", train_fp8=True)
    with pytest.raises(ValueError, match="ModelArgs.train_fp8: expected one of"):
        ModelArgs.from_name("tiny", train_fp8=1)
    with pytest.raises(ValueError, match="train_fp8=True needs moe_inter_dim and dim multiples of 128"):
        MoE(ModelArgs.from_name("tiny", train_fp8=True))


def test_transformer_trains_every_projection_in_fp8_with_bf16_checkpoint_names():
    args = ModelArgs.from_name("tiny", dim=128, moe_inter_dim=128, inter_dim=128, kv_lora_rank=128, q_lora_rank=128,
                               n_routed_experts=4, n_expert_groups=1, n_limited_groups=1, n_activated_experts=2,
                               backend="reference")
    torch.manual_seed(0)
    fp8 = Transformer(args.replace(train_fp8=True))
    torch.manual_seed(0)
    bf16 = Transformer(args)
    assert list(fp8.state_dict()) == list(bf16.state_dict())
    fp8.load_state_dict(bf16.state_dict())
    fp8_linears = [m for m in fp8.modules() if isinstance(m, FP8Linear)]
    assert len(fp8_linears) == 2 * 5 + 3 + 3  # per layer wq_a, wq_b, wkv_a, wkv_b, wo; dense MLP; shared experts
    assert all(m.master_weights for m in fp8_linears) and not isinstance(fp8.head, FP8Linear)
    tokens = torch.randint(0, args.vocab_size, (2, 16))
    losses = {}
    for name, model in (("fp8", fp8), ("bf16", bf16)):
        logits = model(tokens)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten())
        loss.backward()
        losses[name] = loss.item()
    assert abs(losses["fp8"] - losses["bf16"]) < 0.01 * losses["bf16"]
    assert all(p.grad is not None for p in fp8.parameters() if p.requires_grad)
