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
CPU; older GPUs get a clear error. The kernels take blocks up to ``MAX_BLOCK`` (one block per
program); the reference takes any.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from moela.reference._checks import check_tensor
from moela.reference.fp8 import (
    AMAX_FLOOR,
    FP8_DTYPE,
    FP8_MAX,
    check_dequant,
    check_quant_act,
    check_quant_weight,
    scale_divisors,
)

from ._common import autotune, cdiv, next_power_of_2
from .factory import kernel_op
from .tl_helpers import abs_bits, block_scale, saturate_to_fp8

__all__ = [
    "FP8_DTYPE", "FP8_MAX", "AMAX_FLOOR", "MAX_BLOCK",
    "quant_act", "quant_weight", "dequant",
    "empty_col_major_scales", "to_col_major", "to_row_major",
]

#: The largest scale block the kernels take (a quant_weight program holds one block×block tile).
MAX_BLOCK = 1024


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


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
    scale = block_scale(tl.max(abs_bits(x), 1).to(tl.float32, bitcast=True), UE8M0)
    q = saturate_to_fp8(x, scale[:, None], q_ptr.dtype.element_ty)
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
    amax = tl.max(tl.max(abs_bits(w), 1), 0).to(tl.float32, bitcast=True)
    scale = block_scale(amax, UE8M0)
    q = saturate_to_fp8(w, scale, q_ptr.dtype.element_ty)
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
    return [
        triton.Config({"BLOCK_R": 32}, num_warps=4),
        triton.Config({"BLOCK_R": 16}, num_warps=4),
        triton.Config({"BLOCK_R": 64}, num_warps=8),
        triton.Config({"BLOCK_R": 8}, num_warps=2),
        triton.Config({"BLOCK_R": 128}, num_warps=8),
    ]


_quant_act_tuned = autotune("quant_act", _quant_act_configs(), key=["K", "BLOCK"])(_quant_act_kernel)


# ----------------------------------------------------------------------------------------------
# Host side: checks, layouts, launchers
# ----------------------------------------------------------------------------------------------


def _domain_block(op: str, block: int) -> None:
    if block > MAX_BLOCK:
        raise ValueError(f"block: the Triton {op} kernel takes blocks up to {MAX_BLOCK} (one block per program), "
                         f"got {block} (moela.reference.{op} takes any)")


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


def _view(t: torch.Tensor, shape: tuple[int, ...], name: str) -> torch.Tensor:
    """``t`` as a view of ``shape`` (an output buffer must not be copied)."""
    try:
        return t.view(shape)
    except RuntimeError as e:
        raise ValueError(f"{name}: its leading dims must flatten into one without a copy, got strides "
                         f"{t.stride()} for shape {tuple(t.shape)}") from e


def _quant_act_domain(x, block=128, scale_fmt=None) -> None:
    _domain_block("quant_act", block)


@kernel_op("quant_act", contract=check_quant_act, domain=_quant_act_domain, fp8=True)
def quant_act(out, x: Tensor, block: int = 128, scale_fmt: str | None = None, *,
              config=None) -> tuple[Tensor, Tensor]:
    """1×block e4m3 quantization of the last dim, bit-exact with ``moela.reference.quant_act``.

    Args:
        x: (..., K) float16/bfloat16/float32/float64 (any leading shape, any strides).
        block: scale block along K (DeepSeek: 128), up to ``MAX_BLOCK``.
        scale_fmt: None (float32 ``amax/448``) or "ue8m0" (rounded up to a power of two).
    Returns:
        ``(q (..., K) float8_e4m3fn, scale (..., ceil(K/block)) float32)``, ``x ≈ q · scale``.
        ``quant_act.launch(x, out=(q, s))`` writes given buffers of any strides, such as
        ``empty_col_major_scales`` (what ``fp8_gemm`` reads fastest).

    Example::

        q, s = quant_act(torch.randn(4, 7168, device="cuda", dtype=torch.bfloat16))
    """
    q, s = out
    K = x.shape[-1]
    num_kb = cdiv(K, block)
    R = x.numel() // K if K else 0
    if R == 0 or K == 0:
        return
    x2, q2, s2 = x.reshape(R, K), _view(q, (R, K), "out[0]"), _view(s, (R, num_kb), "out[1]")
    args = (x2, q2, s2, R, K, num_kb, *x2.stride(), *q2.stride(), *s2.stride())
    consts = dict(BLOCK=block, BLOCK_P2=next_power_of_2(block), UE8M0=scale_fmt == "ue8m0")
    if config is None:
        _quant_act_tuned[lambda meta: (cdiv(R, meta["BLOCK_R"]) * num_kb,)](*args, **consts)
    else:
        meta = dict(config)
        _quant_act_kernel[(cdiv(R, meta["BLOCK_R"]) * num_kb,)](*args, **consts, **meta)


