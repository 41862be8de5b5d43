"""kernels.fp8_quant: quant_act, quant_weight and dequant bit for bit against reference.fp8.

CPU: the Triton interpreter with the compatibility layer (its fp8 casts round to nearest even and
saturate like the GPU), small shapes, outputs pre-filled with NaN. The comparison is exact (bits;
a NaN matches any NaN). GPU tier: DeepSeek shapes, same exactness.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import triton
import triton.language as tl
from fp8_testing import assert_same_bits
from hypothesis import given, settings
from hypothesis import strategies as st
from moela_testing import nan_empty

from moela import reference as ref
from moela.kernels import tl_helpers
from moela.kernels._common import check_fp8_capability
from moela.kernels.fp8_quant import (
    FP8_DTYPE,
    dequant,
    empty_col_major_scales,
    quant_act,
    quant_weight,
    to_col_major,
    to_row_major,
)
from moela.reference.fp8 import block_scale

common = importlib.import_module("moela.kernels._common")
factory = importlib.import_module("moela.kernels.factory")

FMTS = [None, "ue8m0"]
FMT_IDS = ["f32-scale", "ue8m0"]


def _wide(shape, dtype, device):
    """Normal values times 1e-3..1e3 along the last dim: every block gets its own scale."""
    x = torch.randn(shape, device=device) * torch.logspace(-3, 3, shape[-1], device=device)
    return x.to(dtype)


def _quant_act_poisoned(x, block, fmt):
    q = nan_empty(x.shape, FP8_DTYPE, x.device)
    s = nan_empty((*x.shape[:-1], math.ceil(x.shape[-1] / block)), torch.float32, x.device)
    out = quant_act.launch(x, block, fmt, out=(q, s))
    assert out[0] is q and out[1] is s
    return q, s


# ---------------------------------------------------------------------------------- quant_act

ACT_CASES = {  # shape, block
    "aligned": ((4, 256), 128),
    "3d-ragged": ((2, 3, 200), 128),
    "block16": ((1, 48), 16),
    "tiny-ragged": ((5, 7), 4),
    "block100": ((3, 300), 100),  # a block that is not a power of two
}


@pytest.mark.parametrize("fmt", FMTS, ids=FMT_IDS)
@pytest.mark.parametrize("case", list(ACT_CASES))
def test_quant_act_bit_exact_shapes(case, fmt, device):
    shape, block = ACT_CASES[case]
    x = _wide(shape, torch.bfloat16, device)
    q, s = _quant_act_poisoned(x, block, fmt)
    q_ref, s_ref = ref.quant_act(x, block, fmt)
    assert_same_bits(s, s_ref, "scale")
    assert_same_bits(q, q_ref, "q")


@settings(max_examples=15)
@given(
    rows=st.integers(1, 9), K=st.integers(1, 260), block=st.sampled_from([8, 32, 100, 128]),
    dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]), fmt=st.sampled_from(FMTS),
    log_scale=st.floats(-30, 30),
)
def test_quant_act_bit_exact_property(rows, K, block, dtype, fmt, log_scale):
    device = "cuda" if torch.cuda.is_available() else "cpu"  # hypothesis: no fixtures
    x = (torch.randn(rows, K, device=device) * 2.0**log_scale).to(dtype)
    q, s = _quant_act_poisoned(x, block, fmt)
    q_ref, s_ref = ref.quant_act(x, block, fmt)
    assert_same_bits(s, s_ref, "scale")
    assert_same_bits(q, q_ref, "q")


@pytest.mark.parametrize("fmt", FMTS, ids=FMT_IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64], ids=["fp16", "fp32", "fp64"])
def test_quant_act_bit_exact_dtypes(dtype, fmt, device):
    x = _wide((3, 384), dtype, device)
    if dtype != torch.float16:
        x[0, :128] *= 1e20  # beyond fp16 and bf16's fp8 range: large finite scales
        x[1, 128:256] *= 1e-20  # under the amax floor
    q, s = quant_act(x, 128, fmt)  # the public op
    q_ref, s_ref = ref.quant_act(x, 128, fmt)
    assert_same_bits(s, s_ref, "scale")
    assert_same_bits(q, q_ref, "q")


@pytest.mark.filterwarnings("ignore:(invalid value|overflow) encountered:RuntimeWarning")  # numpy on inf/NaN
@pytest.mark.parametrize("fmt", FMTS, ids=FMT_IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_quant_act_special_values_as_documented(dtype, fmt, device):
    """Zeros -> finite scale, ±0 kept; NaN block -> NaN scale; inf block -> inf scale, NaN at the
    inf and ±0 elsewhere; inf and NaN together -> NaN; subnormals and exact ±448·scale values."""
    x = torch.randn(6, 256, device=device).to(dtype)
    x[0] = 0.0
    x[0, 3] = -0.0
    x[1, 5] = float("nan")
    x[1, 200] = float("-inf")
    x[2, 7], x[2, 9] = float("inf"), float("nan")
    x[3, :128] = torch.finfo(dtype).tiny / 4  # subnormal inputs (bf16/fp32)
    x[3, 128:] = 448.0
    x[3, 130] = -448.0
    x[4, :] = torch.finfo(dtype).max
    x[4, 1] = -torch.finfo(dtype).max
    x[5, 64] = 1e-30
    q, s = _quant_act_poisoned(x, 128, fmt)
    q_ref, s_ref = ref.quant_act(x, 128, fmt)
    assert_same_bits(s, s_ref, "scale")
    assert_same_bits(q, q_ref, "q")
    # What the reference documents, spelled out.
    assert torch.isfinite(s[0]).all() and (q[0].float() == 0).all()
    assert q[0, 3].view(torch.uint8) == 0x80  # -0 stays -0
    assert s[1, 0].isnan() and s[1, 1] == float("inf") and s[2, 0].isnan()
    assert q[1, 200].float().isnan() and (q[1, 128:200].float() == 0).all()
    d = dequant(q, s)
    assert d[1].isnan().all() and d[2, :128].isnan().all()


def test_quant_act_empty_and_scale_layouts(device):
    for shape in [(0, 256), (3, 0), (2, 0, 128)]:
        q, s = quant_act(torch.randn(shape, device=device))
        q_ref, s_ref = ref.quant_act(torch.randn(shape, device=device))
        assert q.shape == q_ref.shape and s.shape == s_ref.shape
    x = _wide((5, 384), torch.bfloat16, device)
    _, s_ref = ref.quant_act(x)
    col = empty_col_major_scales(5, 3, device)
    col.fill_(float("nan"))
    q, s = quant_act.launch(x, out=(torch.empty(x.shape, dtype=FP8_DTYPE, device=device), col))
    assert s is col and s.stride() == (1, 8)  # the column stride padded to 16 bytes (TMA)
    assert_same_bits(s, s_ref, "column-major scale")
    assert to_col_major(s_ref).stride() == (1, 8) and torch.equal(to_col_major(s_ref), s_ref)
    assert to_col_major(col) is col
    assert to_row_major(s).is_contiguous() and torch.equal(to_row_major(s), s_ref)
    s3_ref = torch.randn(2, 3, 4)
    s3 = to_col_major(s3_ref)
    assert s3.stride() == (16, 1, 4) and torch.equal(s3, s3_ref)
    with pytest.raises(ValueError, match=r"out\[1\]: its leading dims must flatten"):
        quant_act.launch(torch.randn(3, 2, 256, device=device), out=(
            torch.empty(3, 2, 256, dtype=FP8_DTYPE, device=device), to_col_major(torch.ones(3, 2, 2, device=device))))


# ------------------------------------------------------------------------- ue8m0 and the scale

@triton.jit
def _block_scale_test_kernel(amax_ptr, scale_ptr, n, BLOCK: tl.constexpr, UE8M0: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    amax = tl.load(amax_ptr + offs, mask=offs < n)
    tl.store(scale_ptr + offs, tl_helpers.block_scale(amax, UE8M0), mask=offs < n)


@pytest.mark.parametrize("fmt", FMTS, ids=FMT_IDS)
def test_block_scale_matches_reference_over_every_exponent(fmt, device):
    """Every amax whose scale is within 1300 float32 ulps of a power of two (all exponents), where
    rounding up must be exact, plus random bit patterns over the whole positive range."""
    k = torch.arange(-24, 128, dtype=torch.float64)
    base = (448.0 * torch.exp2(k)).float().view(torch.int32)  # amax with scale ~ 2**k
    swept = (base[:, None] + torch.arange(-16, 1300)[None, :]).flatten().to(torch.int32)
    rand = torch.randint(0, 0x7F800000, (100_000,), dtype=torch.int32)
    amax = torch.cat([swept, rand]).view(torch.float32)
    amax = torch.cat([amax[torch.isfinite(amax)], torch.tensor([0.0, -0.0, float("inf"), float("nan"), 1e-45])])
    amax = amax.to(device)
    scale = torch.full_like(amax, float("nan"))
    BLOCK = 1 << 16
    _block_scale_test_kernel[(triton.cdiv(amax.numel(), BLOCK),)](amax, scale, amax.numel(), BLOCK=BLOCK,
                                                                  UE8M0=fmt == "ue8m0")
    assert_same_bits(scale, block_scale(amax, fmt), "scale")


def test_ue8m0_rounds_up_exactly_where_a_float32_log2_would_not():
    """For a scale a few ulps above 2**20 a float32 log2 rounds to exactly 20 and would keep 2**20,
    leaving values above 448 to saturate; the reference (and the kernel) round up exactly."""
    s = torch.tensor([2.0**20 * (1 + j * 2.0**-23) for j in (0, 1, 5, 6)], dtype=torch.float32)
    amax = (s.double() * 448).float()
    assert torch.equal(amax / 448, s)
    assert torch.ceil(torch.log2(s[1])) == 20  # the float32 log2 shortcut keeps 2**20
    assert block_scale(amax, "ue8m0").tolist() == [2.0**20, 2.0**21, 2.0**21, 2.0**21]


# ------------------------------------------------------------------------------- quant_weight

WEIGHT_CASES = {  # shape, block
    "aligned": ((256, 384), 128),
    "ragged": ((200, 130), 128),
    "experts": ((3, 130, 260), 128),
    "2-lead-dims-block32": ((2, 2, 64, 40), 32),
}


@pytest.mark.parametrize("fmt", FMTS, ids=FMT_IDS)
@pytest.mark.parametrize("case", list(WEIGHT_CASES))
def test_quant_weight_bit_exact(case, fmt, device):
    shape, block = WEIGHT_CASES[case]
    w = (torch.randn(shape, device=device) * torch.logspace(-2, 2, shape[-2], device=device)[:, None]).bfloat16()
    q = nan_empty(shape, FP8_DTYPE, device)
    nb, kb = math.ceil(shape[-2] / block), math.ceil(shape[-1] / block)
    s = nan_empty((*shape[:-2], nb, kb), torch.float32, device)
    quant_weight.launch(w, block, fmt, out=(q, s))
    q_ref, s_ref = ref.quant_weight(w, block, fmt)
    assert_same_bits(s, s_ref, "scale")
    assert_same_bits(q, q_ref, "q")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy on inf/inf
def test_quant_weight_special_values_and_public_op(device):
    w = torch.randn(256, 384, device=device)
    w[:128, :128] = 0.0
    w[5, 200] = float("nan")
    w[130, 300] = float("inf")
    w[200, 10] = 1e30
    q, s = quant_weight(w)
    q_ref, s_ref = ref.quant_weight(w)
    assert_same_bits(s, s_ref, "scale")
    assert_same_bits(q, q_ref, "q")
    assert torch.equal(s[0, 0], block_scale(torch.zeros((), device=device)))
    assert s[0, 1].isnan() and s[1, 2] == float("inf") and torch.isfinite(s[1, 0])


# ------------------------------------------------------------------------------------ dequant

DEQUANT_CASES = {  # values shape, scale shape
    "act-3d": ((2, 3, 200), (2, 3, 2)),
    "weight": ((200, 130), (2, 2)),
    "experts": ((3, 130, 260), (3, 2, 3)),
    "full-size-scale": ((4, 256), (4, 256)),
    "rows-full-block256": ((130, 256), (130, 1)),  # per-row scales, K blocked by 256
    "blocked-leading-dim": ((3, 130, 260), (1, 2, 3)),
    "1-d": ((300,), (3,)),
}


@pytest.mark.parametrize(
    "case,out_dtype",
    [(c, torch.float32) for c in DEQUANT_CASES] + [("act-3d", torch.bfloat16), ("weight", torch.float16)],
    ids=[f"{c}-fp32" for c in DEQUANT_CASES] + ["act-3d-bf16", "weight-fp16"],
)
def test_dequant_bit_exact(case, out_dtype, device):
    shape, sshape = DEQUANT_CASES[case]
    block = 256 if case == "rows-full-block256" else 128
    x = (torch.randn(shape, device=device) * 100).to(FP8_DTYPE)
    scale = torch.rand(sshape, device=device) * 1e-2 + 1e-3
    scale.view(-1)[0] = float("inf")
    scale.view(-1)[-1] = float("nan")
    out = nan_empty(shape, out_dtype, device)
    assert dequant.launch(x, scale, block, out_dtype, out=out) is out
    assert_same_bits(out, ref.dequant(x, scale, block, out_dtype), "dequant")


def test_dequant_of_a_scalar(device):
    """A 0-D value with a 0-D scale, as the reference allows (no (L, N, K) view to unpack)."""
    x = torch.tensor(3.0, device=device).to(FP8_DTYPE)
    scale = torch.tensor(0.25, device=device)
    out = nan_empty((), torch.float32, device)
    assert dequant.launch(x, scale, out=out) is out
    assert_same_bits(out, ref.dequant(x, scale), "dequant")
    assert_same_bits(dequant(x, scale, 128, torch.bfloat16), ref.dequant(x, scale, 128, torch.bfloat16))


def test_dequant_round_trip_of_quant_act(device):
    x = _wide((4, 3, 256), torch.float32, device)
    q, s = quant_act(x)
    assert_same_bits(dequant(q, s, 128, torch.bfloat16), ref.dequant(q, s, 128, torch.bfloat16))


# --------------------------------------------------------------------------- 64-bit offsets

_S = 2**30  # a row or column stride that puts element 2 of a dim 2**31 elements away


def _huge_fp8_buffer(device, tmp_path):
    """4 GiB + a page of zero e4m3: on the CPU a sparse file mapped into memory (only the pages a
    test touches take memory or disk), on a GPU plain device memory."""
    n = 4 * _S + 4096
    if device == "cpu":
        path = tmp_path / "huge.bin"
        with open(path, "wb") as f:
            f.truncate(n)
        return torch.from_file(str(path), shared=True, size=n, dtype=torch.uint8).view(FP8_DTYPE)
    return torch.zeros(n, dtype=torch.uint8, device=device).view(FP8_DTYPE)


def test_element_offsets_past_2_31(device, tmp_path):
    """A matrix spanning more than 2**31 elements (emulated by views with a 2**30 stride placed
    2**31 elements into a 4 GiB buffer): an int32 row · stride or col · stride wraps to the
    start of the buffer, reading zeros there or writing there instead of at the element."""
    buf = _huge_fp8_buffer(device, tmp_path)

    def view(shape, stride):
        return buf.as_strided(shape, stride, storage_offset=2 * _S)

    # dequant reads rows 2**30 apart
    vals = (torch.randn(3, 128, device=device) * 10).to(FP8_DTYPE)
    x = view((3, 128), (_S, 1))
    x.copy_(vals)
    scale = torch.rand(1, 1, device=device) + 0.5
    assert_same_bits(dequant.launch(x, scale), ref.dequant(vals, scale), "dequant")
    # quant_weight writes rows 2**30 apart
    w = torch.randn(3, 128, device=device)
    q = view((3, 128), (_S, 1))
    q.copy_(nan_empty((3, 128), FP8_DTYPE, device))
    quant_weight.launch(w, out=(q, torch.empty(1, 1, device=device)))
    assert_same_bits(q, ref.quant_weight(w)[0], "quant_weight")
    # quant_act writes columns 2**30 apart
    a = torch.randn(2, 3, device=device)
    q = view((2, 3), (1, _S))
    q.copy_(nan_empty((2, 3), FP8_DTYPE, device))
    quant_act.launch(a, out=(q, torch.empty(2, 1, device=device)))
    assert_same_bits(q, ref.quant_act(a)[0], "quant_act")
    assert (buf[:4096].view(torch.uint8) == 0).all(), "a wrapped offset wrote to the start of the buffer"


# ------------------------------------------------------------------------------------- errors

def test_bad_inputs_raise_naming_the_argument(device):
    x = torch.randn(4, 256, device=device)
    with pytest.raises(TypeError, match="x: expected dtype"):
        quant_act(x.int())
    with pytest.raises(TypeError, match="x: expected dtype"):
        quant_act(x.to(FP8_DTYPE))
    with pytest.raises(ValueError, match="block: expected a positive int"):
        quant_act(x, 0)
    with pytest.raises(ValueError, match="scale_fmt: expected one of None, 'ue8m0'"):
        quant_act(x, 128, "e8m0")
    with pytest.raises(ValueError, match="x: expected at least 1 dimension"):
        quant_act(torch.tensor(1.0, device=device))
    q_buf = torch.empty(4, 256, dtype=FP8_DTYPE, device=device)
    with pytest.raises(TypeError, match=r"out\[1\]: expected dtype torch.float32"):
        quant_act.launch(x, out=(q_buf, torch.empty(4, 2, dtype=torch.float16, device=device)))
    with pytest.raises(ValueError, match=r"out\[0\]: expected shape \(4, 256\)"):
        quant_act.launch(x, out=(torch.empty(4, 128, dtype=FP8_DTYPE, device=device), torch.empty(4, 2, device=device)))
    with pytest.raises(ValueError, match="w: expected at least 2 dimensions"):
        quant_weight(torch.randn(256, device=device))
    with pytest.raises(ValueError, match="scale_fmt"):
        quant_weight(x, 128, "fp32")
    q, s = quant_act(x)
    with pytest.raises(ValueError, match=r"scale: dim 1 has 3 entries; expected 256 or ceil\(256/128\)=2"):
        dequant(q, torch.ones(4, 3, device=device))
    with pytest.raises(ValueError, match="scale: expected 2 dims"):
        dequant(q, torch.ones(2, device=device))
    with pytest.raises(TypeError, match="scale: expected dtype float32"):
        dequant(q, s.half())
    with pytest.raises(TypeError, match="x: expected dtype float8_e4m3fn"):
        dequant(x, s)
    with pytest.raises(TypeError, match="out_dtype"):
        dequant(q, s, 128, torch.int32)
    with pytest.raises(ValueError, match="scale: expected device"):
        dequant(q, s.to("meta"))  # the meta (fake) kernel runs: it must check too


def test_fp8_capability_check(monkeypatch):
    caps = {}
    monkeypatch.setattr(common, "_device_capability", lambda device: caps["cap"])
    cuda = torch.device("cuda", 0)
    for ok in [(8, 9), (9, 0), (10, 0)]:
        caps["cap"] = ok
        check_fp8_capability("quant_act", cuda)
    caps["cap"] = (8, 0)
    with pytest.raises(RuntimeError, match=r"quant_act: .*compute capability >= 8\.9.*sm_80"):
        check_fp8_capability("quant_act", cuda)
    check_fp8_capability("quant_act", torch.device("cpu"))  # the interpreter emulates fp8


def test_every_quant_launcher_checks_the_capability(monkeypatch, device):
    def refuse(name, dev):
        raise RuntimeError(f"{name}: old GPU")

    monkeypatch.setattr(factory, "check_fp8_capability", refuse)
    factory.forget_checked()  # signatures checked before this test were checked with the real capability
    x = torch.randn(4, 256, device=device)
    q, s = ref.quant_act(x)
    for call in (lambda: quant_act(x), lambda: quant_weight(x), lambda: dequant(q, s)):
        with pytest.raises(RuntimeError, match="old GPU"):
            call()


def test_fakes_raise_the_launchers_errors(device):
    """Tracing (torch.compile) runs the fakes first: they raise the launchers' named errors, not a
    ZeroDivisionError or an unpacking error."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(4, 256, device=device)
        with pytest.raises(ValueError, match="block: expected a positive int"):
            quant_act(x, 0)
        with pytest.raises(ValueError, match="block: expected a positive int"):
            quant_weight(x, 0)
        with pytest.raises(ValueError, match="w: expected at least 2 dimensions"):
            quant_weight(x[0])
        with pytest.raises(ValueError, match="x: expected at least 1 dimension"):
            quant_act(x[0, 0])


