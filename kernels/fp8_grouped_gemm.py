"""Grouped expert GEMM in FP8: rows ``offsets[e-1]:offsets[e]`` compute ``xs · w[e]ᵀ`` with block scales.

Legend: M rows grouped by expert (after dispatch), K input features, N output features, E experts,
B the scale block (128), Kb = K/B.

    xs (M, K) e4m3,     xs_s (M, Kb) f32        1×B activation scales (any strides)
    w (E, N, K) e4m3,   w_s (E, ceil(N/B), Kb)  B×B weight scales (DeepSeek's weight_scale_inv)
    offsets (E,) int32/int64                    cumulative row ends; empty groups repeat the end
    out (M, N) bf16 / fp16 / fp32               rows at or past offsets[E-1] are 0

Each group's rows are computed exactly like ``fp8_gemm`` (same per-block promotion, same main
loop), as in the reference.

Scheduling without a host sync: the grid is an upper bound on the number of row tiles,
``min(cdiv(M, BLOCK_M) + E, M)`` (Σ_g ceil(count_g / BLOCK_M) over the E groups and the tail of
rows past offsets[E-1] is below ``cdiv(M, BLOCK_M) + E``, and every tile holds at least one row,
so a decode step with more experts than rows launches no idle row tiles), times the column
tiles. Every program loads the E offsets as one vector, turns them into per-group tile counts
and their cumulative sum, and finds its group and row tile with one comparison and a few
reductions (no table in memory, no extra launch).
Programs past the real tile count exit at once; they come last in launch order. Tail tiles
store zeros without a K loop. Offsets are clamped to [0, M] in the kernel, so malformed offsets
never make it read or write out of bounds (their result is unspecified); ``validate=True`` checks
them (a host sync) and raises.

Configs: three lists chosen by the mean rows per expert (``fp8_gemm.m_class(ceil(M / E))``),
autotuned keyed on (N, K, M's power-of-two bucket: see ``_common.m_bucket``);
``MOELA_FP8_GROUPED_GEMM_CONFIG`` pins one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moela.kernels._common import (
    autotune,
    autotune_configs,
    cdiv,
    check_kernel_device,
    m_bucket,
    next_power_of_2,
    on_tensor_device,
    run_direct,
)
from moela.kernels.fp8_gemm import (
    _cfg,
    _fp8_block_scaled_tile,
    _grouped_tile_order,
    check_fp8_block,
    check_out_dtype,
    m_class,
)
from moela.kernels.fp8_quant import FP8_DTYPE, check_fp8_capability
from moela.reference._checks import INT_DTYPES, check_same_device, check_tensor
from moela.reference.grouped_gemm import check_offsets

__all__ = ["fp8_grouped_gemm", "fp8_grouped_gemm_fwd"]


@triton.jit
def _fp8_grouped_gemm_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, offsets_ptr, c_ptr,
    M, N, K, E,
    stride_xm, stride_xk, stride_xsm, stride_xsk,
    stride_we, stride_wn, stride_wk, stride_wse, stride_wsn, stride_wsk,
    stride_cm, stride_cn,
    M_BUCKET,  # autotune key only: _common.m_bucket(M)
    SCALE_BLOCK: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
):
    """grid: (_row_tiles(M, E, BLOCK_M) * cdiv(N, BLOCK_N),); BLOCK_E = next_power_of_2(E + 1).

    Group g < E holds rows [offsets[g-1], offsets[g]) and uses w[g]; group E holds the rows past
    offsets[E-1] (written as zeros). Program -> (row tile t over all groups, column tile), t ->
    (group, tile within the group) through the cumulative tile counts.
    """
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    t, pid_n = _grouped_tile_order(pid, tl.minimum(tl.cdiv(M, BLOCK_M) + E, M), num_pid_n, GROUP_M)

    g = tl.arange(0, BLOCK_E)
    ends = tl.load(offsets_ptr + g, mask=g < E, other=M).to(tl.int32)
    starts = tl.load(offsets_ptr + g - 1, mask=(g >= 1) & (g <= E), other=0).to(tl.int32)
    starts = tl.where(g > E, M, starts)
    ends = tl.minimum(tl.maximum(ends, 0), M)
    starts = tl.minimum(tl.maximum(starts, 0), M)
    tiles = (tl.maximum(ends - starts, 0) + BLOCK_M - 1) // BLOCK_M
    cum = tl.cumsum(tiles, 0)
    if t >= tl.sum(tiles, 0):
        return
    grp = tl.sum((cum <= t).to(tl.int32), 0)
    this = g == grp
    first_tile = tl.sum(tl.where(this, cum - tiles, 0), 0)
    start = tl.sum(tl.where(this, starts, 0), 0)
    end = tl.sum(tl.where(this, ends, 0), 0)

    offs_m = start + (t - first_tile) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_m, end - 1).to(tl.int64)
    cols = tl.minimum(offs_n, N - 1).to(tl.int64)
    expert = tl.maximum(tl.minimum(grp, E - 1), 0).to(tl.int64)
    num_kb = tl.where(grp < E, K // SCALE_BLOCK, 0)  # the tail group: no K loop, zeros

    acc = _fp8_block_scaled_tile(
        x_ptr, xs_ptr, w_ptr + expert * stride_we, ws_ptr + expert * stride_wse,
        rows, cols, pid_n * BLOCK_N, num_kb,
        stride_xm, stride_xk, stride_xsm, stride_xsk, stride_wn, stride_wk, stride_wsn, stride_wsk,
        BLOCK_M, BLOCK_N, SCALE_BLOCK,
    )
    mask = (offs_m < end)[:, None] & (offs_n < N)[None, :]
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


def _fp8_grouped_gemm_configs(cls: str) -> list[triton.Config]:
    """Same reasoning as fp8_gemm's configs; by mean rows per expert. Small groups (decode: a few
    rows per expert) waste most of a 64-row tile, so the small class starts at BLOCK_M = 16."""
    if cls == "small":
        configs = [_cfg(16, 64, 4, 4), _cfg(16, 128, 4, 4), _cfg(32, 64, 4, 4), _cfg(16, 32, 4, 5),
                   _cfg(64, 64, 4, 4), _cfg(16, 32, 2, 8)]
    elif cls == "medium":
        configs = [_cfg(64, 128, 4, 4), _cfg(64, 64, 4, 4), _cfg(128, 64, 4, 4), _cfg(128, 128, 8, 4),
                   _cfg(32, 128, 4, 4)]
    else:
        configs = [_cfg(128, 128, 8, 4), _cfg(64, 128, 4, 4), _cfg(128, 64, 4, 4), _cfg(128, 128, 8, 3),
                   _cfg(64, 256, 8, 3), _cfg(128, 128, 8, 5)]
    return autotune_configs("fp8_grouped_gemm", configs)


def _row_tiles(M: int, E: int, block_m: int) -> int:
    """The grid's row tiles: at least the real ones, Σ_g ceil(count_g / BLOCK_M) over the E groups
    and the tail (module docstring); the kernel's ``num_pid_m``."""
    return min(cdiv(M, block_m) + E, M)