def _quant_weight_domain(w, block=128, scale_fmt=None) -> None:
    _domain_block("quant_weight", block)


@kernel_op("quant_weight", contract=check_quant_weight, domain=_quant_weight_domain, fp8=True)
def quant_weight(out, w: Tensor, block: int = 128, scale_fmt: str | None = None, *,
                 config=None) -> tuple[Tensor, Tensor]:
    """block×block e4m3 quantization, bit-exact with ``moela.reference.quant_weight``.

    Args:
        w: (N, K) or stacked experts (E, N, K) (any leading shape), float16/bf16/float32/float64.
        block: up to ``MAX_BLOCK``; scale_fmt: None or "ue8m0".
    Returns:
        ``(q like w in float8_e4m3fn, scale (..., ceil(N/B), ceil(K/B)) float32)`` — DeepSeek's
        checkpoint pair ``(weight, weight_scale_inv)``.
    """
    q, s = out
    N, K = w.shape[-2:]
    nb, kb = cdiv(N, block), cdiv(K, block)
    L = math.prod(w.shape[:-2])
    if L == 0 or N == 0 or K == 0:
        return
    w3 = w.reshape(L, N, K)
    q3, s3 = _view(q, (L, N, K), "out[0]"), _view(s, (L, nb, kb), "out[1]")
    bp2 = next_power_of_2(block)
    _quant_weight_kernel[(kb, nb, L)](
        w3, q3, s3, N, K, *w3.stride(), *q3.stride(), *s3.stride(),
        BLOCK=block, BLOCK_P2=bp2, UE8M0=scale_fmt == "ue8m0",
        **(dict(config) if config else {"num_warps": 8 if bp2 >= 128 else 4}),
    )


@kernel_op("dequant", contract=check_dequant, fp8=True)
def dequant(out, x: Tensor, scale: Tensor, block: int = 128, out_dtype: torch.dtype = torch.float32, *,
            config=None) -> Tensor:
    """``x.float() * scale`` with the scale broadcast over its blocks (activation or weight layout),
    cast to ``out_dtype``; bit-exact with ``moela.reference.dequant``.

    Each dim of ``scale`` is either the full size of ``x``'s dim or ceil(size/block). The last
    two dims are indexed in the kernel; a blocked leading dim (rare: the activation and weight
    layouts never have one) is expanded on the host first.
    """
    shape = tuple(x.shape)
    if x.numel() == 0:
        return
    divs = scale_divisors(tuple(scale.shape), shape, block)
    for d in range(max(x.ndim - 2, 0)):
        if divs[d] != 1:
            scale = scale.repeat_interleave(min(block, shape[d]), dim=d).narrow(d, 0, shape[d])
    # (L, N, K) views; a 1-D x is one row, a 0-D x one element (as in the reference).
    pad = (1,) * max(2 - x.ndim, 0)
    N, K = (*pad, *shape)[-2:]
    div_n, div_k = ([1] * len(pad) + divs)[-2:]
    L = math.prod(shape[:-2])
    x3 = x.reshape(L, N, K)
    s3 = scale.reshape(L, *(*pad, *scale.shape)[-2:])
    o3 = _view(out, (L, N, K), "out")
    BLOCK_N, BLOCK_K = 64, 128  # 8 KB of e4m3 per program, 16-byte loads
    _dequant_kernel[(cdiv(K, BLOCK_K), cdiv(N, BLOCK_N), L)](
        x3, s3, o3, N, K, *x3.stride(), *s3.stride(), *o3.stride(),
        DIV_N=div_n, DIV_K=div_k, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, **(dict(config) if config else {"num_warps": 4}),
    )
