"""Grouped FP8 dgrad: rows ``offsets[e-1]:offsets[e]`` compute ``dy · w[e]`` with w[e]'s blocks transposed.

Legend: M rows grouped by expert, N the forward's output features (the reduction here), K the
forward's input features, E experts, B the scale block (128), Nb = ceil(N/B), Kb = ceil(K/B).

    dy (M, N) e4m3,     dy_s (M, Nb) f32         ``quant_act`` of the expert rows' output gradient
    w (E, N, K) e4m3,   w_s (E, Nb, Kb) f32      the forward's expert weights and scales, as stored
    offsets (E,) int32/int64                     cumulative row ends
    dx (M, K) bf16 / fp16 / fp32                 rows at or past offsets[E-1] are 0

The MoE backward's input gradient (``fp8_dgrad`` per expert; ``fp8_grouped_gemm``'s scheduling):
the grid is an upper bound on the row tiles, ``min(cdiv(M, BLOCK_M) + E, M)``, times the column
tiles; each program finds its group and first row from the offsets on the device
(``tl_helpers.locate_m_tile``: offsets clamped into [0, M] and made non-decreasing, so malformed
offsets give a documented result and no access out of bounds; ``validate=True`` raises instead).
Programs past the real tile count exit; tail tiles store zeros without a reduction loop. The
per-block promotion and the weight layout are ``fp8_dgrad``'s: w read with N contiguous, as
given when ``w.stride(1) == 1`` (``model.fp8_training.FP8WeightCache`` keeps such a copy), else
copied so first.
Configs by mean rows per expert, keyed on (N, K, M's power-of-two bucket);
``MOELA_FP8_GROUPED_DGRAD_<CLASS>_CONFIG`` pins one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from moela.reference.fp8_train import check_fp8_grouped_dgrad
from moela.reference.grouped_gemm import check_offsets

from ._common import autotune, cdiv, kernel_rows, m_bucket, next_power_of_2
from .factory import kernel_op
from .tl_helpers import fp8_scaled_range_tile, fp8_train_block, grouped_tile_order, locate_m_tile

__all__ = ["fp8_grouped_dgrad", "fp8_grouped_dgrad_configs"]


@triton.jit
def _fp8_grouped_dgrad_kernel(
    dy_ptr, dys_ptr, w_ptr, ws_ptr, offsets_ptr, dx_ptr,
    M, N, K, E,
    stride_dym, stride_dyn, stride_dysm, stride_dysn,
    stride_we, stride_wn, stride_wk, stride_wse, stride_wsn, stride_wsk,
    stride_dxm, stride_dxk,
    M_BUCKET,  # autotune key only: _common.m_bucket(M)
    SCALE_BLOCK: tl.constexpr, EVEN_N: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, STAGES: tl.constexpr = 3,
):
    """grid: (min(cdiv(M, BLOCK_M) + E, M) * cdiv(K, BLOCK_K),); BLOCK_E = next_power_of_2(E + 1).

    Group g < E holds rows [offsets[g-1], offsets[g]) and uses w[g]; group E holds the rows past
    offsets[E-1] (zeros).
    """
    pid = tl.program_id(0)
    t, pid_k = grouped_tile_order(pid, tl.minimum(tl.cdiv(M, BLOCK_M) + E, M), tl.cdiv(K, BLOCK_K), GROUP_M)
    grp, start, end = locate_m_tile(offsets_ptr, t, M, E, BLOCK_M, BLOCK_E)
    if start >= end:
        return
    offs_m = start + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rows = tl.minimum(offs_m, end - 1).to(tl.int64)
    cols = tl.minimum(offs_k, K - 1).to(tl.int64)
    expert = tl.maximum(tl.minimum(grp, E - 1), 0).to(tl.int64)
    red_end = tl.where(grp < E, N, 0)  # the tail group: no reduction, zeros
    acc = fp8_scaled_range_tile(
        dy_ptr, dys_ptr, w_ptr + expert * stride_we, ws_ptr + expert * stride_wse,
        rows, cols, pid_k * BLOCK_K, 0, red_end,
        stride_dym, stride_dyn, stride_dysm, stride_dysn,
        stride_wk, stride_wn, stride_wsk, stride_wsn,
        BLOCK_M, BLOCK_K, SCALE_BLOCK, False, EVEN_N, STAGES,
    )
    mask = (offs_m < end)[:, None] & (offs_k < K)[None, :]
    dx_ptrs = dx_ptr + offs_m.to(tl.int64)[:, None] * stride_dxm + offs_k[None, :] * stride_dxk
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=mask)


def _cfg(bm: int, bk: int, warps: int, stages: int, group_m: int = 8) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_K": bk, "GROUP_M": group_m, "STAGES": stages},
                         num_warps=warps, num_stages=stages)


def fp8_grouped_dgrad_configs(cls: str) -> list[triton.Config]:
    """By mean rows per expert (first = default); small groups waste less of a 16-row tile."""
    if cls == "small":
        return [_cfg(16, 64, 4, 4), _cfg(16, 128, 4, 4), _cfg(32, 64, 4, 4), _cfg(64, 64, 4, 4)]
    if cls == "medium":
        return [_cfg(64, 128, 4, 4), _cfg(64, 64, 4, 4), _cfg(128, 64, 4, 4), _cfg(128, 128, 8, 4)]
    return [_cfg(128, 128, 8, 4), _cfg(64, 128, 4, 4), _cfg(128, 64, 4, 4), _cfg(128, 128, 8, 3)]


def _m_class(rows_per_expert: int) -> str:
    return "small" if rows_per_expert <= 64 else "medium" if rows_per_expert <= 512 else "large"


_KEY = ["N", "K", "SCALE_BLOCK", "EVEN_N", "M_BUCKET"]
_TUNED = {cls: autotune(f"fp8_grouped_dgrad_{cls}", fp8_grouped_dgrad_configs(cls), key=_KEY)(
    _fp8_grouped_dgrad_kernel) for cls in ("small", "medium", "large")}


def _row_tiles(M: int, E: int, block_m: int) -> int:
    return min(cdiv(M, block_m) + E, M)


def _domain(dy, dy_s, w, w_s, offsets, out_dtype=torch.bfloat16, block=128, *, validate=False) -> None:
    fp8_train_block("fp8_grouped_dgrad", block)
    kernel_rows("fp8_grouped_dgrad", "dy", dy.shape[0])


@kernel_op("fp8_grouped_dgrad", contract=check_fp8_grouped_dgrad, domain=_domain, fp8=True)
def fp8_grouped_dgrad(out, dy: Tensor, dy_s: Tensor, w: Tensor, w_s: Tensor, offsets: Tensor,
                      out_dtype: torch.dtype = torch.bfloat16, block: int = 128, *, validate: bool = False,
                      config=None) -> Tensor:
    """The grouped input gradient in FP8 (``moela.reference.fp8_grouped_dgrad``), without a host sync.

    Args:
        dy: (M, N) float8_e4m3fn rows grouped by expert, dy_s: (M, ceil(N/block)) float32.
        w: (E, N, K) float8_e4m3fn, w_s: (E, ceil(N/block), ceil(K/block)) float32: the forward's
            expert weights (any strides; N contiguous is read as it is, else copied so first).
        offsets: (E,) int32/int64 cumulative row ends (malformed values: the module docstring).
        validate: check the offsets' values (synchronises) and raise ValueError if malformed.
    Returns:
        (M, K) in out_dtype; rows at or past offsets[E-1] are zero.
    """
    M, N = dy.shape
    E, _, K = w.shape
    if validate:
        check_offsets(offsets, M)
    if M == 0 or K == 0:
        return
    if w.stride(1) != 1 and N > 1:  # the reduction contiguous (fp8_dgrad's module docstring)
        w = w.transpose(1, 2).contiguous().transpose(1, 2)
    offsets = offsets.contiguous()  # the kernel indexes it flat
    args = (dy, dy_s, w, w_s, offsets, out, M, N, K, E, *dy.stride(), *dy_s.stride(), *w.stride(), *w_s.stride(),
            *out.stride(), m_bucket(M))
    consts = dict(SCALE_BLOCK=block, EVEN_N=N % block == 0, BLOCK_E=next_power_of_2(E + 1))
    if config is None:
        kernel, meta = _TUNED[_m_class(cdiv(M, max(E, 1)))], {}
    else:
        kernel, meta = _fp8_grouped_dgrad_kernel, {"GROUP_M": 8, **dict(config)}
    kernel[lambda m: (_row_tiles(M, E, m["BLOCK_M"]) * cdiv(K, m["BLOCK_K"]),)](*args, **consts, **meta)
