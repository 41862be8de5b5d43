"""Token dispatch in Triton: permute (tokens -> expert rows) and unpermute (the weighted combine).

Legend: T tokens, k slots per token, D hidden dim, M = ``plan.max_rows`` rows grouped by
expert, ``plan`` a ``RoutingPlan`` (``moela.kernels.routing.make_routing``).

    permute    xs[slot_to_row[t, j]] = x[t]; other rows 0                (_scatter_rows_kernel)
               or FP8: quant_act(xs) with one quantization per token      (_scatter_rows_fp8_kernel)
    unpermute  y[t] = Σ_j w[t, j] · ys[slot_to_row[t, j]], j = 0..k-1    (_combine_kernel)
    backward   permute:   dx = unpermute(dxs, plan)  (unweighted combine)
               unpermute: dys[row(t, j)] = w[t, j] · dy[t] (0 on other rows),
                          dw[t, j] = <dy[t], ys[row(t, j)]> (0 for skipped slots)
                          (_scatter_rows_kernel, or _combine_bwd_kernel when dw is needed)

Every kernel works per token, never per row: permute reads each token once and writes its k
rows (T·D read, M·D written), the combine reads the k rows of a token and writes it once. No
atomics: each output element has one writer, the combine adds the slots in the order
j = 0..k-1 in float32 (float64 for float64), multiply then add, like the reference (launched
with ``enable_fp_fusion=False``: no FMA contraction), so the result is bitwise deterministic and
bitwise equal to the reference's where the loads are.

Bounds and corrupt plans (``moela.reference.dispatch``'s rule): a slot writes row
``r = slot_to_row[s]`` only when r lies in [0, M) and ``row_to_slot[r] == s`` (the row's one
owner); extra programs, ``PAD_ROWS`` rows each, zero every row no slot owns (padding rows and
rows a corrupt plan leaves unowned). Reads take rows in [0, M) only. Every output element is
written, and no index read from memory addresses anything out of bounds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from moela.reference._checks import TensorSpec, check_bool, check_tensor
from moela.reference.dispatch import (
    RoutingPlan,
    check_permute,
    check_permute_fp8,
    check_plan,
    check_unpermute,
    validate_plan,
)

from ._common import autotune, cdiv, kernel_rows, next_power_of_2
from .factory import kernel_op
from .tl_helpers import abs_bits, block_scale, saturate_to_fp8

__all__ = ["permute", "unpermute", "permute_op", "permute_fp8_op", "unpermute_op", "unpermute_bwd_op", "PAD_ROWS"]

#: Rows one padding program owns.
PAD_ROWS = 32


def _pad_block_d(dtype: torch.dtype) -> int:
    """Columns of a padding program's zero tile: 8 rows × 2 KB (few registers per thread)."""
    return 2048 // torch.empty(0, dtype=dtype).element_size()


# ----------------------------------------------------------------------------------------
# Configs: keyed on D and k, one config under the interpreter.
# ----------------------------------------------------------------------------------------


def _copy_configs() -> list[triton.Config]:
    """BLOCK_D columns per program: 16 B per thread at 1024 bf16 and 4 warps."""
    return [
        triton.Config({"BLOCK_D": 1024}, num_warps=4),
        triton.Config({"BLOCK_D": 2048}, num_warps=8),
        triton.Config({"BLOCK_D": 2048}, num_warps=4),
        triton.Config({"BLOCK_D": 512}, num_warps=4),
        triton.Config({"BLOCK_D": 4096}, num_warps=8),
        triton.Config({"BLOCK_D": 1024}, num_warps=8),
    ]


def _bwd_configs() -> list[triton.Config]:
    """The combine backward holds a (k, BLOCK_D) tile of ys per step (sm_90 ptxas: <= 107
    registers, no spills, for bf16 / fp32)."""
    return [
        triton.Config({"BLOCK_D": 512}, num_warps=8),
        triton.Config({"BLOCK_D": 256}, num_warps=4),
        triton.Config({"BLOCK_D": 1024}, num_warps=8),
        triton.Config({"BLOCK_D": 256}, num_warps=2),
    ]


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------


