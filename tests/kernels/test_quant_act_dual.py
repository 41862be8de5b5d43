"""kernels.quant_act_dual bit for bit against reference.quant_act_dual: both quantizations
(``quant_act`` and ``quant_act_t``) from one read.

CPU: the interpreter with the compatibility layer, small ragged shapes, outputs pre-filled with
NaN (any strides, column-major 1×B scales), exact comparison. GPU tier: DeepSeek shapes.
"""

from __future__ import annotations

import math

import pytest
import torch
from fp8_testing import assert_same_bits
from moela_testing import nan_empty

from moela import reference as ref
from moela.kernels import quant_act_dual
from moela.kernels.fp8_quant import FP8_DTYPE, empty_col_major_scales

FMTS = [None, "ue8m0"]
FMT_IDS = ["f32-scale", "ue8m0"]
NAMES = ("q", "s", "q_t", "s_t")


def _wide(shape, dtype, device):
    """1e-2..1e2 along both dims: every 1×B and every B×1 block gets its own scale."""
    M, K = shape
    x = torch.randn(shape, device=device)
    x *= torch.logspace(-2, 2, M, device=device)[:, None] * torch.logspace(2, -2, K, device=device)[None, :]
    return x.to(dtype)


def _poisoned(x, block=128, fmt=None, s=None):
    M, K = x.shape
    out = (nan_empty((M, K), FP8_DTYPE, x.device),
           nan_empty((M, math.ceil(K / block)), torch.float32, x.device) if s is None else s,
           nan_empty((K, M), FP8_DTYPE, x.device), nan_empty((K, math.ceil(M / block)), torch.float32, x.device))
    got = quant_act_dual.launch(x, block, fmt, out=out)
    assert all(g is o for g, o in zip(got, out, strict=True))
    return got


def _same(got, want):
    for name, g, w in zip(NAMES, got, want, strict=True):
        assert_same_bits(g, w, name)


CASES = {  # (M, K), block
    "aligned": ((256, 128), 128),
    "ragged-both": ((300, 200), 128),
    "few-tokens": ((5, 130), 128),
    "block32": ((70, 96), 32),
    "block100": ((230, 40), 100),
}


@pytest.mark.parametrize("fmt", FMTS, ids=FMT_IDS)
@pytest.mark.parametrize("case", list(CASES))
def test_quant_act_dual_bit_exact(case, fmt, device):
    shape, block = CASES[case]
    x = _wide(shape, torch.bfloat16, device)
    got = _poisoned(x, block, fmt)
    _same(got, ref.quant_act_dual(x, block, fmt))
    _same(got, (*ref.quant_act(x, block, fmt), *ref.quant_act_t(x, block, fmt)))  # the definition


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64], ids=["fp16", "fp32", "fp64"])
def test_quant_act_dual_other_dtypes_and_strided_input(dtype, device):
    x = _wide((160, 200), dtype, device).t()  # strides (1, 200)
    _same(quant_act_dual(x), ref.quant_act_dual(x))


@pytest.mark.filterwarnings("ignore:(invalid value|overflow) encountered:RuntimeWarning")  # numpy on inf/NaN
@pytest.mark.parametrize("fmt", FMTS, ids=FMT_IDS)
def test_quant_act_dual_special_values_each_direction_its_own_blocks(fmt, device):
    x = torch.randn(256, 256, device=device, dtype=torch.bfloat16)
    x[:128, 0] = 0.0
    x[5, 1] = float("nan")
    x[200, 130] = float("-inf")
    x[130, 130:] = 448.0
    q, s, q_t, s_t = got = _poisoned(x, 128, fmt)
    _same(got, ref.quant_act_dual(x, 128, fmt))
    assert s[5, 0].isnan() and torch.isfinite(s[5, 1]) and torch.isfinite(s[6, 0])  # row 5's first 1×B block
    assert s_t[1, 0].isnan() and torch.isfinite(s_t[1, 1]) and torch.isfinite(s_t[2, 0])  # column 1's first B×1
    assert s[200, 1] == float("inf") and s_t[130, 1] == float("inf")


def test_quant_act_dual_column_major_scales_empty_and_bad_inputs(device):
    x = _wide((130, 256), torch.bfloat16, device)
    col = empty_col_major_scales(130, 2, device).fill_(float("nan"))  # what fp8_gemm reads fastest
    got = _poisoned(x, s=col)
    assert got[1] is col and col.stride() == (1, 132)  # the column stride padded to 16 bytes
    _same(got, ref.quant_act_dual(x))
    for shape in [(0, 256), (3, 0)]:
        e = torch.randn(shape, device=device)
        for g, w in zip(quant_act_dual(e), ref.quant_act_dual(e), strict=True):
            assert g.shape == w.shape and g.dtype == w.dtype
    for op in (quant_act_dual, ref.quant_act_dual):
        with pytest.raises(ValueError, match="x: expected a 2-D tensor"):
            op(x[None])
        with pytest.raises(TypeError, match="x: expected dtype"):
            op(x.to(torch.int32))
    with pytest.raises(ValueError, match="block: the Triton quant_act_dual kernel takes blocks up to 256"):
        quant_act_dual(x, 512)
    torch.library.opcheck(torch.ops.moela.quant_act_dual.default, (x,), test_utils=("test_faketensor",))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4096, 7168), (32768, 2048), (4095, 4096)], ids=["x", "expert-act", "ragged"])
@pytest.mark.parametrize("fmt", FMTS, ids=FMT_IDS)
def test_gpu_quant_act_dual_bit_exact_at_deepseek_shapes(shape, fmt):
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    _same(_poisoned(x, 128, fmt), ref.quant_act_dual(x, 128, fmt))
