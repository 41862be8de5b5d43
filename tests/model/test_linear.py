"""model.linear.FP8Linear: DeepSeek's FP8 checkpoint tensors, from_linear, and its three paths."""

from __future__ import annotations

import types

import pytest
import torch
from fp8_testing import abs_fp8, assert_gemm_close, assert_same_bits
from torch import nn

from moela import reference as ref
from moela.model import linear as linear_module
from moela.model.linear import FP8Linear


def _linear(K=256, N=192, bias=True, device="cpu"):
    return nn.Linear(K, N, bias=bias, device=device, dtype=torch.bfloat16)


def test_from_linear_quantizes_like_the_reference_and_uses_deepseek_names(device):
    lin = _linear(device=device)
    layer = FP8Linear.from_linear(lin, backend="reference")
    q, s = ref.quant_weight(lin.weight.detach())
    assert_same_bits(layer.weight, q, "weight")
    assert_same_bits(layer.weight_scale_inv, s, "weight_scale_inv")
    assert torch.equal(layer.bias, lin.bias.detach())
    assert list(layer.state_dict()) == ["weight", "weight_scale_inv", "bias"]
    assert not any(p.requires_grad for p in layer.parameters())
    assert layer.weight_scale_inv.shape == (2, 2)


def test_loads_a_deepseek_checkpoint_pair(device):
    w = torch.randn(256, 384, device=device)
    q, s = ref.quant_weight(w)
    layer = FP8Linear(384, 256, device=device)
    layer.load_state_dict({"weight": q, "weight_scale_inv": s})
    assert_same_bits(layer.weight, q)
    assert torch.equal(layer.weight_scale_inv, s)
    x = torch.randn(3, 384, device=device, dtype=torch.bfloat16)
    assert ref.calc_diff(layer(x), x.float() @ w.T) < 1e-3


def test_triton_and_reference_paths_agree_and_match_the_bf16_linear(device):
    lin = _linear(device=device)
    x = torch.randn(2, 3, 256, device=device, dtype=torch.bfloat16)
    layers = {b: FP8Linear.from_linear(lin, backend=b) for b in ("triton", "reference", "dequant")}
    outs = {b: layer(x) for b, layer in layers.items()}
    for out in outs.values():
        assert out.shape == (2, 3, 192) and out.dtype == torch.bfloat16
    # triton and reference: the same quantized operands and promotion (the derived GEMM bound).
    layer = layers["reference"]
    q, s = ref.quant_act(x.reshape(6, 256))
    ref32 = ref.fp8_gemm(q, s, layer.weight, layer.weight_scale_inv, torch.float32)
    mag = ref.fp8_gemm(abs_fp8(q), s, abs_fp8(layer.weight), layer.weight_scale_inv, torch.float32)
    bias = layer.bias.float()
    extra = 2.0**-24 * (ref32.abs() + bias.abs()).double()
    for b in ("triton", "reference"):
        assert_gemm_close(outs[b].reshape(6, 192), ref32 + bias, mag, 2, 128, b, extra=extra)
    y = lin(x).detach()
    for out in outs.values():
        assert ref.calc_diff(out, y) < 1e-3


def test_every_path_takes_an_input_dtype_other_than_the_bias_dtype(device):
    """The bias keeps the layer's dtype (bf16 here); a float32 input gives a float32 output on every
    path (the dequant path's F.linear needs the bias cast to x's dtype)."""
    lin = _linear(device=device)
    x = torch.randn(3, 256, device=device)
    y = torch.nn.functional.linear(x, lin.weight.float(), lin.bias.float()).detach()
    for b in ("triton", "reference", "dequant"):
        out = FP8Linear.from_linear(lin, backend=b)(x)
        assert out.dtype == torch.float32, b
        assert ref.calc_diff(out, y) < 1e-3, b


def test_auto_backend_resolution(monkeypatch):
    layer = FP8Linear(256, 128)
    assert layer.resolved_backend(torch.zeros(1, 256)) == "reference"
    cuda_x = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))
    monkeypatch.setattr(linear_module, "_fp8_capable", lambda device: True)
    assert layer.resolved_backend(cuda_x) == "triton"
    assert FP8Linear(200, 128).resolved_backend(cuda_x) == "dequant"  # K not a multiple of 128
    monkeypatch.setattr(linear_module, "_fp8_capable", lambda device: False)  # e.g. an A100
    assert layer.resolved_backend(cuda_x) == "dequant"
    assert FP8Linear(256, 128, backend="triton").resolved_backend(cuda_x) == "triton"


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="backend: expected one of"):
        FP8Linear(256, 128, backend="cuda")
    with pytest.raises(ValueError, match="scale_fmt"):
        FP8Linear(256, 128, scale_fmt="e8m0")
    with pytest.raises(ValueError, match="in_features: expected a positive int"):
        FP8Linear(0, 128)
    with pytest.raises(TypeError, match="linear: expected an nn.Linear"):
        FP8Linear.from_linear(nn.Conv1d(2, 2, 1))


@pytest.mark.gpu
def test_gpu_fp8_linear_module_v3_shapes():
    lin = nn.Linear(7168, 2112, bias=False, device="cuda", dtype=torch.bfloat16)
    layer = FP8Linear.from_linear(lin)
    x = torch.randn(64, 7168, device="cuda", dtype=torch.bfloat16)
    assert layer.resolved_backend(x) == ("triton" if torch.cuda.get_device_capability() >= (8, 9) else "dequant")
    assert ref.calc_diff(layer(x), lin(x)) < 1e-3
