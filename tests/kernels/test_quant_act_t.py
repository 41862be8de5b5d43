"""kernels.quant_act_t bit for bit against reference.quant_act_t (= quant_act of xᵀ).

CPU: the interpreter with the compatibility layer, small shapes (ragged in both directions,
strided inputs, other blocks, special values), outputs pre-filled with NaN; exact comparison
(a NaN matches any NaN). GPU tier: DeepSeek shapes, same exactness.
"""

from __future__ import annotations

import math

import pytest
import torch
from fp8_testing import assert_same_bits
from moela_testing import nan_empty

from moela import reference as ref
from moela.kernels import quant_act_t
from moela.kernels.fp8_quant import FP8_DTYPE, dequant

FMTS = [None, "ue8m0"]
FMT_IDS = ["f32-scale", "ue8m0"]


def wide_tokens(shape, dtype, device):
    """Normal values times 1e-3..1e3 along the rows (tokens): every B×1 block its own scale."""
    x = torch.randn(shape, device=device) * torch.logspace(-3, 3, shape[0], device=device)[:, None]
    return x.to(dtype)


def _poisoned(x, block=128, fmt=None):
    M, K = x.shape
    out = (nan_empty((K, M), FP8_DTYPE, x.device), nan_empty((K, math.ceil(M / block)), torch.float32, x.device))
    got = quant_act_t.launch(x, block, fmt, out=out)
    assert got[0] is out[0] and got[1] is out[1]
    return got


def _same(got, want):
    assert_same_bits(got[0], want[0], "q_t")
    assert_same_bits(got[1], want[1], "s_t")


CASES = {  # (M, K), block
    "aligned": ((256, 128), 128),
    "ragged-both": ((300, 200), 128),
    "few-tokens": ((5, 130), 128),
    "block32": ((70, 96), 32),
    "block100": ((230, 40), 100),  # a block that is not a power of two
}


@pytest.mark.parametrize("fmt", FMTS, ids=FMT_IDS)
@pytest.mark.parametrize("case", list(CASES))
def test_quant_act_t_bit_exact(case, fmt, device):
    shape, block = CASES[case]
    x = wide_tokens(shape, torch.bfloat16, device)
    got = _poisoned(x, block, fmt)
    _same(got, ref.quant_act_t(x, block, fmt))
    _same(got, ref.quant_act(x.t().contiguous(), block, fmt))  # the definition


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64], ids=["fp16", "fp32", "fp64"])
def test_quant_act_t_other_dtypes_strided_input_and_config(dtype, device):
    x = wide_tokens((160, 200), dtype, device).t()  # (200, 160), strides (1, 200)
    _same(quant_act_t(x), ref.quant_act_t(x))
    _same(quant_act_t.launch(x, config={"BLOCK_K": 32}), ref.quant_act_t(x))


@pytest.mark.filterwarnings("ignore:(invalid value|overflow) encountered:RuntimeWarning")  # numpy on inf/NaN
@pytest.mark.parametrize("fmt", FMTS, ids=FMT_IDS)
def test_quant_act_t_special_values_as_documented(fmt, device):
    """Per token block (one column, B rows): zeros -> finite scale; NaN -> NaN scale; ±inf -> inf
    scale, NaN at the inf and ±0 elsewhere; values of +-448·scale exactly."""
    x = torch.randn(256, 192, device=device, dtype=torch.bfloat16)
    x[:128, 0] = 0.0
    x[5, 1] = float("nan")
    x[200, 2] = float("-inf")
    x[130, 130:] = 448.0
    x[3, 100] = 1e-30
    q_t, s_t = _poisoned(x, 128, fmt)
    _same((q_t, s_t), ref.quant_act_t(x, 128, fmt))
    assert torch.isfinite(s_t[0, 0]) and (q_t[0, :128].float() == 0).all()
    assert s_t[1, 0].isnan() and torch.isfinite(s_t[1, 1]) and s_t[2, 1] == float("inf")
    assert q_t[2, 200].float().isnan() and (q_t[2, 128:200].float() == 0).all()
    assert dequant(q_t, s_t)[1, :128].isnan().all()


def test_quant_act_t_empty_and_bad_inputs(device):
    for shape in [(0, 256), (3, 0)]:
        q_t, s_t = quant_act_t(torch.randn(shape, device=device))
        w_t, ws_t = ref.quant_act_t(torch.randn(shape, device=device))
        assert q_t.shape == w_t.shape and s_t.shape == ws_t.shape
    x = torch.randn(4, 256, device=device)
    for op in (quant_act_t, ref.quant_act_t):
        with pytest.raises(ValueError, match="x: expected a 2-D tensor"):
            op(x[None])
        with pytest.raises(TypeError, match="x: expected dtype"):
            op(x.to(torch.int32))
        with pytest.raises(ValueError, match="scale_fmt"):
            op(x, 128, "e5m2")
    with pytest.raises(ValueError, match="block: the Triton quant_act_t kernel takes blocks up to 256"):
        quant_act_t(x, 512)
    torch.library.opcheck(torch.ops.moela.quant_act_t.default, (x,), test_utils=("test_faketensor",))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4096, 7168), (32768, 2048), (4095, 4096)], ids=["x", "expert-act", "ragged"])
@pytest.mark.parametrize("fmt", FMTS, ids=FMT_IDS)
def test_gpu_quant_act_t_bit_exact_at_deepseek_shapes(shape, fmt):
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    _same(_poisoned(x, 128, fmt), ref.quant_act_t(x, 128, fmt))
