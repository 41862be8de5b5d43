"""The interpreter compatibility layer: each patched bug exists without it and is gone with it.

Every case runs a tiny kernel twice: with the layer (the result must equal torch's conversion
or matmul exactly) and inside ``compat_disabled()`` (the result must differ: the bug is real
and the patch is what fixes it).
"""

from __future__ import annotations

import types

import pytest
import torch
import triton
import triton.language as tl

from moela.kernels import interpreter as compat
from moela.kernels.interpreter import compat_disabled, compat_installed, interpreter_active

pytestmark = pytest.mark.skipif(
    not interpreter_active(), reason="checks the Triton interpreter; kernels are compiled on this machine"
)


@triton.jit
def _cast_kernel(x_ptr, y_ptr, N: tl.constexpr):
    """y = x converted to y's dtype (round to nearest even). grid: (1,)"""
    offs = tl.arange(0, N)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs).to(y_ptr.dtype.element_ty))


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    """c (M, N) fp32 = a (M, K) @ b (K, N), one tile. grid: (1,)"""
    rm, rn, rk = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    a = tl.load(a_ptr + rm[:, None] * K + rk[None, :])
    b = tl.load(b_ptr + rk[:, None] * N + rn[None, :])
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], tl.dot(a, b))


@triton.jit
def _bf16_arith_kernel(x_ptr, y_ptr, out_ptr, N: tl.constexpr, SCALAR: tl.constexpr):
    """out rows: x + y, x * y, x - y, fma(x, y, x), -x, 2 * x (x if not SCALAR), sum(x); bf16.
    grid: (1,)"""
    offs = tl.arange(0, N)
    x, y = tl.load(x_ptr + offs), tl.load(y_ptr + offs)
    tl.store(out_ptr + 0 * N + offs, x + y)
    tl.store(out_ptr + 1 * N + offs, x * y)
    tl.store(out_ptr + 2 * N + offs, x - y)
    tl.store(out_ptr + 3 * N + offs, tl.fma(x, y, x))
    tl.store(out_ptr + 4 * N + offs, -x)
    if SCALAR:
        tl.store(out_ptr + 5 * N + offs, x * 2.0)
    else:
        tl.store(out_ptr + 5 * N + offs, x)
    tl.store(out_ptr + 6 * N + offs, tl.sum(x, axis=0) + tl.zeros_like(x))


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    y = torch.empty(x.shape, dtype=dtype)
    _cast_kernel[(1,)](x, y, x.numel())
    return y


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def _nvidia_fp8(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What ``cvt.rn.satfinite`` gives: round to nearest even, clamp to +-max, NaN stays NaN."""
    fmax = torch.finfo(dtype).max
    return x.float().clamp(-fmax, fmax).to(dtype)


def _fp8_inputs(src: torch.dtype) -> torch.Tensor:
    special = torch.tensor(
        [31.9, -31.9, 0.3, 447.0, 448.0, 464.0, 500.0, -1e4, 6e4, 1e6, float("nan"), float("inf"),
         -float("inf"), 2.0**-9, 3 * 2.0**-10, 2.0**-20, 0.0, -0.0, 17.0, 239.9, 1.0 - 2.0**-10]
    )  # fmt: skip
    x = torch.cat([special, torch.randn(64) * 10, torch.randn(43) * 300])
    return x.to(src)


@pytest.mark.parametrize("dst", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("src", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_fp8_store_rounds_and_saturates(src: torch.dtype, dst: torch.dtype) -> None:
    x = _fp8_inputs(src)
    want = _nvidia_fp8(x, dst)
    got = _cast(x, dst)
    wrong = _bits(got) != _bits(want)
    assert not wrong.any(), f"{x[wrong].tolist()} -> {got[wrong].float().tolist()}, want {want[wrong].float().tolist()}"
    fmax = torch.finfo(dst).max
    assert got[0].item() == 32.0  # 31.9 (31.875 in bf16) carries into the next binade
    assert got[9].item() == fmax and got[11].item() == fmax and got[12].item() == -fmax  # 1e6, +-inf
    if dst == torch.float8_e4m3fn:
        assert got[4:8].float().tolist() == [448.0, 448.0, 448.0, -448.0]  # 448, 464, 500, -1e4
    assert got[10].float().isnan()
    with compat_disabled():
        buggy = _cast(x, dst)
    assert not torch.equal(_bits(buggy), _bits(want)), "the unpatched interpreter should round fp8 wrongly"


def test_fp8_carry_without_compat_loses_exponent() -> None:
    """triton 3.6 interpreter: 31.9 -> e4m3 gives 16 (the mantissa carry is dropped)."""
    x = torch.full((16,), 31.9)
    with compat_disabled():
        assert _cast(x, torch.float8_e4m3fn)[0].item() == 16.0
    assert _cast(x, torch.float8_e4m3fn)[0].item() == 32.0


@pytest.mark.parametrize("dst", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fp32_downcast_rounds_to_nearest_even(dst: torch.dtype) -> None:
    # 0.3: truncation and rounding differ; 1 + 3*2^-8 is a tie (bf16) that goes to the even 1 + 2^-6.
    special = torch.tensor([0.3, -0.3, 1 + 3 * 2.0**-8, 1 + 2.0**-8, 1 + 3 * 2.0**-11, 3.4e38, 7e4, 1e-40,
                            float("nan"), float("inf"), -0.0])  # fmt: skip
    x = torch.cat([special, torch.randn(117)])
    got = _cast(x, dst)
    want = x.to(dst)
    assert torch.equal(got.isnan(), want.isnan())
    ok = ~want.isnan()
    assert torch.equal(_bits(got)[ok], _bits(want)[ok])
    if dst == torch.bfloat16:
        assert got[2].item() == 1 + 2.0**-6
        with compat_disabled():
            buggy = _cast(x, dst)
        assert buggy[0].item() == 0.298828125  # truncated; RTNE gives 0.30078125
        assert not torch.equal(_bits(buggy)[ok], _bits(want)[ok])


def test_fp64_and_int_to_bf16() -> None:
    """Casts the interpreter turned into bit reinterpretations (fp64 -> bf16, int -> bf16)."""
    d = torch.cat([torch.tensor([1.5, -2.25, 0.3, 1 + 2.0**-8 + 2.0**-40]), torch.randn(12)]).double()
    assert torch.equal(_bits(_cast(d, torch.bfloat16)), _bits(d.to(torch.bfloat16)))
    i = torch.tensor([1, -2, 3, 1000, 257, -(2**20) - 3] + list(range(10)), dtype=torch.int32)
    assert torch.equal(_cast(i, torch.bfloat16), i.to(torch.bfloat16))
    with compat_disabled():
        assert not torch.equal(_cast(i, torch.bfloat16), i.to(torch.bfloat16))


def test_fp8_nan_upcasts_to_nan() -> None:
    x = torch.tensor([0x7F, 0xFF, 0x38, 0xB8] * 4, dtype=torch.uint8).view(torch.float8_e4m3fn)
    got = _cast(x, torch.float32)
    assert got[:2].isnan().all() and got[2:4].tolist() == [1.0, -1.0]
    with compat_disabled():
        assert _cast(x, torch.float32)[:2].tolist() == [480.0, -480.0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn], ids=["bf16", "e4m3"])
def test_dot_upcasts_narrow_operands(dtype: torch.dtype) -> None:
    M = N = K = 16
    a, b = torch.randn(M, K).to(dtype), torch.randn(K, N).to(dtype)
    c = torch.empty(M, N)
    _dot_kernel[(1,)](a, b, c, M, N, K)
    want = a.float() @ b.float()
    # same fp32 products, summed in another order: K roundings of fp32 at most
    bound = K * torch.finfo(torch.float32).eps * (a.float().abs() @ b.float().abs())
    assert ((c - want).abs() <= bound).all()
    if dtype == torch.bfloat16:  # triton #11584: the interpreter multiplies the raw bit patterns
        with compat_disabled():
            _dot_kernel[(1,)](a, b, c, M, N, K)
        assert not ((c - want).abs() <= bound).all()


def test_bf16_arithmetic() -> None:
    N = 32
    x, y = torch.randn(N).to(torch.bfloat16), torch.randn(N).to(torch.bfloat16)
    out = torch.empty(7, N, dtype=torch.bfloat16)
    _bf16_arith_kernel[(1,)](x, y, out, N, SCALAR=True)
    xf, yf = x.float(), y.float()
    want = torch.stack([x + y, x * y, x - y, (xf * yf + xf).to(torch.bfloat16), -x, x * 2,
                        xf.sum().to(torch.bfloat16).expand(N)])  # fmt: skip
    assert torch.equal(out, want)
    with compat_disabled():
        _bf16_arith_kernel[(1,)](x, y, out, N, SCALAR=False)
        assert not torch.equal(out[0], want[0])  # the bit patterns were added
        with pytest.raises(Exception, match="get_bf16"):  # triton 3.6 has no bf16 constants
            _bf16_arith_kernel[(1,)](x, y, out, N, SCALAR=True)


def test_install_is_idempotent_and_reversible() -> None:
    assert compat_installed()
    assert compat.install_compat() is True
    original = compat._originals.copy()
    assert compat.install_compat() is True and compat._originals == original
    with compat_disabled():
        assert not compat_installed()
        import triton.runtime.interpreter as interp

        assert not hasattr(interp._convert_float, "__wrapped__")
        assert not hasattr(interp.InterpreterBuilder, "get_bf16")
    assert compat_installed()


def test_install_is_a_no_op_without_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not interpreter_active()
    with compat_disabled():
        assert compat.install_compat() is False
        assert not compat_installed()
    for value in ("1", "true", "ON", "yes"):
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert interpreter_active()


def test_unknown_internals_fail_loudly() -> None:
    fake = types.SimpleNamespace(_convert_float=lambda input, input_dtype: None)
    with pytest.raises(RuntimeError, match="internals differ"):
        compat._check_internals(fake)


def test_ineffective_patch_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    """If triton stopped routing dots through create_dot, the probe catches it."""
    with compat_disabled():
        with monkeypatch.context() as m:
            m.setattr(compat, "_make_create_dot", lambda orig, TensorHandle: orig)
            with pytest.raises(RuntimeError, match="bf16 dot"):
                compat.install_compat()
        assert not compat_installed()
    assert compat_installed()
