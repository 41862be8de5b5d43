"""Helpers of the FP8 kernel tests: bit-for-bit comparison and the derived GEMM error bound.

Import as ``import fp8_testing`` (pyproject puts tests/ on the path).

The block-scaled GEMM bound (derived, not tuned). For one output element, with
``S_kb = Σ_{k in block kb} |a_k·b_k|`` and ``mag = Σ_kb |a_s|·|b_s|·S_kb`` (the reference run on
|a|, |b|), the kernel and the reference:

- sum the ``B`` products of a K block, each exact in float32 (e4m3 × e4m3 has 8 significant
  bits), in their own orders: each within ``γ_B(u_dot)·S_kb`` of the exact sum, where
  ``γ_n(u) = n·u / (1 - n·u)`` and u_dot the unit roundoff of the block sum: 2^-24 for a
  float32 sum (the reference, and the interpreter's numpy dot), 2^-13 for Hopper's FP8 tensor
  cores (they keep about 14 bits in the block sum: DeepSeek-V3 report §3.3.2; 2^-13 covers
  truncation);
- scale it with two roundings (reference ``(p·a_s)·b_s``, kernel ``p·(a_s·b_s)``): 2u each;
- add Kb partial products into a float32 accumulator in the same order: at most ``Kb·u·mag``
  each.

So ``|kernel - reference| <= (γ_B(u_dot,kernel) + γ_B(2^-24) + 4u + 2·Kb·u) · mag`` in float32.
A bf16 / fp16 output adds its own rounding: half an ulp, at most 2^-8 (bf16) or 2^-11 (fp16)
of the magnitude. A wrong scale, a skipped block or a shifted row is off by O(mag): far outside.
"""

from __future__ import annotations

import torch

from moela.reference import FP8_DTYPE

__all__ = ["U32", "U_DOT", "PATHS", "abs_fp8", "assert_same_bits", "gemm_error_bound", "assert_gemm_close",
           "record_launches"]

#: The FP8 GEMMs' two paths (``moela.kernels.fp8_mainloop.fp8_path``) and a compute capability
#: that picks each: Hopper's tensor-descriptor kernels, and Ada's (pre-Hopper) pointer kernels.
PATHS = {"tma": (9, 0), "pointer": (8, 9)}

U32 = 2.0**-24
#: Unit roundoff of one K block's dot product: float32 on the CPU, Hopper FP8 MMA on CUDA.
U_DOT = {"cpu": 2.0**-24, "cuda": 2.0**-13}
#: Half an ulp, relative: the rounding of the final cast.
HALF_ULP = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def abs_fp8(t: torch.Tensor) -> torch.Tensor:
    """|t| of an e4m3 tensor (clears the sign bit; torch has no fp8 abs on every device)."""
    return (t.view(torch.uint8) & 0x7F).view(FP8_DTYPE)


def assert_same_bits(out: torch.Tensor, expected: torch.Tensor, name: str = "") -> None:
    """Bit-for-bit equality; a NaN matches any NaN (sign and payload are not part of the contract:
    torch on the CPU keeps the sign of -NaN, a GPU's conversion writes the canonical 0x7F)."""
    label = f"{name}: " if name else ""
    assert out.shape == expected.shape, f"{label}shape {tuple(out.shape)} != {tuple(expected.shape)}"
    assert out.dtype == expected.dtype, f"{label}dtype {out.dtype} != {expected.dtype}"
    o, e = out.detach().cpu(), expected.detach().cpu()
    ints = _INT_OF_SIZE[o.dtype.itemsize]
    same = (o.view(ints) == e.view(ints)) | (o.float().isnan() & e.float().isnan())
    if not bool(same.all()):
        bad = (~same).nonzero()
        first = tuple(int(i) for i in bad[0])
        raise AssertionError(
            f"{label}{len(bad)} of {o.numel()} elements differ (first at {first}: got {o[first].float().item()!r} "
            f"(bits {o.view(ints)[first].item():#x}), expected {e[first].float().item()!r} "
            f"(bits {e.view(ints)[first].item():#x}))"
        )


def _gamma(n: int, u: float) -> float:
    return n * u / (1 - n * u)


def gemm_error_bound(mag: torch.Tensor, num_kb: int, block: int, device_type: str) -> torch.Tensor:
    """float64 elementwise bound on |kernel - reference| of the float32 GEMM result (module doc)."""
    rel = _gamma(block, U_DOT[device_type]) + _gamma(block, U32) + 4 * U32 + 2 * num_kb * U32
    return mag.double() * rel


def assert_gemm_close(
    out: torch.Tensor,
    ref32: torch.Tensor,
    mag: torch.Tensor,
    num_kb: int,
    block: int = 128,
    name: str = "",
    extra: torch.Tensor | float = 0.0,
) -> None:
    """``out`` (any float dtype) against the reference's float32 result, within the derived bound.

    NaN must sit exactly where the reference has NaN. ``extra``: further float64 slack derived by
    the caller (e.g. the rounding of a bias addition).
    """
    label = f"{name}: " if name else ""
    assert out.shape == ref32.shape, f"{label}shape {tuple(out.shape)} != {tuple(ref32.shape)}"
    o, r = out.detach().cpu().double(), ref32.detach().cpu().double()
    nan_o, nan_r = o.isnan(), r.isnan()
    assert torch.equal(nan_o, nan_r), (
        f"{label}NaN at {int((nan_o != nan_r).sum())} positions where the reference has none (or the reverse)"
    )
    if torch.is_tensor(extra):  # the comparison runs on the CPU, in float64
        extra = extra.detach().cpu().double()
    bound = gemm_error_bound(mag.detach().cpu(), num_kb, block, out.device.type) + extra
    bound = bound + HALF_ULP[out.dtype] * (r.abs() + bound)
    finite = ~nan_r
    err = torch.where(finite, (o - r).abs(), torch.zeros_like(o))
    err = torch.where(o == r, torch.zeros_like(err), err)  # equal infinities
    bad = err > torch.where(finite, bound, torch.zeros_like(bound))
    if bool(bad.any()):
        i = tuple(int(v) for v in bad.nonzero()[0])
        raise AssertionError(
            f"{label}{int(bad.sum())} of {o.numel()} elements exceed the derived bound (first at {i}: "
            f"out {o[i].item():.8g}, reference {r[i].item():.8g}, "
            f"|diff| {err[i].item():.3g} > bound {bound[i].item():.3g})"
        )


def record_launches(monkeypatch, module, names) -> list[tuple[str, tuple]]:
    """Replace each kernel or tuner ``module.<name>`` by one that records ``(name, grid)`` when
    launched (``kernel[grid](...)``) and then launches as before; returns the record."""
    launched: list[tuple[str, tuple]] = []

    class _Recorded:
        def __init__(self, kernel, name):
            self.kernel, self.name = kernel, name

        def __getitem__(self, grid):
            launched.append((self.name, grid))
            return self.kernel[grid]

    for name in names:
        monkeypatch.setattr(module, name, _Recorded(getattr(module, name), name))
    return launched
