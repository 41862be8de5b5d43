"""FP8 block quantization in Triton: ``quant_act`` (1×B), ``quant_weight`` (B×B) and ``dequant``.

Legend: R rows (all leading dims of an activation flattened), K the quantized (last) dim,
N×K one weight, L stacked weights (experts), B the block (128 for DeepSeek), Kb = ceil(K/B),
Nb = ceil(N/B).

Semantics: exactly those of ``moela.reference.fp8`` (the definition), bit for bit, on the CPU
interpreter (with ``moela.kernels.interpreter``'s compatibility layer) and on the GPU:

- ``scale = max(amax, 1e-4) / 448`` in float32 with an IEEE division (``div_rn``; Triton's
  ``/`` on a GPU is an approximate division); ``ue8m0`` scales are ``2**ceil(log2(scale))``
  computed exactly in integer ops (see ``_ue8m0_ceil``).
- ``q = saturate(x / scale)``: IEEE division, clamp to ±448 keeping NaN, round to nearest even
  into e4m3.
- Special values, as documented in the reference: an all-zero block gets the finite scale
  1e-4/448 and zeros; a block holding NaN gets a NaN scale (so every value of it dequantizes to
  NaN); a block holding ±inf (and no NaN) gets an inf scale, NaN at the inf and ±0 elsewhere.
  Nothing is ever silently turned into a finite number: NaN survives the amax (an integer max
  over the |x| bit patterns, where a GPU's float ``max`` would drop it) and the clamp
  (``propagate_nan=ALL``).
- Partial edge blocks (K or N not a multiple of B, any B >= 1) take the amax of the elements
  they hold.

Scale layouts. The public ops return the reference's layout: activation scales
``(..., Kb)`` row-major, weight scales ``(..., Nb, Kb)`` row-major. The GEMMs read any strides;
what they read fastest is the *column-major* activation scale (DeepGEMM's layout): a ``(R, Kb)``
tensor with strides ``(1, R)``, i.e. the transpose of a contiguous ``(Kb, R)`` buffer, so that a
GEMM tile's BLOCK_M row scales for one K block are one contiguous load instead of BLOCK_M
scattered ones. ``quant_act_fwd(..., scale_out=empty_col_major_scales(R, Kb))`` writes that
layout directly; ``to_col_major`` / ``to_row_major`` convert (same shape and values, only the
strides change). Weight scales are read once per (128-row N block, K block): their layout does
not matter.

Every op needs an FP8-capable GPU (compute capability >= 8.9) or the Triton interpreter on the
CPU; ``check_fp8_capability`` raises a clear error on older GPUs.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from moela.kernels._common import (
    autotune,
    autotune_configs,
    cdiv,
    check_kernel_device,
    next_power_of_2,
    on_tensor_device,
    run_direct,
)
from moela.reference._checks import FLOAT_DTYPES, check_positive_int, check_same_device, check_tensor
from moela.reference.fp8 import AMAX_FLOOR, FP8_DTYPE, FP8_MAX, SCALE_FMTS

__all__ = [
    "FP8_DTYPE", "FP8_MAX", "AMAX_FLOOR", "MIN_FP8_CAPABILITY",
    "quant_act", "quant_weight", "dequant",
    "quant_act_fwd", "quant_weight_fwd", "dequant_fwd",
    "check_fp8_capability", "check_scale_fmt",
    "empty_col_major_scales", "to_col_major", "to_row_major",
]

#: e4m3 needs Ada (sm_89) or Hopper (sm_90) and later.
MIN_FP8_CAPABILITY = (8, 9)
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _abs_bits(x):
    """|x| as int32 bits: for non-negative floats the integer order is the float order, and every
    NaN (sign cleared) sorts above inf, so an integer max of these is a NaN-propagating amax (a
    GPU's float max drops NaN; a custom-combine tl.reduce would be slow in the interpreter)."""
    return tl.abs(x).to(tl.int32, bitcast=True)


@triton.jit
def _ue8m0_ceil(scale):
    """``2**ceil(log2(scale))`` exactly (``reference.fp8.block_scale``), in integer ops so that a GPU
    (whose log2 is approximate) computes the same bits: a positive normal float32 is its own power
    of two when its mantissa bits are zero, else the exponent goes up by one. inf and NaN pass
    through; an exponent that reaches 255 gives inf, like exp2(128).
    """
    bits = scale.to(tl.int32, bitcast=True)
    expo = (bits >> 23) & 0xFF
    up = ((bits & 0x7FFFFF) != 0).to(tl.int32)
    rounded = ((expo + up) << 23).to(tl.float32, bitcast=True)
    return tl.where(expo == 0xFF, scale, rounded)


@triton.jit
def _block_scale(amax, UE8M0: tl.constexpr):
    """float32 scale from a block's float32 amax (``reference.fp8.block_scale``)."""
    floor = tl.full(amax.shape, 1e-4, tl.float32)  # AMAX_FLOOR
    scale = tl.math.div_rn(tl.maximum(amax, floor, propagate_nan=tl.PropagateNan.ALL), 448.0)  # FP8_MAX
    if UE8M0:
        scale = _ue8m0_ceil(scale)
    return scale


@triton.jit
def _saturate_to_fp8(x, scale, dtype: tl.constexpr):
    """``clamp(x / scale, ±448).to(e4m3)``: IEEE division, NaN kept through the clamp."""
    y = tl.math.div_rn(x, scale)
    y = tl.clamp(y, -448.0, 448.0, propagate_nan=tl.PropagateNan.ALL)
    return y.to(dtype)


@triton.jit
def _quant_act_kernel(
    x_ptr, q_ptr, s_ptr,
    R, K, num_kb,
    stride_xr, stride_xk, stride_qr, stride_qk, stride_sr, stride_sk,
    BLOCK: tl.constexpr, BLOCK_P2: tl.constexpr, BLOCK_R: tl.constexpr, UE8M0: tl.constexpr,
):
    """1×BLOCK quantization of a (R, K) matrix.

    grid: (cdiv(R, BLOCK_R) * num_kb,). Program p owns rows (p // num_kb)·BLOCK_R + [0, BLOCK_R) of
    K block p % num_kb (neighbouring programs stream neighbouring K blocks of the same rows): it
    loads the (BLOCK_R, BLOCK) tile once, reduces each row's amax, and writes the e4m3 tile and
    BLOCK_R scales. BLOCK_P2 = next power of two >= BLOCK (masked).
    """
    pid = tl.program_id(0)
    kb = pid % num_kb
    rows = (pid // num_kb) * BLOCK_R + tl.arange(0, BLOCK_R)
    inner = tl.arange(0, BLOCK_P2)
    cols = kb * BLOCK + inner
    row_mask = rows < R
    mask = row_mask[:, None] & ((inner < BLOCK) & (cols < K))[None, :]
    # int64 offsets: rows · stride or cols · stride pass 2**31 for large or transposed inputs
    rows, cols, kb = rows.to(tl.int64), cols.to(tl.int64), kb.to(tl.int64)

    x = tl.load(x_ptr + rows[:, None] * stride_xr + cols[None, :] * stride_xk, mask=mask, other=0.0)
    x = x.to(tl.float32)
    scale = _block_scale(tl.max(_abs_bits(x), 1).to(tl.float32, bitcast=True), UE8M0)
    q = _saturate_to_fp8(x, scale[:, None], q_ptr.dtype.element_ty)
    tl.store(q_ptr + rows[:, None] * stride_qr + cols[None, :] * stride_qk, q, mask=mask)
    tl.store(s_ptr + rows * stride_sr + kb * stride_sk, scale, mask=row_mask)


@triton.jit
def _quant_weight_kernel(
    w_ptr, q_ptr, s_ptr,
    N, K,
    stride_wl, stride_wn, stride_wk, stride_ql, stride_qn, stride_qk, stride_sl, stride_sn, stride_sk,
    BLOCK: tl.constexpr, BLOCK_P2: tl.constexpr, UE8M0: tl.constexpr,
):
    """BLOCK×BLOCK quantization of L stacked (N, K) matrices.

    grid: (Kb, Nb, L). Program (kb, nb, l) owns block (nb, kb) of matrix l: one tile load, one amax
    over the whole tile, one scale.
    """
    kb = tl.program_id(0)
    nb = tl.program_id(1)
    l = tl.program_id(2).to(tl.int64)
    inner = tl.arange(0, BLOCK_P2)
    rows = nb * BLOCK + inner
    cols = kb * BLOCK + inner
    mask = ((inner < BLOCK) & (rows < N))[:, None] & ((inner < BLOCK) & (cols < K))[None, :]
    # int64 offsets: one (N, K) matrix may span more than 2**31 elements (or have such strides)
    rows, cols = rows.to(tl.int64), cols.to(tl.int64)

    w = tl.load(w_ptr + l * stride_wl + rows[:, None] * stride_wn + cols[None, :] * stride_wk, mask=mask, other=0.0)
    w = w.to(tl.float32)
    amax = tl.max(tl.max(_abs_bits(w), 1), 0).to(tl.float32, bitcast=True)
    scale = _block_scale(amax, UE8M0)
    q = _saturate_to_fp8(w, scale, q_ptr.dtype.element_ty)
    tl.store(q_ptr + l * stride_ql + rows[:, None] * stride_qn + cols[None, :] * stride_qk, q, mask=mask)
    tl.store(s_ptr + l * stride_sl + nb.to(tl.int64) * stride_sn + kb.to(tl.int64) * stride_sk, scale)


@triton.jit
def _dequant_kernel(
    q_ptr, s_ptr, o_ptr,
    N, K,
    stride_ql, stride_qn, stride_qk, stride_sl, stride_sn, stride_sk, stride_ol, stride_on, stride_ok,
    DIV_N: tl.constexpr, DIV_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``o = q.float() * scale`` over L stacked (N, K) matrices; scale index (n // DIV_N, k // DIV_K).

    grid: (cdiv(K, BLOCK_K), cdiv(N, BLOCK_N), L). DIV_* is 1 (full-size scale dim) or B (blocked).
    """
    l = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows < N)[:, None] & (cols < K)[None, :]
    rows, cols = rows.to(tl.int64), cols.to(tl.int64)  # offsets may pass 2**31 (large N·K, strides)
    q = tl.load(q_ptr + l * stride_ql + rows[:, None] * stride_qn + cols[None, :] * stride_qk, mask=mask, other=0.0)
    s = tl.load(
        s_ptr + l * stride_sl + (rows // DIV_N)[:, None] * stride_sn + (cols // DIV_K)[None, :] * stride_sk,
        mask=mask, other=0.0,
    )
    out = q.to(tl.float32) * s
    tl.store(o_ptr + l * stride_ol + rows[:, None] * stride_on + cols[None, :] * stride_ok,
             out.to(o_ptr.dtype.element_ty), mask=mask)


def _quant_act_configs() -> list[triton.Config]:
    # Memory-bound: 16-byte loads per thread (8 bf16), enough rows per program to keep several
    # loads in flight. Key: K (and the block), never R.
    return autotune_configs("quant_act", [
        triton.Config({"BLOCK_R": 32}, num_warps=4),
        triton.Config({"BLOCK_R": 16}, num_warps=4),
        triton.Config({"BLOCK_R": 64}, num_warps=8),
        triton.Config({"BLOCK_R": 8}, num_warps=2),
        triton.Config({"BLOCK_R": 128}, num_warps=8),
    ])


_quant_act_tuned = autotune(configs=_quant_act_configs(), key=["K", "BLOCK"])(_quant_act_kernel)


# ----------------------------------------------------------------------------------------------
# Host side: checks, layouts, launchers
# ----------------------------------------------------------------------------------------------


@functools.cache
def _device_capability(device: torch.device) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(device))


def check_fp8_capability(name: str, device: torch.device) -> None:
    """Raise ``RuntimeError`` on a CUDA device without e4m3 support (before sm_89).

    Reads the (cached) compute capability only; never synchronises. CPU devices pass (the
    Triton interpreter emulates fp8).
    """
    if device.type != "cuda":
        return
    cap = _device_capability(device)
    if tuple(cap) < MIN_FP8_CAPABILITY:
        raise RuntimeError(
            f"{name}: the FP8 (e4m3) kernels need a GPU of compute capability >= "
            f"{MIN_FP8_CAPABILITY[0]}.{MIN_FP8_CAPABILITY[1]} (Ada, Hopper or later); {device} is "
            f"sm_{cap[0]}{cap[1]}. Use the moela.reference FP8 functions (or dequant + F.linear) there."
        )


def _check_device(name: str, t: torch.Tensor) -> None:
    check_kernel_device(name, t)
    check_fp8_capability(name, t.device)


def check_scale_fmt(scale_fmt: object) -> None:
    if scale_fmt not in SCALE_FMTS:
        raise ValueError(f"scale_fmt: expected None or 'ue8m0', got {scale_fmt!r}")


def _check_act_args(x: object, block: object, scale_fmt: object) -> None:
    """quant_act's argument checks (the launcher and the fake): no values read."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    check_positive_int("block", block)
    check_scale_fmt(scale_fmt)
    if x.ndim == 0:
        raise ValueError("x: expected at least 1 dimension, got a scalar")


def _check_weight_args(w: object, block: object, scale_fmt: object) -> None:
    """quant_weight's argument checks (the launcher and the fake): no values read."""
    check_tensor("w", w, dtypes=FLOAT_DTYPES)
    check_positive_int("block", block)
    check_scale_fmt(scale_fmt)
    if w.ndim < 2:
        raise ValueError(f"w: expected at least 2 dimensions (..., N, K), got shape {tuple(w.shape)}")


def _check_out(name: str, out: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, like: torch.Tensor):
    if out is None:
        return
    check_tensor(name, out, dtypes=(dtype,), shape=shape)
    if out.device != like.device:
        raise ValueError(f"{name}: expected device {like.device}, got {out.device}")


def empty_col_major_scales(rows: int, num_kb: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """An uninitialised ``(rows, num_kb)`` float32 scale buffer in column-major layout
    (strides ``(1, rows)``): what ``fp8_gemm`` reads fastest for ``a_s``."""
    return torch.empty(num_kb, rows, dtype=torch.float32, device=device).t()


def to_col_major(scale: torch.Tensor) -> torch.Tensor:
    """Activation scales ``(..., R, Kb)`` -> same shape and values, column-major in the last two
    dims (strides ``(.., 1, R)``). A copy unless it already is."""
    check_tensor("scale", scale, dtypes=(torch.float32,))
    if scale.ndim < 2:
        raise ValueError(f"scale: expected at least 2 dims (..., R, Kb), got shape {tuple(scale.shape)}")
    return scale.transpose(-1, -2).contiguous().transpose(-1, -2)


def to_row_major(scale: torch.Tensor) -> torch.Tensor:
    """Any scale layout -> the reference's contiguous row-major layout (same shape and values)."""
    check_tensor("scale", scale, dtypes=(torch.float32,))
    return scale.contiguous()


@on_tensor_device
def quant_act_fwd(
    x: torch.Tensor,
    block: int = 128,
    scale_fmt: str | None = None,
    *,
    out: torch.Tensor | None = None,
    scale_out: torch.Tensor | None = None,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the 1×block quantizer: ``x (..., K) -> (e4m3 (..., K), scale (..., Kb) f32)``.

    ``out`` / ``scale_out`` (optional) are written in place and returned; they may have any
    strides (e.g. ``empty_col_major_scales`` for 2-D ``x``). ``config`` (e.g. ``{"BLOCK_R": 16,
    "num_warps": 4}``) bypasses autotuning.
    """
    _check_act_args(x, block, scale_fmt)
    _check_device("x", x)
    K = x.shape[-1]
    num_kb = cdiv(K, block)
    _check_out("out", out, tuple(x.shape), FP8_DTYPE, x)
    _check_out("scale_out", scale_out, (*x.shape[:-1], num_kb), torch.float32, x)
    q = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device) if out is None else out
    s = torch.empty((*x.shape[:-1], num_kb), dtype=torch.float32, device=x.device) if scale_out is None else scale_out
    R = x.numel() // K if K else 0
    if R == 0 or K == 0:
        return q, s
    x2, q2, s2 = x.reshape(R, K), _rows_view(q, R, K, "out"), _rows_view(s, R, num_kb, "scale_out")
    args = (x2, q2, s2, R, K, num_kb, *x2.stride(), *q2.stride(), *s2.stride())
    consts = dict(BLOCK=block, BLOCK_P2=next_power_of_2(block), UE8M0=scale_fmt == "ue8m0")
    if config is None:
        grid = lambda meta: (cdiv(R, meta["BLOCK_R"]) * num_kb,)
        _quant_act_tuned[grid](*args, **consts)
    else:
        meta = dict(config)
        _quant_act_kernel[(cdiv(R, meta["BLOCK_R"]) * num_kb,)](*args, **consts, **meta)
    return q, s


def _rows_view(t: torch.Tensor, rows: int, cols: int, name: str) -> torch.Tensor:
    """``t`` (..., cols) as a (rows, cols) *view* (an output buffer must not be copied)."""
    try:
        return t.view(rows, cols)
    except RuntimeError as e:
        raise ValueError(f"{name}: its leading dims must flatten into one without a copy, got strides "
                         f"{t.stride()} for shape {tuple(t.shape)}") from e


@on_tensor_device
def quant_weight_fwd(
    w: torch.Tensor,
    block: int = 128,
    scale_fmt: str | None = None,
    *,
    out: torch.Tensor | None = None,
    scale_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the block×block quantizer: ``w (..., N, K) -> (e4m3, scale (..., Nb, Kb) f32)``."""
    _check_weight_args(w, block, scale_fmt)
    _check_device("w", w)
    N, K = w.shape[-2:]
    nb, kb = cdiv(N, block), cdiv(K, block)
    lead = tuple(w.shape[:-2])
    _check_out("out", out, tuple(w.shape), FP8_DTYPE, w)
    _check_out("scale_out", scale_out, (*lead, nb, kb), torch.float32, w)
    q = torch.empty(w.shape, dtype=FP8_DTYPE, device=w.device) if out is None else out
    s = torch.empty((*lead, nb, kb), dtype=torch.float32, device=w.device) if scale_out is None else scale_out
    L = math.prod(lead)
    if L == 0 or N == 0 or K == 0:
        return q, s
    w3 = w.reshape(L, N, K)
    q3 = _lead_view(q, L, (N, K), "out")
    s3 = _lead_view(s, L, (nb, kb), "scale_out")
    bp2 = next_power_of_2(block)
    _quant_weight_kernel[(kb, nb, L)](
        w3, q3, s3, N, K, *w3.stride(), *q3.stride(), *s3.stride(),
        BLOCK=block, BLOCK_P2=bp2, UE8M0=scale_fmt == "ue8m0", num_warps=8 if bp2 >= 128 else 4,
    )
    return q, s


def _lead_view(t: torch.Tensor, lead: int, last2: tuple[int, int], name: str) -> torch.Tensor:
    try:
        return t.view(lead, *last2)
    except RuntimeError as e:
        raise ValueError(f"{name}: its leading dims must flatten into one without a copy, got strides "
                         f"{t.stride()} for shape {tuple(t.shape)}") from e


def _scale_divisors(scale: torch.Tensor, shape: tuple[int, ...], block: int) -> list[int]:
    """Per dim: 1 if the scale dim is full size, ``block`` if it is ceil(size/block) (else raise)."""
    if scale.ndim != len(shape):
        raise ValueError(f"scale: expected {len(shape)} dims to match the values {shape}, "
                         f"got shape {tuple(scale.shape)}")
    divs = []
    for d, (s, n) in enumerate(zip(scale.shape, shape, strict=True)):
        if s == n:
            divs.append(1)
        elif s == cdiv(n, block):
            divs.append(block)
        else:
            raise ValueError(f"scale: dim {d} has {s} entries; expected {n} or ceil({n}/{block})="
                             f"{cdiv(n, block)} for values of shape {shape}")
    return divs


@on_tensor_device
def dequant_fwd(
    x: torch.Tensor,
    scale: torch.Tensor,
    block: int = 128,
    out_dtype: torch.dtype = torch.float32,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch ``x.float() * scale`` (scale broadcast over its blocks), cast to ``out_dtype``.

    Each dim of ``scale`` is either the full size of ``x``'s dim or ceil(size/block), as in the
    reference. The last two dims are indexed in the kernel; a blocked leading dim (rare: the
    activation and weight layouts never have one) is expanded on the host first.
    """
    check_tensor("x", x, dtypes=(FP8_DTYPE,))
    check_tensor("scale", scale, dtypes=(torch.float32,))
    check_positive_int("block", block)
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype: expected one of {OUT_DTYPES}, got {out_dtype}")
    check_same_device(x=x, scale=scale)
    _check_device("x", x)
    shape = tuple(x.shape)
    divs = _scale_divisors(scale, shape, block)
    _check_out("out", out, shape, out_dtype, x)
    o = torch.empty(shape, dtype=out_dtype, device=x.device) if out is None else out
    if x.numel() == 0:
        return o
    for d in range(max(x.ndim - 2, 0)):
        if divs[d] != 1:
            scale = scale.repeat_interleave(block, dim=d).narrow(d, 0, shape[d])
    # (L, N, K) views; a 1-D x is one row, a 0-D x one element (as in the reference).
    pad = (1,) * max(2 - x.ndim, 0)
    N, K = (*pad, *shape)[-2:]
    div_n, div_k = ([1] * len(pad) + divs)[-2:]
    L = math.prod(shape[:-2])
    x3 = x.reshape(L, N, K)
    s3 = scale.reshape(L, *(*pad, *scale.shape)[-2:])
    o3 = _lead_view(o, L, (N, K), "out")
    BLOCK_N, BLOCK_K = 64, 128  # 8 KB of e4m3 per program, 16-byte loads
    _dequant_kernel[(cdiv(K, BLOCK_K), cdiv(N, BLOCK_N), L)](
        x3, s3, o3, N, K, *x3.stride(), *s3.stride(), *o3.stride(),
        DIV_N=div_n, DIV_K=div_k, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=4,
    )
    return o


# ----------------------------------------------------------------------------------------------
# Public ops (same signatures and semantics as moela.reference.fp8)
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("moela::quant_act", mutates_args=())
def _quant_act_op(x: torch.Tensor, block: int = 128,
                  scale_fmt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return quant_act_fwd(x, block, scale_fmt)


@_quant_act_op.register_fake
def _(x, block=128, scale_fmt=None):
    _check_act_args(x, block, scale_fmt)  # the launcher's errors, also while tracing
    K = x.shape[-1]
    return x.new_empty(x.shape, dtype=FP8_DTYPE), x.new_empty((*x.shape[:-1], cdiv(K, block)), dtype=torch.float32)


def quant_act(x: torch.Tensor, block: int = 128, scale_fmt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """1×block e4m3 quantization of the last dim, bit-exact with ``moela.reference.quant_act``.

    Args:
        x: (..., K) float16/bfloat16/float32/float64 (any leading shape).
        block: scale block along K (DeepSeek: 128); any positive int.
        scale_fmt: None (float32 ``amax/448``) or "ue8m0" (rounded up to a power of two).
    Returns:
        ``(q (..., K) float8_e4m3fn, scale (..., ceil(K/block)) float32)``, ``x ≈ q · scale``.

    Example::

        q, s = quant_act(torch.randn(4, 7168, device="cuda", dtype=torch.bfloat16))
    """
    if run_direct(x):  # eager, nothing to record: the launcher itself (same bits)
        return quant_act_fwd(x, block, scale_fmt)
    return _quant_act_op(x, block, scale_fmt)


@torch.library.custom_op("moela::quant_weight", mutates_args=())
def _quant_weight_op(w: torch.Tensor, block: int = 128,
                     scale_fmt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return quant_weight_fwd(w, block, scale_fmt)


@_quant_weight_op.register_fake
def _(w, block=128, scale_fmt=None):
    _check_weight_args(w, block, scale_fmt)
    N, K = w.shape[-2:]
    return (w.new_empty(w.shape, dtype=FP8_DTYPE),
            w.new_empty((*w.shape[:-2], cdiv(N, block), cdiv(K, block)), dtype=torch.float32))


def quant_weight(w: torch.Tensor, block: int = 128, scale_fmt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """block×block e4m3 quantization, bit-exact with ``moela.reference.quant_weight``.

    Args:
        w: (N, K) or stacked experts (E, N, K) (any leading shape), float16/bf16/float32/float64.
    Returns:
        ``(q like w in float8_e4m3fn, scale (..., ceil(N/B), ceil(K/B)) float32)`` — DeepSeek's
        checkpoint pair ``(weight, weight_scale_inv)``.
    """
    if run_direct(w):  # eager, nothing to record: the launcher itself (same bits)
        return quant_weight_fwd(w, block, scale_fmt)
    return _quant_weight_op(w, block, scale_fmt)


@torch.library.custom_op("moela::dequant", mutates_args=())
def _dequant_op(x: torch.Tensor, scale: torch.Tensor, block: int = 128,
                out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return dequant_fwd(x, scale, block, out_dtype)


@_dequant_op.register_fake
def _(x, scale, block=128, out_dtype=torch.float32):
    check_same_device(x=x, scale=scale)  # a meta scale dispatches here: never a silent empty result
    return x.new_empty(x.shape, dtype=out_dtype)


def dequant(x: torch.Tensor, scale: torch.Tensor, block: int = 128,
            out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``x.float() * scale`` with the scale broadcast over its blocks (activation or weight layout),
    cast to ``out_dtype``; bit-exact with ``moela.reference.dequant``."""
    if run_direct(x, scale):  # eager, nothing to record: the launcher itself (same bits)
        return dequant_fwd(x, scale, block, out_dtype)
    return _dequant_op(x, scale, block, out_dtype)
