"""DeepSeek-V3's FP8 recipe: block quantization and block-scaled GEMMs.

Legend: M rows, N output features, K reduction dim, E experts, B block size (128).

- Values are float8 e4m3 (``torch.float8_e4m3fn``, finite max 448).
- Scales are float32 with ``x ≈ fp8 · scale``: ``scale = max(amax, 1e-4) / 448`` where amax is
  the block's max |x|; with ``scale_fmt="ue8m0"`` the scale is rounded *up* to a power of two
  (``2**ceil(log2(scale))``), so it fits an 8-bit exponent and never overflows e4m3.
- ``fp8 = saturate(x / scale)``: a division, then round-to-nearest-even into e4m3, clamped to
  ±448 (the NVIDIA conversion saturates; NaN stays NaN).
- Activations: one scale per 1×B slice of the last dim -> ``scale (..., ceil(K/B))``.
- Weights: one scale per B×B block -> ``scale (..., ceil(N/B), ceil(K/B))``.
  Partial edge blocks are allowed and take the amax of the elements they hold.
- GEMM: each B-wide K block is multiplied exactly in float32, scaled by ``a_s · b_s`` and added
  to a float32 accumulator (DeepSeek's per-128 "promotion"), then cast to ``out_dtype``.

Special values: a zero block gets the finite scale 1e-4/448 and zero values. A block with NaN
gets a NaN scale; a block with ±inf gets an inf scale and NaN at the inf (inf/inf), zeros
elsewhere: dequantizing any of them gives NaN, never a silent finite number.

Each op's contract (``check_<op>``: arguments in, output specs out, no values read) is shared
with the Triton kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import (
    FLOAT_DTYPES,
    INT_DTYPES,
    TensorSpec,
    check_bool,
    check_choice,
    check_dtype_arg,
    check_has_values,
    check_positive_int,
    check_same_device,
    check_tensor,
)
from .grouped_gemm import check_masked_m, check_offsets, group_ends, masked_rows

__all__ = [
    "FP8_DTYPE", "FP8_MAX", "AMAX_FLOOR", "SCALE_FMTS", "OUT_DTYPES", "block_scale",
    "quant_act", "quant_weight", "dequant", "fp8_gemm", "fp8_grouped_gemm", "fp8_grouped_gemm_masked", "fp8_linear",
    "check_quant_act", "check_quant_weight", "check_dequant", "check_fp8_gemm", "check_fp8_grouped_gemm",
    "check_fp8_grouped_gemm_masked", "check_fp8_linear", "check_scale_fmt",
]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
AMAX_FLOOR = 1e-4
SCALE_FMTS = (None, "ue8m0")
#: What the GEMMs and dequant may return.
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
DEQUANT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
#: What the linear takes and returns.
LINEAR_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_scale_fmt(scale_fmt: object) -> None:
    check_choice("scale_fmt", scale_fmt, SCALE_FMTS)


def _kb(n: int, block: int) -> int:
    return -(-n // block)


def check_quant_act(x: object, block: object = 128, scale_fmt: object = None) -> tuple[TensorSpec, TensorSpec]:
    """The contract of ``quant_act``: x (..., K) float -> (e4m3 like x, float32 (..., ceil(K/block)))."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    check_positive_int("block", block)
    check_scale_fmt(scale_fmt)
    if x.ndim == 0:
        raise ValueError("x: expected at least 1 dimension, got a scalar")
    lead, K = tuple(x.shape[:-1]), x.shape[-1]
    return TensorSpec(tuple(x.shape), FP8_DTYPE), TensorSpec((*lead, _kb(K, block)), torch.float32)


def check_quant_weight(w: object, block: object = 128, scale_fmt: object = None) -> tuple[TensorSpec, TensorSpec]:
    """The contract of ``quant_weight``: w (..., N, K) float -> (e4m3 like w, float32 (..., Nb, Kb))."""
    check_tensor("w", w, dtypes=FLOAT_DTYPES)
    check_positive_int("block", block)
    check_scale_fmt(scale_fmt)
    if w.ndim < 2:
        raise ValueError(f"w: expected at least 2 dimensions (..., N, K), got shape {tuple(w.shape)}")
    N, K = w.shape[-2:]
    return (TensorSpec(tuple(w.shape), FP8_DTYPE),
            TensorSpec((*w.shape[:-2], _kb(N, block), _kb(K, block)), torch.float32))


