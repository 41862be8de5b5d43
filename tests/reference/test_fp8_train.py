"""reference.fp8_train: the FP8 training GEMMs against independent formulations.

- quant_act_t round-trips within e4m3's half ulp per B×1 block; quant_act_dual is the pair.
- fp8_dgrad / fp8_wgrad equal the float64 product of the dequantized operands up to the float32
  promotion's roundings (one per block and one per accumulation: ``(2 + Kb)·u·mag``).
- fp8_grouped_wgrad: summing the experts' gradients gives the dense wgrad (each token counted
  once, under its block's scale), whatever the group boundaries.
- fp8_grouped_dgrad: row by row the dense dgrad of the row's expert.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moela.reference import (
    calc_diff,
    dequant,
    fp8_dgrad,
    fp8_grouped_dgrad,
    fp8_grouped_wgrad,
    fp8_wgrad,
    quant_act,
    quant_act_dual,
    quant_act_t,
    quant_weight,
)

U = 2.0**-24


def _within_promotion(out, exact, mag, num_blocks):
    bound = (2 + num_blocks) * U * mag + 1e-30
    assert ((out.double() - exact).abs() <= bound).all()


@given(M=st.integers(1, 300), K=st.integers(1, 70), block=st.sampled_from([16, 128]),
       fmt=st.sampled_from([None, "ue8m0"]))
def test_quant_act_t_round_trip_and_dual(M, K, block, fmt):
    x = torch.randn(M, K) * torch.logspace(-3, 3, M)[:, None]
    q_t, s_t = quant_act_t(x, block, fmt)
    assert q_t.shape == (K, M) and s_t.shape == (K, -(-M // block))
    y = x.t().double() / s_t.repeat_interleave(block, 1)[:, :M].double()
    err = (dequant(q_t, s_t, block).double() - x.t().double()).abs()
    assert (err <= s_t.repeat_interleave(block, 1)[:, :M].double() * torch.maximum(y.abs() * 2**-4,
                                                                                    torch.full_like(y, 2**-10))).all()
    q, s, q_t2, s_t2 = quant_act_dual(x, block, fmt)
    assert torch.equal(q_t2.view(torch.uint8), q_t.view(torch.uint8)) and torch.equal(s_t2, s_t)
    q1, s1 = quant_act(x, block, fmt)
    assert torch.equal(q.view(torch.uint8), q1.view(torch.uint8)) and torch.equal(s, s1)


@pytest.mark.parametrize("M,N,K", [(5, 200, 130), (64, 128, 256)])
def test_dgrad_and_wgrad_are_products_of_the_dequantized_operands(M, N, K):
    dy, x, w = torch.randn(M, N), torch.randn(M, K), torch.randn(N, K) * N**-0.5
    dq, ds = quant_act(dy)
    wq, ws = quant_weight(w)
    dyd, wd = dequant(dq, ds).double(), dequant(wq, ws).double()
    _within_promotion(fp8_dgrad(dq, ds, wq, ws, torch.float32), dyd @ wd, dyd.abs() @ wd.abs(), -(-N // 128))
    a, a_s = quant_act_t(dy)
    b, b_s = quant_act_t(x)
    ad, bd = dequant(a, a_s).double(), dequant(b, b_s).double()
    _within_promotion(fp8_wgrad(a, a_s, b, b_s), ad @ bd.T, ad.abs() @ bd.abs().T, -(-M // 128))
    assert calc_diff(fp8_wgrad(a, a_s, b, b_s), dy.T @ x) < 1e-3


@pytest.mark.parametrize("sizes", [[50, 0, 120, 90], [128, 256], [300], [0, 0]])
def test_grouped_wgrad_experts_sum_to_the_dense_wgrad(sizes):
    M = sum(sizes)
    dy, x = torch.randn(M, 40), torch.randn(M, 24)
    a, a_s = quant_act_t(dy)
    b, b_s = quant_act_t(x)
    offsets = torch.tensor(sizes).cumsum(0)
    dw = fp8_grouped_wgrad(a, a_s, b, b_s, offsets)
    assert dw.shape == (len(sizes), 40, 24)
    dense = fp8_wgrad(a, a_s, b, b_s)
    mag = fp8_wgrad(a.float().abs().to(a.dtype), a_s, b.float().abs().to(b.dtype), b_s)
    assert ((dw.sum(0).double() - dense.double()).abs() <= (4 + 2 * len(sizes) + M / 64) * U * mag.double()).all()


def test_grouped_dgrad_is_the_dense_dgrad_of_each_rows_expert():
    sizes, tail = [3, 0, 9], 2
    dy, w = torch.randn(sum(sizes) + tail, 130), torch.randn(3, 130, 64)
    dq, ds = quant_act(dy)
    wq, ws = quant_weight(w)
    out = fp8_grouped_dgrad(dq, ds, wq, ws, torch.tensor(sizes).cumsum(0), torch.float32)
    assert torch.equal(out[:3], fp8_dgrad(dq[:3], ds[:3], wq[0], ws[0], torch.float32))
    assert torch.equal(out[3:12], fp8_dgrad(dq[3:12], ds[3:12], wq[2], ws[2], torch.float32))
    assert (out[12:] == 0).all()
