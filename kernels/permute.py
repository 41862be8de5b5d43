"""Token dispatch in Triton: permute (tokens -> expert rows) and unpermute (the weighted combine).

Legend: T tokens, k slots per token, D hidden dim, M = ``plan.max_rows`` rows grouped by
expert, ``plan`` a ``RoutingPlan`` (``moela.kernels.routing.make_routing``).

    permute    xs[slot_to_row[t, j]] = x[t]; padding rows 0             (_scatter_rows_kernel)
               or FP8: quant_act(xs) with one quantization per token      (_scatter_rows_fp8_kernel)
    unpermute  y[t] = Σ_j w[t, j] · ys[slot_to_row[t, j]], j = 0..k-1    (_combine_kernel)
    backward   permute:   dx = unpermute(dxs, plan)  (unweighted combine)
               unpermute: dys[row(t, j)] = w[t, j] · dy[t] (0 on padding rows),
                          dw[t, j] = <dy[t], ys[row(t, j)]> (0 for skipped slots)
                          (_scatter_rows_kernel, or _combine_bwd_kernel when dw is needed)

Every kernel works per token, never per row: permute reads each token once and writes its k
rows (T·D read, M·D written, not k·T·D read), the combine reads the k rows of a token and
writes it once. No atomics: each output element has one writer, the combine adds the slots
in the order j = 0..k-1 in float32 (float64 for float64), multiply then add, like the
reference (launched with ``enable_fp_fusion=False``: no FMA contraction), so the result is
bitwise deterministic and bitwise equal to the reference's where the loads are. Padding rows
(``row_to_token == -1``) are zeroed by extra programs, each owning ``BLOCK_R`` rows.

H200 reasoning (not measured: no GPU was available while this was written). Copies move
``BLOCK_D`` contiguous elements per program and row (1024 bf16 = 2 KB, 16 B per thread with
4 warps: 128-bit accesses), k independent loads or stores in flight per program, ~115k
programs at T = 16384, D = 7168 (7 chunks per token): bound by HBM. Goal: >= 80% of the
copy bandwidth (bytes read + written) at T = 16384, D = 7168, k = 8; unmeasured here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moela.reference._checks import FLOAT_DTYPES, check_same_device, check_tensor
from moela.reference.dispatch import RoutingPlan

from ._common import (
    autotune,
    autotune_configs,
    cdiv,
    check_kernel_device,
    next_power_of_2,
    on_tensor_device,
    run_direct,
)
from .fp8_quant import FP8_DTYPE, _abs_bits, _block_scale, _saturate_to_fp8, check_fp8_capability, check_scale_fmt
from .routing import check_plan, validate_plan

__all__ = ["permute", "unpermute", "permute_fwd", "permute_fp8_fwd", "unpermute_fwd", "unpermute_bwd", "PAD_ROWS"]

#: Rows one padding program owns.
PAD_ROWS = 32


def _pad_block_d(dtype: torch.dtype) -> int:
    """Columns of a padding program's zero tile: 8 rows × 2 KB (few registers per thread)."""
    return 2048 // torch.empty(0, dtype=dtype).element_size()