def scale_divisors(scale_shape: tuple[int, ...], shape: tuple[int, ...], block: int, name: str = "scale") -> list[int]:
    """Per dim of the values: 1 where the scale dim is full size, ``block`` where it is
    ceil(size/block); anything else raises ValueError naming ``name``."""
    if len(scale_shape) != len(shape):
        raise ValueError(f"{name}: expected {len(shape)} dims to match the values {tuple(shape)}, "
                         f"got shape {tuple(scale_shape)}")
    divs = []
    for d, (s, n) in enumerate(zip(scale_shape, shape, strict=True)):
        if s == n:
            divs.append(1)
        elif s == _kb(n, block):
            divs.append(block)
        else:
            raise ValueError(f"{name}: dim {d} has {s} entries; expected {n} or ceil({n}/{block})="
                             f"{_kb(n, block)} for values of shape {tuple(shape)}")
    return divs


def check_dequant(x: object, scale: object, block: object = 128, out_dtype: object = torch.float32) -> TensorSpec:
    """The contract of ``dequant``: x e4m3, scale float32 whose every dim is x's or ceil(x's/block)."""
    check_tensor("x", x, dtypes=(FP8_DTYPE,))
    check_tensor("scale", scale, dtypes=(torch.float32,))
    check_positive_int("block", block)
    check_dtype_arg("out_dtype", out_dtype, DEQUANT_DTYPES)
    check_same_device(x=x, scale=scale)
    scale_divisors(tuple(scale.shape), tuple(x.shape), block)
    return TensorSpec(tuple(x.shape), out_dtype)


def check_fp8_gemm(a: object, a_s: object, b: object, b_s: object, out_dtype: object = torch.bfloat16,
                   block: object = 128) -> TensorSpec:
    """The contract of ``fp8_gemm``: a (M, K), b (N, K) e4m3 with (M, Kb) and (Nb, Kb) float32 scales."""
    check_tensor("a", a, ndim=2, dtypes=(FP8_DTYPE,))
    check_tensor("b", b, ndim=2, dtypes=(FP8_DTYPE,))
    check_positive_int("block", block)
    check_dtype_arg("out_dtype", out_dtype, OUT_DTYPES)
    M, K = a.shape
    N = b.shape[0]
    if b.shape[1] != K:
        raise ValueError(f"b: expected K={K} columns to match a {tuple(a.shape)}, got shape {tuple(b.shape)}")
    check_tensor("a_s", a_s, dtypes=(torch.float32,), shape=(M, _kb(K, block)))
    check_tensor("b_s", b_s, dtypes=(torch.float32,), shape=(_kb(N, block), _kb(K, block)))
    check_same_device(a=a, a_s=a_s, b=b, b_s=b_s)
    return TensorSpec((M, N), out_dtype)


def check_fp8_grouped_gemm(xs: object, xs_s: object, w: object, w_s: object, offsets: object,
                           out_dtype: object = torch.bfloat16, block: object = 128, *,
                           validate: object = False) -> TensorSpec:
    """The contract of ``fp8_grouped_gemm``: xs (M, K) and w (E, N, K) e4m3 with their block
    scales, offsets (E,) int32/int64."""
    check_tensor("xs", xs, ndim=2, dtypes=(FP8_DTYPE,))
    check_tensor("w", w, ndim=3, dtypes=(FP8_DTYPE,))
    check_positive_int("block", block)
    check_dtype_arg("out_dtype", out_dtype, OUT_DTYPES)
    E, N, K = w.shape
    M, Kb = xs.shape[0], _kb(K, block)
    if xs.shape[1] != K:
        raise ValueError(f"xs: expected K={K} columns (w is {tuple(w.shape)}), got shape {tuple(xs.shape)}")
    check_tensor("xs_s", xs_s, dtypes=(torch.float32,), shape=(M, Kb))
    check_tensor("w_s", w_s, dtypes=(torch.float32,), shape=(E, _kb(N, block), Kb))
    check_tensor("offsets", offsets, dtypes=INT_DTYPES, shape=(E,))
    check_same_device(xs=xs, xs_s=xs_s, w=w, w_s=w_s, offsets=offsets)
    check_bool("validate", validate)
    return TensorSpec((M, N), out_dtype)


