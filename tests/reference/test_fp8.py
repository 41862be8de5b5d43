"""FP8 block quantization and block-scaled GEMMs (DeepSeek's recipe)."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moela.reference import (
    FP8_DTYPE,
    calc_diff,
    dequant,
    fp8,
    fp8_gemm,
    fp8_grouped_gemm,
    fp8_grouped_gemm_masked,
    quant_act,
    quant_weight,
)


def e4m3_bound(x, scale_full):
    """Largest |x - dequant(quant(x))| allowed per element: half an e4m3 ulp of x/scale, times scale.

    e4m3 has 3 mantissa bits: normal values (|y| >= 2^-6) round within |y|·2^-4, subnormals
    within 2^-10 (half of the 2^-9 spacing).
    """
    y = (x.double() / scale_full.double()).abs()
    return scale_full.double() * torch.maximum(y * 2**-4, torch.full_like(y, 2**-10))


def _full_act_scale(s, K, block):
    return s.repeat_interleave(block, -1)[..., :K]


@pytest.mark.parametrize("shape,block", [((4, 256), 128), ((2, 3, 200), 128), ((1, 48), 16), ((5, 7), 4)],
                         ids=["aligned", "3d-ragged", "block16", "tiny-ragged"])
@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_quant_act_round_trip_within_e4m3_bound(shape, block, scale_fmt):
    x = torch.randn(shape) * torch.logspace(-3, 3, shape[-1])  # wide dynamic range across blocks
    q, s = quant_act(x, block, scale_fmt)
    assert q.dtype == FP8_DTYPE and q.shape == x.shape
    assert s.dtype == torch.float32 and s.shape == (*shape[:-1], math.ceil(shape[-1] / block))
    err = (dequant(q, s, block).double() - x.double()).abs()
    assert (err <= e4m3_bound(x, _full_act_scale(s, shape[-1], block))).all()


def test_quant_act_is_deepseeks_formula_bit_for_bit():
    x = torch.randn(3, 384, dtype=torch.bfloat16) * 7
    q, s = quant_act(x)
    for r in range(3):
        for b in range(3):
            blk = x[r, b * 128:(b + 1) * 128].float()
            scale = max(float(blk.abs().max()), 1e-4) / 448.0
            scale_t = (blk.abs().max().clamp_min(1e-4) / 448.0).float()
            assert s[r, b] == scale_t and abs(float(s[r, b]) - scale) <= 1e-7 * scale
            assert torch.equal(q[r, b * 128:(b + 1) * 128].view(torch.uint8),
                               (blk / scale_t).to(FP8_DTYPE).view(torch.uint8))


def test_ue8m0_scales_are_powers_of_two_rounded_up():
    x = torch.randn(16, 512) * torch.logspace(-6, 6, 512)
    for q, s, amax in (
        (*quant_act(x, scale_fmt="ue8m0"), x.abs().unflatten(-1, (4, 128)).amax(-1)),
        (*quant_weight(x, scale_fmt="ue8m0"), x.abs().unflatten(-1, (4, 128)).amax((0, -1)).view(1, 4)),
    ):
        mantissa, _ = torch.frexp(s)
        assert (mantissa == 0.5).all()  # exact powers of two
        assert (s >= amax.clamp_min(1e-4) / 448).all() and (s < 2 * amax.clamp_min(1e-4) / 448).all()
        assert (q.float().abs() <= 448).all()


def test_zero_blocks_give_finite_scales_and_specials_propagate():
    x = torch.zeros(2, 256)
    x[1, 200] = float("inf")
    x[1, 5] = float("nan")
    q, s = quant_act(x)
    assert s[0].isfinite().all() and (s[0] == torch.tensor(1e-4) / 448).all()
    assert (q[0].float() == 0).all()
    d = dequant(q, s)
    assert d[1, :128].isnan().all()  # the NaN block: NaN scale
    assert d[1, 128:].isnan().all()  # the inf block: inf scale -> inf·0 and inf/inf are NaN
    w = torch.zeros(256, 128)
    qw, sw = quant_weight(w)
    assert sw.isfinite().all() and (dequant(qw, sw) == 0).all()


@pytest.mark.parametrize("shape", [(256, 384), (200, 130), (3, 130, 260)], ids=["aligned", "ragged", "experts"])
def test_quant_weight_blocks(shape):
    w = torch.randn(shape) * torch.logspace(-2, 2, shape[-1])
    q, s = quant_weight(w)
    nb, kb = math.ceil(shape[-2] / 128), math.ceil(shape[-1] / 128)
    assert s.shape == (*shape[:-2], nb, kb) and q.shape == w.shape
    for i in range(nb):
        for j in range(kb):
            blk = w[..., i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            torch.testing.assert_close(s[..., i, j], blk.abs().amax((-2, -1)) / 448, rtol=0, atol=0)
    full = s.repeat_interleave(128, -2)[..., : shape[-2], :].repeat_interleave(128, -1)[..., : shape[-1]]
    assert ((dequant(q, s).double() - w.double()).abs() <= e4m3_bound(w, full)).all()


def test_dequant_rejects_mismatched_scales():
    q, s = quant_act(torch.randn(4, 256))
    with pytest.raises(ValueError, match="scale"):
        dequant(q, s[:, :1])
    with pytest.raises(TypeError, match="x"):
        dequant(q.float(), s)
    with pytest.raises(TypeError, match="scale"):
        dequant(q, s.double())
    with pytest.raises(ValueError, match="block"):
        quant_act(torch.randn(4, 256), block=0)
    with pytest.raises(ValueError, match="scale_fmt"):
        quant_act(torch.randn(4, 256), scale_fmt="e8m0")


def emulated_gemm(a, a_s, b, b_s):
    """Dequantize both operands in float64 and multiply: the promotion-free ideal."""
    return dequant(a, a_s).double() @ dequant(b, b_s).double().T


@pytest.mark.parametrize("M,N,K", [(1, 256, 512), (37, 130, 384), (64, 200, 200), (5, 16, 128)],
                         ids=["decode", "ragged-N", "ragged-K", "single-block"])
def test_fp8_gemm_against_dequantized_product(M, N, K):
    a, b = torch.randn(M, K), torch.randn(N, K)
    qa, sa = quant_act(a)
    qb, sb = quant_weight(b)
    out = fp8_gemm(qa, sa, qb, sb, out_dtype=torch.float32)
    ideal = emulated_gemm(qa, sa, qb, sb)
    # float32 block products and accumulation: error of a float32 matmul of these sizes
    f32 = dequant(qa, sa) @ dequant(qb, sb).T
    assert (out.double() - ideal).abs().max() <= 4 * (f32.double() - ideal).abs().max() + 1e-6
    # and DeepGEMM's criterion against the bf16 product of the unquantized inputs
    assert calc_diff(fp8_gemm(qa, sa, qb, sb), (a.bfloat16() @ b.bfloat16().T).float()) < 1e-3


def test_fp8_gemm_promotes_each_k_block_with_its_scales():
    # two K blocks with very different scales: a single global scale would lose block 2
    a = torch.cat([torch.full((2, 128), 1000.0), torch.full((2, 128), 1e-3)], dim=1)
    b = torch.ones(16, 256)
    qa, sa = quant_act(a)
    qb, sb = quant_weight(b)
    out = fp8_gemm(qa, sa, qb, sb, out_dtype=torch.float32)
    torch.testing.assert_close(out, torch.full((2, 16), 128 * (1000.0 + 1e-3)), rtol=1e-6, atol=0)


def test_fp8_grouped_gemm_is_per_group_fp8_gemm():
    sizes, N, K = [3, 0, 6, 1], 136, 256
    E, M = len(sizes), sum(sizes) + 2
    xs = torch.randn(M, K)
    qx, sx = quant_act(xs)
    qw, sw = quant_weight(torch.randn(E, N, K))
    offsets = torch.tensor(sizes).cumsum(0).to(torch.int32)
    out = fp8_grouped_gemm(qx, sx, qw, sw, offsets, out_dtype=torch.float32)
    start = 0
    for e, n in enumerate(sizes):
        rows = slice(start, start + n)
        torch.testing.assert_close(out[rows], fp8_gemm(qx[rows], sx[rows], qw[e], sw[e], torch.float32),
                                   rtol=0, atol=0)
        start += n
    assert (out[start:] == 0).all()


def test_fp8_grouped_gemm_masked_is_the_contiguous_op_on_the_real_rows():
    """The masked layout against an independent formulation: the real rows of each expert packed
    contiguously through fp8_grouped_gemm; every other row zero (also a NaN row past masked_m)."""
    E, max_m, N, K = 4, 6, 136, 256
    counts = [3, 0, 6, 1]
    x = torch.randn(E, max_m, K)
    x[0, 5] = float("nan")  # past masked_m[0]: must not reach the output
    qx, sx = quant_act(x)
    qw, sw = quant_weight(torch.randn(E, N, K))
    masked_m = torch.tensor(counts, dtype=torch.int64)
    out = fp8_grouped_gemm_masked(qx, sx, qw, sw, masked_m, out_dtype=torch.float32)
    rows = torch.cat([torch.arange(m) + e * max_m for e, m in enumerate(counts)])
    packed = fp8_grouped_gemm(qx.flatten(0, 1)[rows], sx.flatten(0, 1)[rows], qw, sw,
                              torch.tensor(counts).cumsum(0).to(torch.int32), out_dtype=torch.float32)
    expected = torch.zeros(E * max_m, N)
    expected[rows] = packed
    assert torch.equal(out.flatten(0, 1), expected)


def test_fp8_grouped_gemm_masked_clamps_counts_or_validates():
    E, max_m, N, K = 3, 4, 128, 128
    qx, sx = quant_act(torch.randn(E, max_m, K))
    qw, sw = quant_weight(torch.randn(E, N, K))
    bad = torch.tensor([-2, 9, 4], dtype=torch.int32)
    clamped = fp8_grouped_gemm_masked(qx, sx, qw, sw, bad, out_dtype=torch.float32)
    assert torch.equal(clamped, fp8_grouped_gemm_masked(qx, sx, qw, sw, torch.tensor([0, 4, 4]), torch.float32))
    with pytest.raises(ValueError, match=r"masked_m: expected row counts in \[0, 4\] \(max_m\), got -2 for expert 0"):
        fp8_grouped_gemm_masked(qx, sx, qw, sw, bad, validate=True)


def test_fp8_gemms_reject_bad_input():
    qa, sa = quant_act(torch.randn(4, 256))
    qb, sb = quant_weight(torch.randn(128, 256))
    with pytest.raises(TypeError, match="a"):
        fp8_gemm(qa.float(), sa, qb, sb)
    with pytest.raises(ValueError, match="a_s"):
        fp8_gemm(qa, sa[:, :1], qb, sb)
    with pytest.raises(ValueError, match="b_s"):
        fp8_gemm(qa, sa, qb, sb.T.contiguous().repeat(2, 1))
    with pytest.raises(ValueError, match="b"):
        fp8_gemm(qa, sa, qb[:, :128], sb)
    qw, sw = quant_weight(torch.randn(2, 128, 256))
    with pytest.raises(ValueError, match="offsets"):
        fp8_grouped_gemm(qa, sa, qw, sw, torch.tensor([3], dtype=torch.int32))
    with pytest.raises(ValueError, match="w_s"):
        fp8_grouped_gemm(qa, sa, qw, sw[:1], torch.tensor([1, 4], dtype=torch.int32))
    qx, sx = quant_act(torch.randn(2, 3, 256))
    masked_m = torch.tensor([1, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"x: expected \(E=2, max_m, K=256\)"):
        fp8_grouped_gemm_masked(qx[:1], sx[:1], qw, sw, masked_m)
    with pytest.raises(ValueError, match=r"x_s: expected shape \(2, 3, 2\)"):
        fp8_grouped_gemm_masked(qx, sx[:, :2], qw, sw, masked_m)
    with pytest.raises(ValueError, match=r"masked_m: expected shape \(2\)"):
        fp8_grouped_gemm_masked(qx, sx, qw, sw, masked_m[:1])
    with pytest.raises(TypeError, match="masked_m: expected dtype int32/int64"):
        fp8_grouped_gemm_masked(qx, sx, qw, sw, masked_m.float())


@given(lead=st.integers(1, 6), kb=st.integers(1, 5), tail=st.integers(0, 15),
       scale_fmt=st.sampled_from([None, "ue8m0"]), log_mag=st.floats(-8, 8))
def test_quant_act_properties(lead, kb, tail, scale_fmt, log_mag):
    K, block = kb * 16 + tail, 16
    x = torch.randn(lead, K) * 10**log_mag
    q, s = quant_act(x, block, scale_fmt)
    assert s.shape == (lead, math.ceil(K / block)) and s.isfinite().all() and (s > 0).all()
    err = (dequant(q, s, block).double() - x.double()).abs()
    assert (err <= e4m3_bound(x, _full_act_scale(s, K, block))).all()


def test_block_scale_is_the_correctly_rounded_quotient_on_every_device(device):
    """scale = amax / 448 rounded once (what the kernels' div_rn computes). torch on CUDA divides
    by a Python scalar as a product with its reciprocal, 1 ulp off for many amaxes; the
    reference must not depend on that."""
    amax = torch.rand(100_000, device=device) * 2.0 ** torch.randint(-10, 20, (100_000,), device=device)
    amax = amax.clamp_min(fp8.AMAX_FLOOR)
    exact = (amax.double() / 448.0).float().cpu()  # float64 quotient: one rounding to float32
    ieee = (amax.cpu() / torch.full((amax.numel(),), 448.0)).view(torch.int32)  # CPU tensor-tensor division
    assert torch.equal(exact.view(torch.int32), ieee)
    got = fp8.block_scale(amax).cpu()
    assert torch.equal(got.view(torch.int32), ieee)
    by_reciprocal = (amax * torch.tensor(1 / 448.0, device=device)).cpu()
    assert not torch.equal(by_reciprocal.view(torch.int32), ieee)  # what the reference must not do