# ----------------------------------------------------------------------------------------
# Configs (STYLE.md 6): keyed on D and k, one config under the interpreter.
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
def _fill_padding_rows(row_to_token_ptr, out_ptr, M, D, stride_o, pad_pid, fill,
                       BLOCK_R: tl.constexpr, SUB_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Write ``fill`` to columns [0, D) of the rows of ``[pad_pid·BLOCK_R, +BLOCK_R)`` whose
    ``row_to_token`` is -1.

    Programs without padding rows return after one load; the others store (SUB_R, BLOCK_D)
    tiles (small tiles: few registers, so the copy programs keep their occupancy).
    """
    r = pad_pid * BLOCK_R + tl.arange(0, BLOCK_R)
    tok = tl.load(row_to_token_ptr + r, mask=r < M, other=0)
    if tl.max(((r < M) & (tok < 0)).to(tl.int32), 0) > 0:
        vals = (tl.zeros([SUB_R, BLOCK_D], tl.float32) + fill).to(out_ptr.dtype.element_ty)
        for sub in tl.static_range(BLOCK_R // SUB_R):
            rs = pad_pid * BLOCK_R + sub * SUB_R + tl.arange(0, SUB_R)
            pad = (rs < M) & (tl.load(row_to_token_ptr + rs, mask=rs < M, other=0) < 0)
            if tl.max(pad.to(tl.int32), 0) > 0:
                base = out_ptr + rs.to(tl.int64)[:, None] * stride_o
                for d0 in range(0, D, BLOCK_D):
                    cols = d0 + tl.arange(0, BLOCK_D)
                    tl.store(base + cols[None, :], vals, mask=pad[:, None] & (cols < D)[None, :])


@triton.jit
def _scatter_rows_kernel(
    x_ptr, w_ptr, slot_to_row_ptr, row_to_token_ptr, out_ptr,
    T, D, M, stride_x, stride_o,
    K: tl.constexpr, K_P: tl.constexpr, HAS_W: tl.constexpr, IS_F64: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, PAD_BLOCK_D: tl.constexpr,
):
    """``out[slot_to_row[t, j]] = x[t]`` (times ``w[t, j]`` with HAS_W); padding rows 0.

    grid: (T·cdiv(D, BLOCK_D) + cdiv(M, BLOCK_R),). Program ``t·NC + c`` loads chunk c of
    token t once and stores it to the token's k rows; the last cdiv(M, BLOCK_R) programs
    zero the padding rows among their BLOCK_R rows.
    """
    pid = tl.program_id(0)
    NC = tl.cdiv(D, BLOCK_D)
    if pid < T * NC:
        t = (pid // NC).to(tl.int64)
        cols = (pid % NC) * BLOCK_D + tl.arange(0, BLOCK_D)
        cmask = cols < D
        x = tl.load(x_ptr + t * stride_x + cols, mask=cmask)
        j = tl.arange(0, K_P)
        rows = tl.load(slot_to_row_ptr + t * K + j, mask=j < K, other=-1)
        if HAS_W:
            acc_ty: tl.constexpr = tl.float64 if IS_F64 else tl.float32
            w = tl.load(w_ptr + t * K + j, mask=j < K, other=0).to(acc_ty)
            v = (x.to(acc_ty)[None, :] * w[:, None]).to(out_ptr.dtype.element_ty)
        else:
            v = tl.broadcast_to(x[None, :], (K_P, BLOCK_D))
        dst = out_ptr + rows.to(tl.int64)[:, None] * stride_o + cols[None, :]
        tl.store(dst, v, mask=(rows >= 0)[:, None] & cmask[None, :])
    else:
        _fill_padding_rows(row_to_token_ptr, out_ptr, M, D, stride_o, pid - T * NC, 0.0, BLOCK_R, 8, PAD_BLOCK_D)


@triton.jit
def _scatter_rows_fp8_kernel(
    x_ptr, slot_to_row_ptr, row_to_token_ptr, q_ptr, s_ptr,
    T, D, M, num_kb, stride_x, stride_q, stride_s,
    K: tl.constexpr, QBLOCK: tl.constexpr, QBLOCK_P2: tl.constexpr, NKB: tl.constexpr, UE8M0: tl.constexpr,
    BLOCK_R: tl.constexpr, PAD_BLOCK_D: tl.constexpr, PAD_BLOCK_S: tl.constexpr,
):
    """permute with 1×QBLOCK e4m3 quantization: ``quant_act(permute(x))`` with one quantization per token.

    grid: (T·cdiv(num_kb, NKB) + cdiv(M, BLOCK_R),). Program ``t·NC + c`` quantizes blocks
    ``[c·NKB, (c+1)·NKB)`` of token t (``fp8_quant``'s amax / scale / saturation, bit for bit)
    and stores values and scales to the token's k rows; the last programs write the padding
    rows: zeros with the scale of an all-zero block, as ``quant_act`` of a zero row.
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
        scale = _block_scale(tl.max(_abs_bits(x), 1).to(tl.float32, bitcast=True), UE8M0)
        q = _saturate_to_fp8(x, scale[:, None], q_ptr.dtype.element_ty)
        for j in tl.static_range(K):
            row = tl.load(slot_to_row_ptr + t * K + j).to(tl.int64)
            tl.store(q_ptr + row * stride_q + cols, q, mask=mask & (row >= 0))
            tl.store(s_ptr + row * stride_s + kb, scale, mask=(kb < num_kb) & (row >= 0))
    else:
        pad = pid - T * NC
        _fill_padding_rows(row_to_token_ptr, q_ptr, M, D, stride_q, pad, 0.0, BLOCK_R, 8, PAD_BLOCK_D)
        zero_scale = _block_scale(tl.zeros([1, 1], tl.float32), UE8M0)
        _fill_padding_rows(row_to_token_ptr, s_ptr, M, num_kb, stride_s, pad, zero_scale, BLOCK_R, 8, PAD_BLOCK_S)


@triton.jit
def _combine_kernel(
    ys_ptr, w_ptr, slot_to_row_ptr, out_ptr, D, stride_y, stride_o,
    K: tl.constexpr, HAS_W: tl.constexpr, IS_F64: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``out[t] = Σ_j w[t, j] · ys[slot_to_row[t, j]]`` over valid slots, j = 0..k-1 in order.

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
        v = tl.load(ys_ptr + row.to(tl.int64) * stride_y + cols, mask=cmask & (row >= 0), other=0).to(acc_ty)
        if HAS_W:
            v = v * tl.load(w_ptr + t * K + j).to(acc_ty)
        acc = acc + tl.where(row >= 0, v, 0)
    tl.store(out_ptr + t * stride_o + cols, acc.to(out_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _combine_bwd_kernel(
    dy_ptr, ys_ptr, w_ptr, slot_to_row_ptr, row_to_token_ptr, dys_ptr, dw_ptr,
    T, D, M, stride_dy, stride_y, stride_dys,
    K: tl.constexpr, K_P: tl.constexpr, IS_F64: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, PAD_BLOCK_D: tl.constexpr,
):
    """Backward of the weighted combine: ``dys[row(t, j)] = w[t, j]·dy[t]``, ``dw[t, j] = <dy[t], ys[row(t, j)]>``.

    grid: (T + cdiv(M, BLOCK_R),). Program t walks D in BLOCK_D steps (dw is a full dot
    product, reduced in a fixed order: deterministic); the last programs zero padding rows.
    """
    pid = tl.program_id(0)
    if pid < T:
        t = pid.to(tl.int64)
        acc_ty: tl.constexpr = tl.float64 if IS_F64 else tl.float32
        j = tl.arange(0, K_P)
        rows = tl.load(slot_to_row_ptr + t * K + j, mask=j < K, other=-1)
        valid = rows >= 0
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
            tl.store(dys_ptr + rows.to(tl.int64)[:, None] * stride_dys + cols[None, :], g, mask=m2)
        tl.store(dw_ptr + t * K + j, tl.where(valid, dw, 0).to(dw_ptr.dtype.element_ty), mask=j < K)
    else:
        _fill_padding_rows(row_to_token_ptr, dys_ptr, M, D, stride_dys, pid - T, 0.0, BLOCK_R, 8, PAD_BLOCK_D)


def _fp8_configs() -> list[triton.Config]:
    """NKB quantization blocks per program (8 × 128 = 1024 columns)."""
    return [
        triton.Config({"NKB": 8}, num_warps=4),
        triton.Config({"NKB": 16}, num_warps=8),
        triton.Config({"NKB": 4}, num_warps=4),
        triton.Config({"NKB": 8}, num_warps=8),
    ]


_COPY_KEY = ["D", "K"]
_scatter_tuned = autotune(autotune_configs("permute", _copy_configs()), key=_COPY_KEY)(_scatter_rows_kernel)
_scatter_fp8_tuned = autotune(autotune_configs("permute_fp8", _fp8_configs()), key=["D", "K", "QBLOCK"])(
    _scatter_rows_fp8_kernel)
_combine_tuned = autotune(autotune_configs("unpermute", _copy_configs()), key=_COPY_KEY)(_combine_kernel)
_combine_bwd_tuned = autotune(autotune_configs("unpermute_bwd", _bwd_configs()), key=_COPY_KEY)(
    _combine_bwd_kernel)

# No FMA contraction: the combine multiplies, rounds, then adds, like the reference.
_NO_FMA = dict(enable_fp_fusion=False)


# ----------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------


def _launch(config: triton.Config | None) -> dict:
    return {} if config is None else config.all_kwargs()


def _rowmajor(t: torch.Tensor) -> torch.Tensor:
    """A 2-D tensor with unit column stride (copied only when it has another layout)."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _check_out(out: torch.Tensor, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    check_tensor("out", out, dtypes=(like.dtype,), shape=shape)
    if out.device != like.device:
        raise ValueError(f"out: expected device {like.device}, got {out.device}")
    if out.numel() and out.stride(-1) != 1:
        raise ValueError(f"out: expected a unit stride along D, got strides {out.stride()}")
    return out


def _check_weights(topk_weights: torch.Tensor | None, T: int, k: int, device: torch.device) -> None:
    if topk_weights is not None:
        check_tensor("topk_weights", topk_weights, dtypes=FLOAT_DTYPES, shape=(T, k))
        if topk_weights.device != device:
            raise ValueError(f"topk_weights: expected device {device}, got {topk_weights.device}")


def _check_permute(x: object, slot_to_row: torch.Tensor, row_to_token: torch.Tensor) -> None:
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("slot_to_row", slot_to_row, ndim=2, dtypes=(torch.int32,))
    check_tensor("row_to_token", row_to_token, ndim=1, dtypes=(torch.int32,))
    if x.shape[0] != slot_to_row.shape[0]:
        raise ValueError(f"x: expected {slot_to_row.shape[0]} rows (the plan's tokens), got shape {tuple(x.shape)}")
    check_same_device(x=x, slot_to_row=slot_to_row, row_to_token=row_to_token)


def _check_unpermute(ys: object, slot_to_row: torch.Tensor, row_to_token: torch.Tensor,
                     topk_weights: torch.Tensor | None) -> None:
    check_tensor("ys", ys, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("slot_to_row", slot_to_row, ndim=2, dtypes=(torch.int32,))
    check_tensor("row_to_token", row_to_token, ndim=1, dtypes=(torch.int32,))
    if ys.shape[0] != row_to_token.shape[0]:
        raise ValueError(f"ys: expected {row_to_token.shape[0]} rows (plan.max_rows), got shape {tuple(ys.shape)}")
    check_same_device(ys=ys, slot_to_row=slot_to_row, row_to_token=row_to_token)
    _check_weights(topk_weights, *slot_to_row.shape, ys.device)


@on_tensor_device
def permute_fwd(
    x: torch.Tensor,
    slot_to_row: torch.Tensor,
    row_to_token: torch.Tensor,
    topk_weights: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """Launch the scatter: ``out[slot_to_row[t, j]] = x[t]`` (``· w[t, j]`` when weights are given).

    Args:
        x: (T, D) fp16/bf16/fp32/fp64; slot_to_row: (T, k) int32; row_to_token: (M,) int32.
        topk_weights: optional (T, k) float; the rows get ``x[t]·w[t, j]`` computed in float32
            (float64 for float64 x) and rounded to x's dtype (the combine's backward).
        out: optional (M, D) buffer of x's dtype with unit column stride; every element is written.
        config: launch with this BLOCK_D / num_warps instead of the autotuned ones.
    """
    _check_permute(x, slot_to_row, row_to_token)
    _check_weights(topk_weights, *slot_to_row.shape, x.device)
    check_kernel_device("x", x)
    (T, D), (_, K), M = x.shape, slot_to_row.shape, row_to_token.shape[0]
    out = x.new_empty(M, D) if out is None else _check_out(out, (M, D), x)
    if out.numel() == 0:
        return out
    x = _rowmajor(x)
    slot_to_row, row_to_token = slot_to_row.contiguous(), row_to_token.contiguous()
    topk_weights = None if topk_weights is None else topk_weights.contiguous()
    kernel = _scatter_tuned if config is None else _scatter_rows_kernel

    def grid(meta: dict) -> tuple[int]:
        return (T * cdiv(D, meta["BLOCK_D"]) + cdiv(M, PAD_ROWS),)

    kernel[grid](
        x, x if topk_weights is None else topk_weights, slot_to_row, row_to_token, out,
        T, D, M, x.stride(0), out.stride(0),
        K=K, K_P=next_power_of_2(K), HAS_W=topk_weights is not None, IS_F64=x.dtype == torch.float64,
        BLOCK_R=PAD_ROWS, PAD_BLOCK_D=_pad_block_d(x.dtype), **_NO_FMA, **_launch(config),
    )
    return out


@on_tensor_device
def permute_fp8_fwd(
    x: torch.Tensor,
    slot_to_row: torch.Tensor,
    row_to_token: torch.Tensor,
    block: int = 128,
    scale_fmt: str | None = None,
    *,
    out: torch.Tensor | None = None,
    scale_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the quantizing scatter: ``(q (M, D) e4m3, scale (M, ceil(D/block)) f32)``.

    Bit for bit ``quant_act(permute(x), block, scale_fmt)``: each token is quantized once and its
    values and scales are copied to its k rows; padding rows hold zeros and the scale of a zero
    block. ``out`` / ``scale_out``: optional contiguous buffers; every element is written.
    """
    _check_permute(x, slot_to_row, row_to_token)
    if not isinstance(block, int) or isinstance(block, bool) or block <= 0:
        raise ValueError(f"block: expected a positive int, got {block!r}")
    check_scale_fmt(scale_fmt)
    check_kernel_device("x", x)
    check_fp8_capability("x", x.device)
    (T, D), (_, K), M = x.shape, slot_to_row.shape, row_to_token.shape[0]
    num_kb = cdiv(D, block)
    q = x.new_empty(M, D, dtype=FP8_DTYPE) if out is None else out
    s = x.new_empty(M, num_kb, dtype=torch.float32) if scale_out is None else scale_out
    for name, buf, shape, dtype in (("out", q, (M, D), FP8_DTYPE), ("scale_out", s, (M, num_kb), torch.float32)):
        check_tensor(name, buf, dtypes=(dtype,), shape=shape)
        if buf.device != x.device or not buf.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous tensor on {x.device}")
    if M == 0 or D == 0:
        return q, s
    x = _rowmajor(x)
    slot_to_row, row_to_token = slot_to_row.contiguous(), row_to_token.contiguous()

    def grid(meta: dict) -> tuple[int]:
        return (T * cdiv(num_kb, meta["NKB"]) + cdiv(M, PAD_ROWS),)

    _scatter_fp8_tuned[grid](
        x, slot_to_row, row_to_token, q, s, T, D, M, num_kb, x.stride(0), q.stride(0), s.stride(0),
        K=K, QBLOCK=block, QBLOCK_P2=next_power_of_2(block), UE8M0=scale_fmt == "ue8m0", BLOCK_R=PAD_ROWS,
        PAD_BLOCK_D=1024, PAD_BLOCK_S=64,
    )
    return q, s


@on_tensor_device
def unpermute_fwd(
    ys: torch.Tensor,
    slot_to_row: torch.Tensor,
    topk_weights: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """Launch the combine: ``out[t] = Σ_j w[t, j] · ys[slot_to_row[t, j]]`` -> (T, D) in ys's dtype.

    Args:
        ys: (M, D) fp16/bf16/fp32/fp64; slot_to_row: (T, k) int32 (rows < M or -1).
        topk_weights: optional (T, k) float (None: unit weights).
        out: optional (T, D) buffer of ys's dtype with unit column stride; every element is written.
        config: launch with this BLOCK_D / num_warps instead of the autotuned ones.
    """
    check_tensor("ys", ys, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("slot_to_row", slot_to_row, ndim=2, dtypes=(torch.int32,))
    check_same_device(ys=ys, slot_to_row=slot_to_row)
    _check_weights(topk_weights, *slot_to_row.shape, ys.device)
    check_kernel_device("ys", ys)
    (T, K), D = slot_to_row.shape, ys.shape[1]
    out = ys.new_empty(T, D) if out is None else _check_out(out, (T, D), ys)
    if out.numel() == 0:
        return out
    ys = _rowmajor(ys)
    slot_to_row = slot_to_row.contiguous()
    topk_weights = None if topk_weights is None else topk_weights.contiguous()
    kernel = _combine_tuned if config is None else _combine_kernel

    def grid(meta: dict) -> tuple[int]:
        return (T * cdiv(D, meta["BLOCK_D"]),)

    kernel[grid](
        ys, ys if topk_weights is None else topk_weights, slot_to_row, out, D, ys.stride(0), out.stride(0),
        K=K, HAS_W=topk_weights is not None, IS_F64=ys.dtype == torch.float64, **_NO_FMA, **_launch(config),
    )
    return out


@on_tensor_device
def unpermute_bwd(
    dy: torch.Tensor,
    ys: torch.Tensor,
    slot_to_row: torch.Tensor,
    row_to_token: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    config: triton.Config | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the combine's backward with weight gradients: ``(dys (M, D) in ys's dtype, dw (T, k) in w's dtype)``.

    ``dys[row(t, j)] = w[t, j]·dy[t]`` (0 on padding rows), ``dw[t, j] = <dy[t], ys[row(t, j)]>``
    in float32 (float64 for float64 ys), 0 for skipped slots. ``out``: optional ``(dys, dw)``
    buffers; every element is written.
    """
    _check_unpermute(ys, slot_to_row, row_to_token, topk_weights)
    check_tensor("dy", dy, dtypes=(ys.dtype,), shape=(slot_to_row.shape[0], ys.shape[1]))
    check_same_device(ys=ys, dy=dy)
    check_kernel_device("ys", ys)
    (T, K), (M, D) = slot_to_row.shape, ys.shape
    if out is None:
        dys, dw = ys.new_empty(M, D), topk_weights.new_empty(T, K)
    else:
        dys, dw = _check_out(out[0], (M, D), ys), _check_out(out[1], (T, K), topk_weights)
        if not dw.is_contiguous():
            raise ValueError(f"out: expected a contiguous dw buffer, got strides {dw.stride()}")
    if T + M == 0:
        return dys, dw
    dy, ys = _rowmajor(dy), _rowmajor(ys)
    slot_to_row, row_to_token = slot_to_row.contiguous(), row_to_token.contiguous()
    topk_weights = topk_weights.contiguous()
    kernel = _combine_bwd_tuned if config is None else _combine_bwd_kernel
    kernel[(T + cdiv(M, PAD_ROWS),)](
        dy, ys, topk_weights, slot_to_row, row_to_token, dys, dw, T, D, M, dy.stride(0), ys.stride(0), dys.stride(0),
        K=K, K_P=next_power_of_2(K), IS_F64=ys.dtype == torch.float64, BLOCK_R=PAD_ROWS,
        PAD_BLOCK_D=_pad_block_d(ys.dtype), **_NO_FMA, **_launch(config),
    )
    return dys, dw


# ----------------------------------------------------------------------------------------
# The public ops (torch.library): eager, autograd and torch.compile(fullgraph=True)
# ----------------------------------------------------------------------------------------


@torch.library.custom_op("moela::permute", mutates_args=())
def _permute_op(x: torch.Tensor, slot_to_row: torch.Tensor, row_to_token: torch.Tensor) -> torch.Tensor:
    return permute_fwd(x, slot_to_row, row_to_token)


@_permute_op.register_fake
def _(x: torch.Tensor, slot_to_row: torch.Tensor, row_to_token: torch.Tensor) -> torch.Tensor:
    _check_permute(x, slot_to_row, row_to_token)
    return x.new_empty(row_to_token.shape[0], x.shape[1])


@torch.library.custom_op("moela::permute_fp8", mutates_args=())
def _permute_fp8_op(x: torch.Tensor, slot_to_row: torch.Tensor, row_to_token: torch.Tensor, block: int,
                    scale_fmt: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    return permute_fp8_fwd(x, slot_to_row, row_to_token, block, scale_fmt)


@_permute_fp8_op.register_fake
def _(x, slot_to_row, row_to_token, block, scale_fmt):
    _check_permute(x, slot_to_row, row_to_token)
    check_scale_fmt(scale_fmt)
    M = row_to_token.shape[0]
    return x.new_empty(M, x.shape[1], dtype=FP8_DTYPE), x.new_empty(M, cdiv(x.shape[1], block), dtype=torch.float32)


@torch.library.custom_op("moela::unpermute", mutates_args=())
def _unpermute_op(ys: torch.Tensor, slot_to_row: torch.Tensor, row_to_token: torch.Tensor,
                  topk_weights: torch.Tensor | None) -> torch.Tensor:
    _check_unpermute(ys, slot_to_row, row_to_token, topk_weights)
    return unpermute_fwd(ys, slot_to_row, topk_weights)


@_unpermute_op.register_fake
def _(ys: torch.Tensor, slot_to_row: torch.Tensor, row_to_token: torch.Tensor,
      topk_weights: torch.Tensor | None) -> torch.Tensor:
    _check_unpermute(ys, slot_to_row, row_to_token, topk_weights)
    return ys.new_empty(slot_to_row.shape[0], ys.shape[1])


@torch.library.custom_op("moela::unpermute_bwd", mutates_args=())
def _unpermute_bwd_op(dy: torch.Tensor, ys: torch.Tensor, slot_to_row: torch.Tensor, row_to_token: torch.Tensor,
                      topk_weights: torch.Tensor | None, need_dw: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if need_dw:
        return unpermute_bwd(dy, ys, slot_to_row, row_to_token, topk_weights)
    return permute_fwd(dy, slot_to_row, row_to_token, topk_weights), dy.new_empty(0)


@_unpermute_bwd_op.register_fake
def _(dy, ys, slot_to_row, row_to_token, topk_weights, need_dw):
    dw = topk_weights.new_empty(slot_to_row.shape) if need_dw else dy.new_empty(0)
    return ys.new_empty(ys.shape), dw


def _permute_setup(ctx, inputs, output) -> None:
    _, slot_to_row, row_to_token = inputs
    ctx.save_for_backward(slot_to_row, row_to_token)


def _permute_backward(ctx, dxs: torch.Tensor):
    slot_to_row, row_to_token = ctx.saved_tensors
    return _unpermute_op(dxs, slot_to_row, row_to_token, None), None, None


def _unpermute_setup(ctx, inputs, output) -> None:
    ys, slot_to_row, row_to_token, topk_weights = inputs
    ctx.has_w = topk_weights is not None
    ctx.save_for_backward(ys, slot_to_row, row_to_token, topk_weights)


def _unpermute_backward(ctx, dy: torch.Tensor):
    ys, slot_to_row, row_to_token, topk_weights = ctx.saved_tensors
    need_dw = ctx.has_w and ctx.needs_input_grad[3]
    dys, dw = _unpermute_bwd_op(dy, ys, slot_to_row, row_to_token, topk_weights, need_dw)
    return (dys if ctx.needs_input_grad[0] else None), None, None, (dw if need_dw else None)


_permute_op.register_autograd(_permute_backward, setup_context=_permute_setup)
_unpermute_op.register_autograd(_unpermute_backward, setup_context=_unpermute_setup)


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
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    plan = check_plan(plan, x.shape[0], x.device)
    if validate:
        validate_plan(plan)
    direct = run_direct(x, plan.slot_to_row, plan.row_to_token)  # eager, nothing to record: the launchers
    if fp8:
        if direct:
            return permute_fp8_fwd(x, plan.slot_to_row, plan.row_to_token, block, scale_fmt)
        return _permute_fp8_op(x, plan.slot_to_row, plan.row_to_token, block, scale_fmt)
    if direct:
        return permute_fwd(x, plan.slot_to_row, plan.row_to_token)
    return _permute_op(x, plan.slot_to_row, plan.row_to_token)


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
    check_tensor("ys", ys, ndim=2, dtypes=FLOAT_DTYPES)
    plan = check_plan(plan, device=ys.device)
    if validate:
        validate_plan(plan)
    if run_direct(ys, plan.slot_to_row, plan.row_to_token, topk_weights):  # eager, nothing to record
        _check_unpermute(ys, plan.slot_to_row, plan.row_to_token, topk_weights)
        return unpermute_fwd(ys, plan.slot_to_row, topk_weights)
    return _unpermute_op(ys, plan.slot_to_row, plan.row_to_token, topk_weights)