def test_ops_have_fake_implementations(device):
    x = torch.randn(2, 3, 256, device=device, dtype=torch.bfloat16)
    # (opcheck's test_schema multiplies fp8 tensors, which torch cannot do on the CPU)
    torch.library.opcheck(torch.ops.moela.quant_act.default, (x, 128, "ue8m0"), test_utils=("test_faketensor",))
    torch.library.opcheck(torch.ops.moela.quant_weight.default, (x, 128, None), test_utils=("test_faketensor",))
    q, s = ref.quant_act(x)
    torch.library.opcheck(torch.ops.moela.dequant.default, (q, s, 128, torch.bfloat16), test_utils=("test_faketensor",))


# ------------------------------------------------------------------------------------ GPU tier

@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FMTS, ids=FMT_IDS)
@pytest.mark.parametrize("shape", [(4096, 7168), (1, 7168), (16384, 2048), (8, 512, 7168)], ids=str)
def test_gpu_quant_act_bit_exact_at_deepseek_shapes(shape, fmt):
    x = _wide(shape, torch.bfloat16, "cuda")
    x.view(-1)[123] = float("nan")
    x.view(-1)[-7] = float("inf")
    q, s = _quant_act_poisoned(x, 128, fmt)
    q_ref, s_ref = ref.quant_act(x, 128, fmt)
    assert_same_bits(s, s_ref, "scale")
    assert_same_bits(q, q_ref, "q")


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(7168, 2048), (2112, 7168), (8, 4096, 7168)], ids=str)
def test_gpu_quant_weight_and_dequant_bit_exact(shape):
    w = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    q, s = quant_weight(w)
    q_ref, s_ref = ref.quant_weight(w)
    assert_same_bits(s, s_ref, "scale")
    assert_same_bits(q, q_ref, "q")
    assert_same_bits(dequant(q, s, 128, torch.bfloat16), ref.dequant(q, s, 128, torch.bfloat16), "dequant")

