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
store zeros without a K loop. Offsets are read as ``grouped_gemm`` reads them (clamped into
[0, M] in their own width, then a running max: a documented result for malformed offsets, never
an out-of-bounds access); ``validate=True`` checks them (a host sync) and raises.

Configs: three lists chosen by the mean rows per expert (``fp8_gemm.m_class(ceil(M / E))``),
autotuned keyed on (N, K, M's power-of-two bucket: see ``_common.m_bucket``);
``MOELA_FP8_GROUPED_GEMM_CONFIG`` pins one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from moela.reference.fp8 import check_fp8_grouped_gemm
from moela.reference.grouped_gemm import check_offsets

from ._common import autotune, cdiv, kernel_rows, m_bucket, next_power_of_2
from .factory import kernel_op
from .fp8_gemm import fp8_config, fp8_kernel_block, m_class
from .tl_helpers import fp8_block_scaled_tile, grouped_tile_order, locate_m_tile

__all__ = ["fp8_grouped_gemm"]


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
    t, pid_n = grouped_tile_order(pid, tl.minimum(tl.cdiv(M, BLOCK_M) + E, M), num_pid_n, GROUP_M)

    grp, start, end = locate_m_tile(offsets_ptr, t, M, E, BLOCK_M, BLOCK_E)
    if start >= end:
        return
    offs_m = start + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_m, end - 1).to(tl.int64)
    cols = tl.minimum(offs_n, N - 1).to(tl.int64)
    expert = tl.maximum(tl.minimum(grp, E - 1), 0).to(tl.int64)
    num_kb = tl.where(grp < E, K // SCALE_BLOCK, 0)  # the tail group: no K loop, zeros

    acc = fp8_block_scaled_tile(
        x_ptr, xs_ptr, w_ptr + expert * stride_we, ws_ptr + expert * stride_wse,
        rows, cols, pid_n * BLOCK_N, num_kb,
        stride_xm, stride_xk, stride_xsm, stride_xsk, stride_wn, stride_wk, stride_wsn, stride_wsk,
        BLOCK_M, BLOCK_N, SCALE_BLOCK,
    )
    mask = (offs_m < end)[:, None] & (offs_n < N)[None, :]
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


def fp8_grouped_gemm_configs(cls: str) -> list[triton.Config]:
    """Same reasoning as fp8_gemm's configs; by mean rows per expert. Small groups (decode: a few
    rows per expert) waste most of a 64-row tile, so the small class starts at BLOCK_M = 16."""
    c = fp8_config
    if cls == "small":
        return [c(16, 64, 4, 4), c(16, 128, 4, 4), c(32, 64, 4, 4), c(16, 32, 4, 5), c(64, 64, 4, 4), c(16, 32, 2, 8)]
    if cls == "medium":
        return [c(64, 128, 4, 4), c(64, 64, 4, 4), c(128, 64, 4, 4), c(128, 128, 8, 4), c(32, 128, 4, 4)]
    return [c(128, 128, 8, 4), c(64, 128, 4, 4), c(128, 64, 4, 4), c(128, 128, 8, 3), c(64, 256, 8, 3),
            c(128, 128, 8, 5)]


def _row_tiles(M: int, E: int, block_m: int) -> int:
    """The grid's row tiles: at least the real ones, Σ_g ceil(count_g / BLOCK_M) over the E groups
    and the tail (module docstring); the kernel's ``num_pid_m``."""
    return min(cdiv(M, block_m) + E, M)


_KEY = ["N", "K", "SCALE_BLOCK", "M_BUCKET"]
_TUNED = {
    cls: autotune(f"fp8_grouped_gemm_{cls}", fp8_grouped_gemm_configs(cls), key=_KEY)(
        _fp8_grouped_gemm_kernel)
    for cls in ("small", "medium", "large")
}


def _domain(xs, xs_s, w, w_s, offsets, out_dtype=torch.bfloat16, block=128, *, validate=False) -> None:
    fp8_kernel_block("fp8_grouped_gemm", block, xs.shape[1], "xs")
    kernel_rows("fp8_grouped_gemm", "xs", xs.shape[0])


@kernel_op("fp8_grouped_gemm", contract=check_fp8_grouped_gemm, domain=_domain, fp8=True)
def fp8_grouped_gemm(out, xs: Tensor, xs_s: Tensor, w: Tensor, w_s: Tensor, offsets: Tensor,
                     out_dtype: torch.dtype = torch.bfloat16, block: int = 128, *, validate: bool = False,
                     config=None) -> Tensor:
    """The grouped expert GEMM in FP8 (``moela.reference.fp8_grouped_gemm``), without a host sync.

    Args:
        xs: (M, K) float8_e4m3fn rows grouped by expert; K a multiple of ``block``.
        xs_s: (M, K/block) float32 (any strides).
        w: (E, N, K) float8_e4m3fn, w_s: (E, ceil(N/block), K/block) float32.
        offsets: (E,) int32/int64 cumulative row ends (non-decreasing, <= M; malformed values
            compute the module docstring's clamped result).
        validate: check the offsets' values (synchronises) and raise ValueError if malformed.
    Returns:
        (M, N) in out_dtype; rows at or past offsets[E-1] are zero.
    """
    M, K = xs.shape
    E, N, _ = w.shape
    if validate:
        check_offsets(offsets, M)
    if M == 0 or N == 0:
        return
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