def check_fp8_grouped_gemm_masked(x: object, x_s: object, w: object, w_s: object, masked_m: object,
                                  out_dtype: object = torch.bfloat16, block: object = 128, *,
                                  validate: object = False) -> TensorSpec:
    """The contract of ``fp8_grouped_gemm_masked``: x (E, max_m, K) and w (E, N, K) e4m3 with
    their block scales (E, max_m, Kb) and (E, Nb, Kb), masked_m (E,) int32/int64 ->
    (E, max_m, N)."""
    check_tensor("x", x, ndim=3, dtypes=(FP8_DTYPE,))
    check_tensor("w", w, ndim=3, dtypes=(FP8_DTYPE,))
    check_positive_int("block", block)
    check_dtype_arg("out_dtype", out_dtype, OUT_DTYPES)
    E, N, K = w.shape
    max_m, Kb = x.shape[1], _kb(K, block)
    if x.shape[0] != E or x.shape[2] != K:
        raise ValueError(f"x: expected (E={E}, max_m, K={K}) to match w {tuple(w.shape)}, got shape {tuple(x.shape)}")
    check_tensor("x_s", x_s, dtypes=(torch.float32,), shape=(E, max_m, Kb))
    check_tensor("w_s", w_s, dtypes=(torch.float32,), shape=(E, _kb(N, block), Kb))
    check_tensor("masked_m", masked_m, dtypes=INT_DTYPES, shape=(E,))
    check_same_device(x=x, x_s=x_s, w=w, w_s=w_s, masked_m=masked_m)
    check_bool("validate", validate)
    return TensorSpec((E, max_m, N), out_dtype)


def check_fp8_linear(x: object, weight: object, weight_scale_inv: object, bias: object = None,
                     scale_fmt: object = None, block: object = 128) -> TensorSpec:
    """The contract of ``fp8_linear``: x (..., K) 16/32-bit float, weight (N, K) e4m3 with its
    (Nb, Kb) float32 ``weight_scale_inv``, bias (N,) or None -> (..., N) in x's dtype."""
    check_tensor("x", x, dtypes=LINEAR_DTYPES)
    check_tensor("weight", weight, ndim=2, dtypes=(FP8_DTYPE,))
    check_positive_int("block", block)
    check_scale_fmt(scale_fmt)
    if x.ndim == 0:
        raise ValueError("x: expected at least 1 dimension (..., K), got a scalar")
    N, K = weight.shape
    if x.shape[-1] != K:
        raise ValueError(f"x: expected last dim K={K} to match weight {tuple(weight.shape)}, "
                         f"got shape {tuple(x.shape)}")
    check_tensor("weight_scale_inv", weight_scale_inv, dtypes=(torch.float32,), shape=(_kb(N, block), _kb(K, block)))
    if bias is not None:
        check_tensor("bias", bias, dtypes=LINEAR_DTYPES, shape=(N,))
    check_same_device(x=x, weight=weight, weight_scale_inv=weight_scale_inv, bias=bias)
    return TensorSpec((*x.shape[:-1], N), x.dtype)


def block_scale(amax: torch.Tensor, scale_fmt: str | None = None) -> torch.Tensor:
    """float32 scale of a block from its float32 amax (see the module docstring)."""
    check_scale_fmt(scale_fmt)
    # The quotient in float64, rounded once to float32: the correctly rounded float32 quotient on
    # every device (torch on CUDA divides by a Python scalar as a multiplication by its
    # reciprocal, which is 1 ulp off for about a third of float32 amaxes).
    scale = (amax.float().clamp_min(AMAX_FLOOR).double() / FP8_MAX).float()
    if scale_fmt == "ue8m0":
        # exactly the next power of two >= scale (a float32 log2 would round scales a few ulps
        # above 2**k down to 2**k); inf and NaN stay as they are
        mantissa, exponent = torch.frexp(scale)  # scale = mantissa · 2**exponent, mantissa in [0.5, 1)
        up = torch.ldexp(torch.ones_like(scale), exponent)
        scale = torch.where(~torch.isfinite(scale) | (mantissa == 0.5), scale, up)
    return scale


