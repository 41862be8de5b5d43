"""grouped_gemm reference: per-group matmul, empty groups, errors."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moela.reference import grouped_gemm, grouped_gemm_dw


def _offsets(sizes):
    return torch.tensor(sizes).cumsum(0).to(torch.int32)


@pytest.mark.parametrize("sizes", [[3, 0, 5, 1], [0, 0, 7], [7], [0, 4, 0], [2, 3, 5, 7, 11]],
                         ids=["ragged", "leading-empty", "single", "middle-only", "prime"])
def test_grouped_gemm_is_per_group_matmul(sizes):
    E, N, K = len(sizes), 13, 17
    M = sum(sizes) + 2  # two rows past the last group: they belong to no group
    xs = torch.randn(M, K, dtype=torch.float64)
    w = torch.randn(E, N, K, dtype=torch.float64)
    out = grouped_gemm(xs, w, _offsets(sizes))
    start = 0
    for e, n in enumerate(sizes):
        torch.testing.assert_close(out[start:start + n], xs[start:start + n] @ w[e].T, rtol=1e-14, atol=1e-14)
        start += n
    assert (out[start:] == 0).all()


def test_grouped_gemm_empty_and_low_precision():
    w = torch.randn(3, 4, 8, dtype=torch.bfloat16)
    out = grouped_gemm(torch.empty(0, 8, dtype=torch.bfloat16), w, torch.zeros(3, dtype=torch.int32))
    assert out.shape == (0, 4)
    xs = torch.randn(6, 8, dtype=torch.bfloat16)
    out = grouped_gemm(xs, w, _offsets([2, 2, 2]))
    # float32 accumulation, one rounding to bf16 at the end
    ref = (xs[2:4].float() @ w[1].float().T).bfloat16()
    assert out.dtype == torch.bfloat16 and torch.equal(out[2:4], ref)


def test_grouped_gemm_rejects_bad_input():
    xs, w, off = torch.randn(5, 8), torch.randn(2, 3, 8), _offsets([2, 3])
    with pytest.raises(ValueError, match="xs"):
        grouped_gemm(torch.randn(5, 7), w, off)
    with pytest.raises(TypeError, match="w"):
        grouped_gemm(xs, w.double(), off)
    with pytest.raises(ValueError, match="offsets"):
        grouped_gemm(xs, w, _offsets([2, 3, 0]))
    with pytest.raises(TypeError, match="offsets"):
        grouped_gemm(xs, w, off.float())
    for bad in ([3, 2], [2, 6], [-1, 4]):  # decreasing, past M, negative: raised with validate=True
        with pytest.raises(ValueError, match="offsets: expected non-decreasing"):
            grouped_gemm(xs, w, torch.tensor(bad, dtype=torch.int32), validate=True)


def test_grouped_gemm_malformed_offsets_follow_the_clamping_rule():
    """Without validate: ends clamped into [0, M], then a running max (a group ending before its
    predecessor is empty), the rule the kernels follow; int64 ends are clamped before narrowing."""
    xs, w = torch.randn(5, 8, dtype=torch.float64), torch.randn(3, 4, 8, dtype=torch.float64)
    for bad, good in (([3, 2, 5], [3, 3, 5]), ([-1, 2, 9], [0, 2, 5]), ([2**32 + 3, 1, 2], [5, 5, 5])):
        out = grouped_gemm(xs, w, torch.tensor(bad, dtype=torch.int64))
        assert torch.equal(out, grouped_gemm(xs, w, torch.tensor(good, dtype=torch.int64), validate=True)), bad


@given(sizes=st.lists(st.integers(0, 9), min_size=1, max_size=9), N=st.integers(1, 20), K=st.integers(1, 20))
def test_grouped_gemm_properties(sizes, N, K):
    E, M = len(sizes), sum(sizes)
    xs = torch.randn(M, K, dtype=torch.float64)
    w = torch.randn(E, N, K, dtype=torch.float64)
    out = grouped_gemm(xs, w, _offsets(sizes))
    group = torch.repeat_interleave(torch.arange(E), torch.tensor(sizes))  # group of each row
    expected = torch.einsum("mk,mnk->mn", xs, w[group])
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_grouped_gemm_dw_is_the_autograd_weight_gradient():
    sizes = [3, 0, 5, 2]
    E, N, K, M = len(sizes), 6, 7, sum(sizes) + 1
    xs = torch.randn(M, K, dtype=torch.float64)
    w = torch.randn(E, N, K, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(M, N, dtype=torch.float64)
    grouped_gemm(xs, w, _offsets(sizes)).backward(dy)
    dw = grouped_gemm_dw(xs, dy, _offsets(sizes))
    torch.testing.assert_close(dw, w.grad, rtol=1e-13, atol=1e-13)
    assert (dw[1] == 0).all()
    with pytest.raises(ValueError, match="dy"):
        grouped_gemm_dw(xs, dy[1:], _offsets(sizes))


def test_grouped_gemm_masked_is_per_expert_matmul_of_the_first_rows():
    """Rows r < masked_m[e] of expert e use w[e]; the rows past it are zeros, whatever x holds
    there; masked_m is clamped into [0, max_m]; validate=True raises on it instead."""
    from moela.reference import grouped_gemm_masked

    E, max_m, N, K = 4, 6, 5, 7
    x = torch.randn(E, max_m, K, dtype=torch.float64)
    w = torch.randn(E, N, K, dtype=torch.float64)
    masked_m = torch.tensor([3, 0, 9, -2], dtype=torch.int32)  # 9 and -2 clamp to 6 and 0
    x[0, 3:] = float("nan")
    out = grouped_gemm_masked(x, w, masked_m)
    assert out.shape == (E, max_m, N)
    for e, rows in enumerate([3, 0, 6, 0]):
        torch.testing.assert_close(out[e, :rows], x[e, :rows] @ w[e].T, rtol=1e-14, atol=1e-14)
        assert (out[e, rows:] == 0).all()
    with pytest.raises(ValueError, match="masked_m"):
        grouped_gemm_masked(x, w, masked_m, validate=True)
    grouped_gemm_masked(x, w, masked_m.clamp(0, max_m), validate=True)
    for bad, name in [((x[:, :, :3], w, masked_m), "x"), ((x, w[:3], masked_m), "x"),
                      ((x, w, masked_m[:3]), "masked_m"), ((x, w, masked_m.float()), "masked_m"),
                      ((x, w.float(), masked_m), "w")]:
        with pytest.raises((ValueError, TypeError), match=name):
            grouped_gemm_masked(*bad)
