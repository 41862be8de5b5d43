"""The test helpers themselves: poisoned buffers, the derived-tolerance rule, the seed fixture."""

from __future__ import annotations

import moela_testing
import pytest
import torch
from moela_testing import FP8_DTYPES, assert_close_derived, nan_empty, nan_like


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, *FP8_DTYPES])
def test_nan_empty_floats_are_nan(dtype: torch.dtype) -> None:
    t = nan_empty((3, 5), dtype)
    assert t.shape == (3, 5) and t.dtype == dtype
    assert t.float().isnan().all()


@pytest.mark.parametrize(
    ("dtype", "fill"),
    [(torch.int32, -1), (torch.int64, -1), (torch.int8, -1), (torch.uint8, 255), (torch.bool, True)],
)
def test_nan_empty_integers_hold_the_sentinel(dtype: torch.dtype, fill: int) -> None:
    t = nan_empty(7, dtype)
    assert t.shape == (7,) and (t == fill).all()


def test_nan_like_keeps_shape_dtype_device() -> None:
    ref = torch.zeros(2, 3, dtype=torch.bfloat16)
    t = nan_like(ref)
    assert (t.shape, t.dtype, t.device) == (ref.shape, ref.dtype, ref.device) and t.isnan().all()


def _matmul_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    a, b = torch.randn(64, 96).to(torch.bfloat16), torch.randn(96, 32).to(torch.bfloat16)
    ref_hi = a.double() @ b.double()
    ref_lo = a @ b  # torch in bf16
    return ref_hi, ref_lo, (a.float() @ b.float()).to(torch.bfloat16)


def test_assert_close_derived_accepts_a_correct_result() -> None:
    ref_hi, ref_lo, out = _matmul_case()
    err_out, err_lo = assert_close_derived(out, ref_hi, ref_lo, name="matmul")
    assert 0 < err_lo and err_out <= 2 * err_lo + torch.finfo(torch.bfloat16).eps * ref_hi.abs().max()


def test_assert_close_derived_rejects_a_wrong_result() -> None:
    ref_hi, ref_lo, out = _matmul_case()
    out = out.clone()
    out[3, 4] += 1.0
    with pytest.raises(AssertionError, match=r"matmul: .*exceeds 2 x .*worst at \(3, 4\)"):
        assert_close_derived(out, ref_hi, ref_lo, name="matmul")


def test_assert_close_derived_rejects_nan_and_shape_mismatch() -> None:
    ref_hi, ref_lo, out = _matmul_case()
    out = out.clone()
    out[1, 2] = float("nan")  # e.g. an element the kernel never wrote into a nan_empty buffer
    with pytest.raises(AssertionError, match=r"1 of 2048 elements of out are NaN \(first at \(1, 2\)\)"):
        assert_close_derived(out, ref_hi, ref_lo)
    with pytest.raises(AssertionError, match="shape mismatch"):
        assert_close_derived(out[:-1], ref_hi, ref_lo)


def test_assert_close_derived_floor_covers_an_exact_torch_result() -> None:
    ref_hi = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    lo = ref_hi.to(torch.bfloat16)  # torch is exact here: err_lo = 0
    out = lo.clone()
    out[2] = 3.0 + 2.0**-6  # one bf16 ulp off at |x| = 3
    assert_close_derived(out, ref_hi, lo)
    with pytest.raises(AssertionError):
        assert_close_derived(out, ref_hi, lo, floor=0.0)


def test_requires_sm_is_lazy_and_false_without_cuda() -> None:
    mark = moela_testing.requires_sm(9, 0)
    assert isinstance(mark.args[0], str)  # evaluated by pytest at setup, not at import
    if not torch.cuda.is_available():
        assert not moela_testing.is_sm_at_least(9, 0)


@moela_testing.requires_sm(9, 0)
def test_requires_sm_skips_on_cpu() -> None:
    assert torch.cuda.is_available()


@pytest.mark.gpu
def test_gpu_marker_skips_on_cpu(device: str) -> None:
    assert device == "cuda"


def test_seed_is_stable_per_test(seed: int, request: pytest.FixtureRequest) -> None:
    assert seed == moela_testing.seed_for(request.node.nodeid)
    first = torch.rand(3)
    torch.manual_seed(seed)
    assert torch.equal(first, torch.rand(3))