_KEY = ["N", "K", "SCALE_BLOCK", "M_BUCKET"]
_TUNED = {
    cls: autotune(configs=_fp8_grouped_gemm_configs(cls), key=_KEY)(_fp8_grouped_gemm_kernel)
    for cls in ("small", "medium", "large")
}


def _check_operands(xs, xs_s, w, w_s, offsets, out_dtype, block):
    check_tensor("xs", xs, ndim=2, dtypes=(FP8_DTYPE,))
    check_tensor("w", w, ndim=3, dtypes=(FP8_DTYPE,))
    check_fp8_block(block)
    check_out_dtype(out_dtype)
    E, N, K = w.shape
    M = xs.shape[0]
    if xs.shape[1] != K:
        raise ValueError(f"xs: expected K={K} columns (w is {tuple(w.shape)}), got shape {tuple(xs.shape)}")
    if K % block:
        raise ValueError(f"xs: expected K (the last dim) to be a multiple of block={block}, got K={K}")
    check_tensor("xs_s", xs_s, dtypes=(torch.float32,), shape=(M, K // block))
    check_tensor("w_s", w_s, dtypes=(torch.float32,), shape=(E, cdiv(N, block), K // block))
    check_tensor("offsets", offsets, dtypes=INT_DTYPES, shape=(E,))
    check_same_device(xs=xs, xs_s=xs_s, w=w, w_s=w_s, offsets=offsets)
    if M >= 2**31:
        raise ValueError(f"xs: expected fewer than 2**31 rows, got {M}")
    return M, N, K, E


@on_tensor_device
def fp8_grouped_gemm_fwd(
    xs: torch.Tensor,
    xs_s: torch.Tensor,
    w: torch.Tensor,
    w_s: torch.Tensor,
    offsets: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    block: int = 128,
    *,
    out: torch.Tensor | None = None,
    validate: bool = False,
    config: dict | None = None,
) -> torch.Tensor:
    """Launch the FP8 grouped GEMM (see the module docstring). No host synchronisation unless
    ``validate=True`` (which checks the offsets' values and raises ValueError).

    out: optional (M, N) buffer of ``out_dtype`` (any strides), written and returned.
    config: e.g. ``{"BLOCK_M": 16, "BLOCK_N": 64, "num_warps": 4}`` bypasses autotuning.
    """
    M, N, K, E = _check_operands(xs, xs_s, w, w_s, offsets, out_dtype, block)
    check_kernel_device("xs", xs)
    check_fp8_capability("fp8_grouped_gemm", xs.device)
    if validate:
        check_offsets(offsets, M)
    if out is None:
        out = torch.empty(M, N, dtype=out_dtype, device=xs.device)
    else:
        check_tensor("out", out, dtypes=(out_dtype,), shape=(M, N))
        check_same_device(xs=xs, out=out)
    if M == 0 or N == 0:
        return out
    offsets = offsets.contiguous()  # the kernel indexes it flat
    args = (xs, xs_s, w, w_s, offsets, out, M, N, K, E,
            *xs.stride(), *xs_s.stride(), *w.stride(), *w_s.stride(), *out.stride(), m_bucket(M))
    consts = dict(SCALE_BLOCK=block, BLOCK_E=next_power_of_2(E + 1))
    if config is None:
        grid = lambda meta: (_row_tiles(M, E, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)
        _TUNED[m_class(cdiv(M, max(E, 1)))][grid](*args, **consts)
    else:
        meta = dict(config)
        meta.setdefault("GROUP_M", 8)
        grid = (_row_tiles(M, E, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)
        _fp8_grouped_gemm_kernel[grid](*args, **consts, **meta)
    return out


@torch.library.custom_op("moela::fp8_grouped_gemm", mutates_args=())
def _fp8_grouped_gemm_op(
    xs: torch.Tensor,
    xs_s: torch.Tensor,
    w: torch.Tensor,
    w_s: torch.Tensor,
    offsets: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    block: int = 128,
    validate: bool = False,
) -> torch.Tensor:
    return fp8_grouped_gemm_fwd(xs, xs_s, w, w_s, offsets, out_dtype, block, validate=validate)


@_fp8_grouped_gemm_op.register_fake
def _(xs, xs_s, w, w_s, offsets, out_dtype=torch.bfloat16, block=128, validate=False):
    M, N, _, _ = _check_operands(xs, xs_s, w, w_s, offsets, out_dtype, block)
    return xs.new_empty((M, N), dtype=out_dtype)


def fp8_grouped_gemm(
    xs: torch.Tensor,
    xs_s: torch.Tensor,
    w: torch.Tensor,
    w_s: torch.Tensor,
    offsets: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    block: int = 128,
    validate: bool = False,
) -> torch.Tensor:
    """The grouped expert GEMM in FP8 (``moela.reference.fp8_grouped_gemm``), without a host sync.

    Args:
        xs: (M, K) float8_e4m3fn rows grouped by expert; K a multiple of ``block``.
        xs_s: (M, K/block) float32 (any strides).
        w: (E, N, K) float8_e4m3fn, w_s: (E, ceil(N/block), K/block) float32.
        offsets: (E,) int32/int64 cumulative row ends (non-decreasing, <= M).
        validate: check the offsets' values (synchronises) and raise ValueError if malformed.
    Returns:
        (M, N) in out_dtype; rows at or past offsets[E-1] are zero.
    """
    if run_direct(xs, xs_s, w, w_s, offsets):  # eager, nothing to record: the launcher itself (same bits)
        return fp8_grouped_gemm_fwd(xs, xs_s, w, w_s, offsets, out_dtype, block, validate=validate)
    return _fp8_grouped_gemm_op(xs, xs_s, w, w_s, offsets, out_dtype, block, validate)