def _to_fp8(y: torch.Tensor) -> torch.Tensor:
    return y.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def _covering(n: int, block: int) -> int:
    """A block size that splits a dim of n into the same blocks: a block longer than the dim
    holds all of it (so a huge ``block`` never allocates its padding)."""
    return min(block, max(n, 1))


def _pad_to(x: torch.Tensor, dim: int, block: int) -> torch.Tensor:
    """Zero-pad ``x`` along ``dim`` (negative) to a multiple of ``block``."""
    pad = -x.shape[dim] % block
    if pad == 0:
        return x
    spec = [0, 0] * (-dim - 1) + [0, pad]
    return F.pad(x, spec)


def quant_act(x: torch.Tensor, block: int = 128, scale_fmt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """1×block quantization along the last dim: ``x (..., K) -> (fp8 (..., K), scale (..., ceil(K/B)))``."""
    check_quant_act(x, block, scale_fmt)
    K = x.shape[-1]
    block = _covering(K, block)
    xb = _pad_to(x.float(), -1, block).unflatten(-1, (-1, block))  # (..., Kb, B)
    scale = block_scale(xb.abs().amax(dim=-1), scale_fmt)  # (..., Kb)
    y = (xb / scale.unsqueeze(-1)).flatten(-2)[..., :K]
    return _to_fp8(y), scale


def quant_weight(w: torch.Tensor, block: int = 128, scale_fmt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """block×block quantization: ``w (..., N, K) -> (fp8, scale (..., ceil(N/B), ceil(K/B)))``.

    Works on one weight (N, K) and on stacked expert weights (E, N, K).
    """
    check_quant_weight(w, block, scale_fmt)
    N, K = w.shape[-2:]
    bn, bk = _covering(N, block), _covering(K, block)
    wb = _pad_to(_pad_to(w.float(), -1, bk), -2, bn)
    wb = wb.unflatten(-1, (-1, bk)).unflatten(-3, (-1, bn))  # (..., Nb, B, Kb, B)
    scale = block_scale(wb.abs().amax(dim=(-3, -1)), scale_fmt)  # (..., Nb, Kb)
    y = wb / scale[..., :, None, :, None]
    y = y.flatten(-2).flatten(-3, -2)[..., :N, :K]
    return _to_fp8(y), scale


def _expand_scale(scale: torch.Tensor, shape: torch.Size, block: int, name: str) -> torch.Tensor:
    """Broadcast a block scale to ``shape``: each dim is either full size or ceil(size/block)."""
    for d, div in enumerate(scale_divisors(tuple(scale.shape), tuple(shape), block, name)):
        if div != 1:
            scale = scale.repeat_interleave(_covering(shape[d], block), dim=d).narrow(d, 0, shape[d])
    return scale


def dequant(
    x: torch.Tensor, scale: torch.Tensor, block: int = 128, out_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``x.float() * scale`` with the scale broadcast over its blocks (activation or weight layout)."""
    check_dequant(x, scale, block, out_dtype)
    return (x.float() * _expand_scale(scale, x.shape, block, "scale")).to(out_dtype)


def fp8_gemm(
    a: torch.Tensor,
    a_s: torch.Tensor,
    b: torch.Tensor,
    b_s: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    block: int = 128,
) -> torch.Tensor:
    """``a · bᵀ`` with block scales and per-block float32 promotion.

    Args:
        a: (M, K) e4m3, a_s: (M, ceil(K/B)) float32 (1×B scales).
        b: (N, K) e4m3, b_s: (ceil(N/B), ceil(K/B)) float32 (B×B scales).
    Returns:
        (M, N) in out_dtype.
    """
    check_fp8_gemm(a, a_s, b, b_s, out_dtype, block)
    M, K = a.shape
    N = b.shape[0]
    b_s_rows = b_s.repeat_interleave(_covering(N, block), dim=0)[:N]  # (N, Kb): each row's scale per K block
    acc = torch.zeros(M, N, dtype=torch.float32, device=a.device)
    for kb, k0 in enumerate(range(0, K, block)):
        partial = a[:, k0:k0 + block].float() @ b[:, k0:k0 + block].float().T  # exact fp32 products
        acc += partial * a_s[:, kb, None] * b_s_rows[None, :, kb]
    return acc.to(out_dtype)


def fp8_grouped_gemm(
    xs: torch.Tensor,
    xs_s: torch.Tensor,
    w: torch.Tensor,
    w_s: torch.Tensor,
    offsets: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    block: int = 128,
    *,
    validate: bool = False,
) -> torch.Tensor:
    """The grouped expert GEMM in FP8: rows ``offsets[e-1]:offsets[e]`` use ``w[e]``.

    Args:
        xs: (M, K) e4m3, xs_s: (M, ceil(K/B)) float32.
        w: (E, N, K) e4m3, w_s: (E, ceil(N/B), ceil(K/B)) float32.
        offsets: (E,) int32/int64 cumulative row ends.
        validate: raise ValueError on malformed offsets (else: ``grouped_gemm``'s clamping rule).
    Returns:
        (M, N) in out_dtype; rows past offsets[E-1] are zero.
    """
    M, N = check_fp8_grouped_gemm(xs, xs_s, w, w_s, offsets, out_dtype, block, validate=validate).shape
    check_has_values("offsets", offsets, "moela.reference.fp8_grouped_gemm")
    if validate:
        check_offsets(offsets, M)
    out = torch.zeros(M, N, dtype=out_dtype, device=xs.device)
    start = 0
    for e, end in enumerate(group_ends(offsets, M)):
        if end > start:
            out[start:end] = fp8_gemm(xs[start:end], xs_s[start:end], w[e], w_s[e], out_dtype, block)
        start = end
    return out


def fp8_grouped_gemm_masked(
    x: torch.Tensor,
    x_s: torch.Tensor,
    w: torch.Tensor,
    w_s: torch.Tensor,
    masked_m: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    block: int = 128,
    *,
    validate: bool = False,
) -> torch.Tensor:
    """The grouped expert GEMM in FP8, masked layout: ``out[e, :m_e] = x[e, :m_e] · w[e]ᵀ`` with
    block scales, ``m_e = clamp(masked_m[e], 0, max_m)``; rows at or past ``m_e`` are zero.

    DeepGEMM's ``m_grouped_fp8_gemm_nt_masked``: the layout of an expert-parallel decode step
    (DeepEP's low-latency dispatch), one fixed-size buffer per expert, under CUDA graphs.

    Args:
        x: (E, max_m, K) e4m3, x_s: (E, max_m, ceil(K/B)) float32.
        w: (E, N, K) e4m3, w_s: (E, ceil(N/B), ceil(K/B)) float32.
        masked_m: (E,) int32/int64 real rows per expert.
        validate: raise ValueError on a count outside [0, max_m] (else: clamped).
    Returns:
        (E, max_m, N) in out_dtype.
    """
    E, max_m, N = check_fp8_grouped_gemm_masked(x, x_s, w, w_s, masked_m, out_dtype, block, validate=validate).shape
    check_has_values("masked_m", masked_m, "moela.reference.fp8_grouped_gemm_masked")
    if validate:
        check_masked_m(masked_m, max_m)
    out = torch.zeros(E, max_m, N, dtype=out_dtype, device=x.device)
    for e, m in enumerate(masked_rows(masked_m, max_m)):
        if m:
            out[e, :m] = fp8_gemm(x[e, :m], x_s[e, :m], w[e], w_s[e], out_dtype, block)
    return out


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale_inv: torch.Tensor,
    bias: torch.Tensor | None = None,
    scale_fmt: str | None = None,
    block: int = 128,
) -> torch.Tensor:
    """``F.linear`` with an FP8 weight in DeepSeek's checkpoint format: the activation quantized
    1×block on the fly, the block-scaled GEMM in float32, the bias added, one cast to x's dtype.

    ``(fp8_gemm(*quant_act(x), weight, weight_scale_inv, float32) + bias).to(x.dtype)`` over x's
    rows; x: (..., K), weight: (N, K) e4m3, weight_scale_inv: (ceil(N/B), ceil(K/B)) float32.
    """
    check_fp8_linear(x, weight, weight_scale_inv, bias, scale_fmt, block)
    N, K = weight.shape
    q, s = quant_act(x.reshape(-1, K), block, scale_fmt)
    y = fp8_gemm(q, s, weight, weight_scale_inv, torch.float32, block)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], N)