@triton.jit
def _owned_rows(row_to_slot_ptr, slot_to_row_ptr, r, M, N_SLOTS):
    """For rows ``r``: does a slot own the row (``row_to_slot[r] = s`` in [0, N_SLOTS) and
    ``slot_to_row[s] == r``)? Rows past M count as owned (nothing to write there)."""
    s = tl.load(row_to_slot_ptr + r, mask=r < M, other=-1)
    s_ok = (s >= 0) & (s < N_SLOTS)
    back = tl.load(slot_to_row_ptr + s, mask=(r < M) & s_ok, other=-1)
    return (r >= M) | (s_ok & (back == r))


@triton.jit
def _slot_rows(slot_to_row_ptr, row_to_slot_ptr, t, M, K: tl.constexpr, K_P: tl.constexpr):
    """Token t's rows (K_P vector, -1 past k) and whether slot (t, j) owns its row (may write it)."""
    j = tl.arange(0, K_P)
    rows = tl.load(slot_to_row_ptr + t * K + j, mask=j < K, other=-1)
    in_range = (rows >= 0) & (rows < M)
    owner = tl.load(row_to_slot_ptr + rows, mask=in_range, other=-1)
    return rows, in_range & (owner == t * K + j)


@triton.jit
def _fill_unowned_rows(row_to_slot_ptr, slot_to_row_ptr, out_ptr, M, N_SLOTS, D, stride_o, pad_pid, fill,
                       BLOCK_R: tl.constexpr, SUB_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Write ``fill`` to columns [0, D) of the rows of ``[pad_pid·BLOCK_R, +BLOCK_R)`` that no slot
    owns (``_owned_rows``): padding rows, and rows a corrupt plan leaves unowned.

    Programs without such rows return after two loads; the others store (SUB_R, BLOCK_D)
    tiles (small tiles: few registers, so the copy programs keep their occupancy).
    """
    r = pad_pid * BLOCK_R + tl.arange(0, BLOCK_R)
    if tl.min(_owned_rows(row_to_slot_ptr, slot_to_row_ptr, r, M, N_SLOTS).to(tl.int32), 0) == 0:
        vals = (tl.zeros([SUB_R, BLOCK_D], tl.float32) + fill).to(out_ptr.dtype.element_ty)
        for sub in tl.static_range(BLOCK_R // SUB_R):
            rs = pad_pid * BLOCK_R + sub * SUB_R + tl.arange(0, SUB_R)
            pad = ~_owned_rows(row_to_slot_ptr, slot_to_row_ptr, rs, M, N_SLOTS)
            if tl.max(pad.to(tl.int32), 0) > 0:
                base = out_ptr + rs.to(tl.int64)[:, None] * stride_o
                for d0 in range(0, D, BLOCK_D):
                    cols = d0 + tl.arange(0, BLOCK_D)
                    tl.store(base + cols[None, :], vals, mask=pad[:, None] & (cols < D)[None, :])


@triton.jit
def _scatter_rows_kernel(
    x_ptr, w_ptr, slot_to_row_ptr, row_to_slot_ptr, out_ptr,
    T, D, M, stride_x, stride_o,
    K: tl.constexpr, K_P: tl.constexpr, HAS_W: tl.constexpr, IS_F64: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, PAD_BLOCK_D: tl.constexpr,
):
    """``out[slot_to_row[t, j]] = x[t]`` (times ``w[t, j]`` with HAS_W) on owned rows; other rows 0.

    grid: (T·cdiv(D, BLOCK_D) + cdiv(M, BLOCK_R),). Program ``t·NC + c`` loads chunk c of
    token t once and stores it to the token's k rows; the last cdiv(M, BLOCK_R) programs
    zero the unowned rows among their BLOCK_R rows.
    """
    pid = tl.program_id(0)
    NC = tl.cdiv(D, BLOCK_D)
    if pid < T * NC:
        t = (pid // NC).to(tl.int64)
        cols = (pid % NC) * BLOCK_D + tl.arange(0, BLOCK_D)
        cmask = cols < D
        x = tl.load(x_ptr + t * stride_x + cols, mask=cmask)
        rows, owns = _slot_rows(slot_to_row_ptr, row_to_slot_ptr, t, M, K, K_P)
        if HAS_W:
            j = tl.arange(0, K_P)
            acc_ty: tl.constexpr = tl.float64 if IS_F64 else tl.float32
            w = tl.load(w_ptr + t * K + j, mask=j < K, other=0).to(acc_ty)
            v = (x.to(acc_ty)[None, :] * w[:, None]).to(out_ptr.dtype.element_ty)
        else:
            v = tl.broadcast_to(x[None, :], (K_P, BLOCK_D))
        dst = out_ptr + rows.to(tl.int64)[:, None] * stride_o + cols[None, :]
        tl.store(dst, v, mask=owns[:, None] & cmask[None, :])
    else:
        _fill_unowned_rows(row_to_slot_ptr, slot_to_row_ptr, out_ptr, M, T * K, D, stride_o, pid - T * NC, 0.0,
                           BLOCK_R, 8, PAD_BLOCK_D)


@triton.jit
def _scatter_rows_fp8_kernel(
    x_ptr, slot_to_row_ptr, row_to_slot_ptr, q_ptr, s_ptr,
    T, D, M, num_kb, stride_x, stride_q, stride_s,
    K: tl.constexpr, K_P: tl.constexpr, QBLOCK: tl.constexpr, QBLOCK_P2: tl.constexpr, NKB: tl.constexpr,
    UE8M0: tl.constexpr, BLOCK_R: tl.constexpr, PAD_BLOCK_D: tl.constexpr, PAD_BLOCK_S: tl.constexpr,
):
    """permute with 1×QBLOCK e4m3 quantization: ``quant_act(permute(x))`` with one quantization per token.

    grid: (T·cdiv(num_kb, NKB) + cdiv(M, BLOCK_R),). Program ``t·NC + c`` quantizes blocks
    ``[c·NKB, (c+1)·NKB)`` of token t (``quant_act``'s amax / scale / saturation, bit for bit)
    and stores values and scales to the token's owned rows; the last programs write the
    unowned rows: zeros with the scale of an all-zero block, as ``quant_act`` of a zero row.
    """
    pid = tl.program_id(0)
    NC = tl.cdiv(num_kb, NKB)
    if pid < T * NC:
        t = (pid // NC).to(tl.int64)
        kb = (pid % NC) * NKB + tl.arange(0, NKB)
        inner = tl.arange(0, QBLOCK_P2)
        cols = kb[:, None] * QBLOCK + inner[None, :]
        mask = (kb < num_kb)[:, None] & (inner < QBLOCK)[None, :] & (cols < D)
        x = tl.load(x_ptr + t * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        scale = block_scale(tl.max(abs_bits(x), 1).to(tl.float32, bitcast=True), UE8M0)
        q = saturate_to_fp8(x, scale[:, None], q_ptr.dtype.element_ty)
        rows, owns = _slot_rows(slot_to_row_ptr, row_to_slot_ptr, t, M, K, K_P)
        j = tl.arange(0, K_P)
        for jj in tl.static_range(K):
            row = tl.sum(tl.where(j == jj, rows, 0), 0).to(tl.int64)
            ok = tl.sum(tl.where(j == jj, owns.to(tl.int32), 0), 0) > 0
            tl.store(q_ptr + row * stride_q + cols, q, mask=mask & ok)
            tl.store(s_ptr + row * stride_s + kb, scale, mask=(kb < num_kb) & ok)
    else:
        pad = pid - T * NC
        _fill_unowned_rows(row_to_slot_ptr, slot_to_row_ptr, q_ptr, M, T * K, D, stride_q, pad, 0.0, BLOCK_R, 8,
                           PAD_BLOCK_D)
        zero_scale = block_scale(tl.zeros([1, 1], tl.float32), UE8M0)
        _fill_unowned_rows(row_to_slot_ptr, slot_to_row_ptr, s_ptr, M, T * K, num_kb, stride_s, pad, zero_scale,
                           BLOCK_R, 8, PAD_BLOCK_S)


@triton.jit
def _combine_kernel(
    ys_ptr, w_ptr, slot_to_row_ptr, out_ptr, D, M, stride_y, stride_o,
    K: tl.constexpr, HAS_W: tl.constexpr, IS_F64: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``out[t] = Σ_j w[t, j] · ys[slot_to_row[t, j]]`` over slots whose row lies in [0, M), j in order.

    grid: (T·cdiv(D, BLOCK_D),); program ``t·NC + c`` owns chunk c of token t. Skipped slots
    add 0 (whatever their weight), as in the reference.
    """
    pid = tl.program_id(0)
    NC = tl.cdiv(D, BLOCK_D)
    t = (pid // NC).to(tl.int64)
    cols = (pid % NC) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    acc_ty: tl.constexpr = tl.float64 if IS_F64 else tl.float32
    acc = tl.zeros([BLOCK_D], acc_ty)
    for j in tl.static_range(K):
        row = tl.load(slot_to_row_ptr + t * K + j)
        valid = (row >= 0) & (row < M)
        v = tl.load(ys_ptr + row.to(tl.int64) * stride_y + cols, mask=cmask & valid, other=0).to(acc_ty)
        if HAS_W:
            v = v * tl.load(w_ptr + t * K + j).to(acc_ty)
        acc = acc + tl.where(valid, v, 0)
    tl.store(out_ptr + t * stride_o + cols, acc.to(out_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _combine_bwd_kernel(
    dy_ptr, ys_ptr, w_ptr, slot_to_row_ptr, row_to_slot_ptr, dys_ptr, dw_ptr,
    T, D, M, stride_dy, stride_y, stride_dys,
    K: tl.constexpr, K_P: tl.constexpr, IS_F64: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, PAD_BLOCK_D: tl.constexpr,
):
    """Backward of the weighted combine: ``dys[row(t, j)] = w[t, j]·dy[t]`` (owned rows),
    ``dw[t, j] = <dy[t], ys[row(t, j)]>`` (rows in [0, M)).

    grid: (T + cdiv(M, BLOCK_R),). Program t walks D in BLOCK_D steps (dw is a full dot
    product, reduced in a fixed order: deterministic); the last programs zero unowned rows.
    """
    pid = tl.program_id(0)
    if pid < T:
        t = pid.to(tl.int64)
        acc_ty: tl.constexpr = tl.float64 if IS_F64 else tl.float32
        j = tl.arange(0, K_P)
        rows, owns = _slot_rows(slot_to_row_ptr, row_to_slot_ptr, t, M, K, K_P)
        valid = (rows >= 0) & (rows < M)
        w = tl.load(w_ptr + t * K + j, mask=j < K, other=0).to(acc_ty)
        dw = tl.zeros([K_P], acc_ty)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            cmask = cols < D
            dy = tl.load(dy_ptr + t * stride_dy + cols, mask=cmask, other=0).to(acc_ty)
            m2 = valid[:, None] & cmask[None, :]
            ys = tl.load(ys_ptr + rows.to(tl.int64)[:, None] * stride_y + cols[None, :], mask=m2, other=0)
            dw += tl.sum(dy[None, :] * ys.to(acc_ty), axis=1)
            g = (dy[None, :] * w[:, None]).to(dys_ptr.dtype.element_ty)
            tl.store(dys_ptr + rows.to(tl.int64)[:, None] * stride_dys + cols[None, :], g,
                     mask=owns[:, None] & cmask[None, :])
        tl.store(dw_ptr + t * K + j, tl.where(valid, dw, 0).to(dw_ptr.dtype.element_ty), mask=j < K)
    else:
        _fill_unowned_rows(row_to_slot_ptr, slot_to_row_ptr, dys_ptr, M, T * K, D, stride_dys, pid - T, 0.0,
                           BLOCK_R, 8, PAD_BLOCK_D)


def _fp8_configs() -> list[triton.Config]:
    """NKB quantization blocks per program (8 × 128 = 1024 columns)."""
    return [
        triton.Config({"NKB": 8}, num_warps=4),
        triton.Config({"NKB": 16}, num_warps=8),
        triton.Config({"NKB": 4}, num_warps=4),
        triton.Config({"NKB": 8}, num_warps=8),
    ]


_COPY_KEY = ["D", "K"]
_scatter_tuned = autotune("permute", _copy_configs(), key=_COPY_KEY)(_scatter_rows_kernel)
_scatter_fp8_tuned = autotune("permute_fp8", _fp8_configs(), key=["D", "K", "QBLOCK"])(
    _scatter_rows_fp8_kernel)
_combine_tuned = autotune("unpermute", _copy_configs(), key=_COPY_KEY)(_combine_kernel)
_combine_bwd_tuned = autotune("unpermute_bwd", _bwd_configs(), key=_COPY_KEY)(
    _combine_bwd_kernel)

# No FMA contraction: the combine multiplies, rounds, then adds, like the reference.
_NO_FMA = dict(enable_fp_fusion=False)


# ----------------------------------------------------------------------------------------
# The ops (kernels.factory) and the public functions (which take a RoutingPlan)
# ----------------------------------------------------------------------------------------


def _launch(config: triton.Config | None) -> dict:
    return {} if config is None else config.all_kwargs()


def _rowmajor(t: torch.Tensor) -> torch.Tensor:
    """A 2-D tensor with unit column stride (copied only when it has another layout)."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _unit_stride(name: str, out: torch.Tensor) -> None:
    if out.numel() and out.stride(-1) != 1:
        raise ValueError(f"{name}: expected a unit stride along the last dim, got strides {out.stride()}")


def _permute_domain(x, slot_to_row, row_to_slot) -> None:
    kernel_rows("permute", "plan.row_to_slot", row_to_slot.shape[0])


def _permute_setup(ctx, inputs, output) -> None:
    _, slot_to_row, row_to_slot = inputs
    ctx.save_for_backward(slot_to_row, row_to_slot)


def _permute_backward(ctx, dxs: torch.Tensor):
    slot_to_row, row_to_slot = ctx.saved_tensors
    return unpermute_op(dxs, slot_to_row, row_to_slot, None), None, None


@kernel_op("permute", contract=check_permute, domain=_permute_domain, backward=_permute_backward,
           setup_context=_permute_setup)
def permute_op(out, x: Tensor, slot_to_row: Tensor, row_to_slot: Tensor, *, config=None) -> Tensor:
    """``permute`` on the plan's maps: ``out[slot_to_row[t, j]] = x[t]`` for owned rows, other rows 0.

    x: (T, D) fp16/bf16/fp32/fp64; slot_to_row: (T, k) int32; row_to_slot: (M,) int32.
    Backward: ``dx[t] = Σ_j dxs[slot_to_row[t, j]]`` (the unweighted combine).
    """
    _scatter(out, x, slot_to_row, row_to_slot, None, config)


def _scatter(out, x, slot_to_row, row_to_slot, topk_weights, config) -> None:
    """The scatter kernel: ``out[row(t, j)] = x[t]`` (``· w[t, j]`` with weights, computed in
    float32 or float64 and rounded to out's dtype), unowned rows 0."""
    _unit_stride("out", out)
    (T, D), K, M = x.shape, slot_to_row.shape[1], row_to_slot.shape[0]
    if out.numel() == 0:
        return
    x = _rowmajor(x)
    slot_to_row, row_to_slot = slot_to_row.contiguous(), row_to_slot.contiguous()
    w = None if topk_weights is None else topk_weights.contiguous()
    kernel = _scatter_tuned if config is None else _scatter_rows_kernel

    def grid(meta: dict) -> tuple[int]:
        return (T * cdiv(D, meta["BLOCK_D"]) + cdiv(M, PAD_ROWS),)

    kernel[grid](
        x, x if w is None else w, slot_to_row, row_to_slot, out, T, D, M, x.stride(0), out.stride(0),
        K=K, K_P=next_power_of_2(K), HAS_W=w is not None, IS_F64=x.dtype == torch.float64,
        BLOCK_R=PAD_ROWS, PAD_BLOCK_D=_pad_block_d(x.dtype), **_NO_FMA, **_launch(config),
    )


def _permute_fp8_domain(x, slot_to_row, row_to_slot, block=128, scale_fmt=None) -> None:
    kernel_rows("permute", "plan.row_to_slot", row_to_slot.shape[0])
    if block > 1024:
        raise ValueError(f"block: the Triton permute(fp8=True) kernel takes blocks up to 1024, got {block} "
                         f"(moela.reference.permute takes any)")


@kernel_op("permute_fp8", contract=check_permute_fp8, domain=_permute_fp8_domain, fp8=True)
def permute_fp8_op(out, x: Tensor, slot_to_row: Tensor, row_to_slot: Tensor, block: int = 128,
                   scale_fmt: str | None = None, *, config=None) -> tuple[Tensor, Tensor]:
    """``permute(..., fp8=True)`` on the plan's maps: ``(q (M, D) e4m3, scale (M, ceil(D/block)) f32)``.

    Bit for bit ``quant_act(permute(x), block, scale_fmt)``: each token is quantized once and its
    values and scales are copied to its owned rows; unowned rows hold zeros and the scale of a
    zero block. No gradient.
    """
    q, s = out
    for name, buf in (("out[0]", q), ("out[1]", s)):
        if not buf.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous tensor, got strides {buf.stride()}")
    (T, D), K, M = x.shape, slot_to_row.shape[1], row_to_slot.shape[0]
    num_kb = cdiv(D, block)
    if M == 0 or D == 0:
        return
    x = _rowmajor(x)
    slot_to_row, row_to_slot = slot_to_row.contiguous(), row_to_slot.contiguous()

    def grid(meta: dict) -> tuple[int]:
        return (T * cdiv(num_kb, meta["NKB"]) + cdiv(M, PAD_ROWS),)

    kernel = _scatter_fp8_tuned if config is None else _scatter_rows_fp8_kernel
    kernel[grid](
        x, slot_to_row, row_to_slot, q, s, T, D, M, num_kb, x.stride(0), q.stride(0), s.stride(0),
        K=K, K_P=next_power_of_2(K), QBLOCK=block, QBLOCK_P2=next_power_of_2(block), UE8M0=scale_fmt == "ue8m0",
        BLOCK_R=PAD_ROWS, PAD_BLOCK_D=1024, PAD_BLOCK_S=64, **_launch(config),
    )


def _unpermute_setup(ctx, inputs, output) -> None:
    ys, slot_to_row, row_to_slot, topk_weights = inputs
    ctx.has_w = topk_weights is not None
    ctx.save_for_backward(ys, slot_to_row, row_to_slot, topk_weights)


def _unpermute_backward(ctx, dy: torch.Tensor):
    ys, slot_to_row, row_to_slot, topk_weights = ctx.saved_tensors
    if not ctx.has_w:
        dys, dw = permute_op(dy, slot_to_row, row_to_slot), None
    else:
        need_dw = ctx.needs_input_grad[3]
        dys, dw = unpermute_bwd_op(dy, ys, slot_to_row, row_to_slot, topk_weights, need_dw)
        dw = dw if need_dw else None
    return (dys if ctx.needs_input_grad[0] else None), None, None, dw


def _unpermute_domain(ys, slot_to_row, row_to_slot, topk_weights=None) -> None:
    kernel_rows("unpermute", "ys", ys.shape[0])


@kernel_op("unpermute", contract=check_unpermute, domain=_unpermute_domain, backward=_unpermute_backward,
           setup_context=_unpermute_setup)
def unpermute_op(out, ys: Tensor, slot_to_row: Tensor, row_to_slot: Tensor, topk_weights: Tensor | None = None, *,
                 config=None) -> Tensor:
    """``unpermute`` on the plan's maps: ``out[t] = Σ_j w[t, j] · ys[slot_to_row[t, j]]`` -> (T, D).

    ys: (M, D) fp16/bf16/fp32/fp64; slot_to_row: (T, k) int32; row_to_slot: (M,) int32 (the
    backward's owner map); topk_weights: optional (T, k) float (None: unit weights).
    """
    _unit_stride("out", out)
    (T, K), (M, D) = slot_to_row.shape, ys.shape
    if out.numel() == 0:
        return
    ys = _rowmajor(ys)
    slot_to_row = slot_to_row.contiguous()
    topk_weights = None if topk_weights is None else topk_weights.contiguous()
    kernel = _combine_tuned if config is None else _combine_kernel

    def grid(meta: dict) -> tuple[int]:
        return (T * cdiv(D, meta["BLOCK_D"]),)

    kernel[grid](
        ys, ys if topk_weights is None else topk_weights, slot_to_row, out, D, M, ys.stride(0), out.stride(0),
        K=K, HAS_W=topk_weights is not None, IS_F64=ys.dtype == torch.float64, **_NO_FMA, **_launch(config),
    )


def _check_unpermute_bwd(dy: object, ys: object, slot_to_row: object, row_to_slot: object, topk_weights: object,
                         need_dw: object) -> tuple[TensorSpec, TensorSpec]:
    """The backward op's contract: the forward's with weights, and dy (T, D) of ys's dtype;
    returns the specs of dys (M, D) and dw ((T, k) with ``need_dw``, else an empty (0,))."""
    check_unpermute(ys, slot_to_row, row_to_slot, topk_weights)
    check_tensor("topk_weights", topk_weights)
    check_tensor("dy", dy, dtypes=(ys.dtype,), shape=(slot_to_row.shape[0], ys.shape[1]))
    dw = tuple(topk_weights.shape) if check_bool("need_dw", need_dw) else (0,)
    return TensorSpec(tuple(ys.shape), ys.dtype), TensorSpec(dw, topk_weights.dtype)


@kernel_op("unpermute_bwd", contract=_check_unpermute_bwd)
def unpermute_bwd_op(out, dy: Tensor, ys: Tensor, slot_to_row: Tensor, row_to_slot: Tensor, topk_weights: Tensor,
                     need_dw: bool, *, config=None) -> tuple[Tensor, Tensor]:
    """The weighted combine's backward: ``(dys (M, D) in ys's dtype, dw (T, k) in w's dtype)``.

    ``dys[row(t, j)] = w[t, j]·dy[t]`` on owned rows (0 elsewhere); with ``need_dw``,
    ``dw[t, j] = <dy[t], ys[row(t, j)]>`` in float32 (float64 for float64 ys), 0 for skipped
    slots (without it, dw is empty and the plain weighted scatter runs).
    """
    dys, dw = out
    if not need_dw:
        _scatter(dys, dy, slot_to_row, row_to_slot, topk_weights, config)
        return
    _unit_stride("out[0]", dys)
    if not dw.is_contiguous():
        raise ValueError(f"out[1]: expected a contiguous dw buffer, got strides {dw.stride()}")
    (T, K), (M, D) = slot_to_row.shape, ys.shape
    if T + M == 0:
        return
    dy, ys = _rowmajor(dy), _rowmajor(ys)
    slot_to_row, row_to_slot = slot_to_row.contiguous(), row_to_slot.contiguous()
    topk_weights = topk_weights.contiguous()
    kernel = _combine_bwd_tuned if config is None else _combine_bwd_kernel
    kernel[(T + cdiv(M, PAD_ROWS),)](
        dy, ys, topk_weights, slot_to_row, row_to_slot, dys, dw, T, D, M, dy.stride(0), ys.stride(0), dys.stride(0),
        K=K, K_P=next_power_of_2(K), IS_F64=ys.dtype == torch.float64, BLOCK_R=PAD_ROWS,
        PAD_BLOCK_D=_pad_block_d(ys.dtype), **_NO_FMA, **_launch(config),
    )


def permute(
    x: torch.Tensor, plan: RoutingPlan, *, validate: bool = False, fp8: bool = False, block: int = 128,
    scale_fmt: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Gather tokens into expert-sorted rows: ``x (T, D) -> xs (M, D)``; padding rows are 0.

    Same contract as ``moela.reference.permute`` (Triton, differentiable, no host sync).

    Args:
        x: (T, D) fp16/bf16/fp32/fp64 on CUDA (or CPU under the interpreter).
        plan: the ``RoutingPlan`` of the tokens (``moela.kernels.routing.make_routing``).
        validate: also check the plan's values (synchronises with the device).
        fp8: emit FP8 rows instead: ``(q (M, D) float8_e4m3fn, scale (M, ceil(D/block)) float32)``,
            bit for bit ``quant_act(permute(x, plan), block, scale_fmt)`` (each token quantized
            once, for its k rows; no gradient). block / scale_fmt: as in ``quant_act``.
    Returns:
        (M, D) in x's dtype, ``M = plan.max_rows``; row ``slot_to_row[t, j]`` holds ``x[t]``.
        Backward: ``dx[t] = Σ_j dxs[slot_to_row[t, j]]`` (the unweighted combine).

    Example::

        plan = make_routing(ids, n_experts=256)
        xs = permute(x, plan)               # (M, D), grouped by expert
        ys = grouped_gemm(xs, w, plan.offsets)
        y = unpermute(ys, plan, weights)    # (T, D)
        q, s = permute(x, plan, fp8=True)   # for fp8_grouped_gemm(q, s, ...)
    """
    check_tensor("x", x, ndim=2)
    plan = check_plan(plan, x.shape[0], x.device)
    if check_bool("validate", validate):
        validate_plan(plan)
    if check_bool("fp8", fp8):
        return permute_fp8_op(x, plan.slot_to_row, plan.row_to_slot, block, scale_fmt)
    return permute_op(x, plan.slot_to_row, plan.row_to_slot)


def unpermute(ys: torch.Tensor, plan: RoutingPlan, topk_weights: torch.Tensor | None = None, *,
              validate: bool = False) -> torch.Tensor:
    """Weighted combine: ``y[t] = Σ_j w[t, j] · ys[slot_to_row[t, j]]`` over valid slots.

    Same contract as ``moela.reference.unpermute`` (Triton, differentiable, no host sync, no
    atomics, bitwise deterministic).

    Args:
        ys: (M, D) expert outputs in row order, fp16/bf16/fp32/fp64, ``M = plan.max_rows``.
        plan: the ``RoutingPlan`` the rows were permuted with.
        topk_weights: (T, k) float or None (unit weights).
        validate: also check the plan's values (synchronises with the device).
    Returns:
        (T, D) in ys's dtype, accumulated in float32 (float64 for float64) with the slots added
        in the order j = 0..k-1. Gradients flow to ys (``w·dy`` on each row, 0 on padding rows)
        and to topk_weights (``<dy[t], ys[row(t, j)]>``, 0 for skipped slots).
    """
    check_tensor("ys", ys, ndim=2)
    plan = check_plan(plan, device=ys.device)
    if check_bool("validate", validate):
        validate_plan(plan)
    return unpermute_op(ys, plan.slot_to_row, plan.row_to_slot, topk_weights)
