"""Grouped expert GEMM in FP8, masked layout: ``out[e, :m_e] = x[e, :m_e] · w[e]ᵀ`` with block scales.

Legend: E experts, max_m rows per expert buffer, m_e = clamp(masked_m[e], 0, max_m) real rows,
K input features, N output features, B the scale block (128), Kb = K/B.

    x (E, max_m, K) e4m3,  x_s (E, max_m, Kb) f32   1×B activation scales (any strides)
    w (E, N, K) e4m3,      w_s (E, ceil(N/B), Kb)   B×B weight scales
    masked_m (E,) int32/int64                       real rows per expert, read on the device
    out (E, max_m, N) bf16 / fp16 / fp32            rows at or past m_e are 0

DeepGEMM's ``m_grouped_fp8_gemm_nt_masked``: the layout of DeepEP's low-latency dispatch, one
fixed-size buffer per expert, so an expert-parallel decode step replays as one CUDA graph
whatever the routing. The grid comes from the shapes alone (E × cdiv(max_m, BLOCK_M) row tiles ×
cdiv(N, BLOCK_N) column tiles); each tile reads its expert's count on the device, clamped into
[0, max_m] in its own width (the reference's rule; ``validate=True`` raises instead, a host
sync). Row tiles at or past m_e skip the K loop and store zeros; rows of a tile past m_e are
computed from whatever the buffer holds and replaced by zeros before the store (a NaN there
never reaches the output). Each real row is computed as ``fp8_gemm`` computes it.

Two kernels, one rule (``fp8_mainloop.fp8_path``): on Hopper with ``x`` as (E·max_m, K) and ``w``
as (E·N, K) TMA-readable, ``_fp8_grouped_gemm_masked_tma_kernel`` (persistent, GROUP_M
super-rows over the (expert, row tile) rows, ``fp8_mainloop.fp8_tma_tile``); otherwise
``_fp8_grouped_gemm_masked_kernel`` (pointer loads, one program per tile). Configs: three lists
per kernel chosen by max_m (``fp8_gemm.m_class``), autotuned keyed on (N, K, max_m);
``MOELA_FP8_GROUPED_GEMM_MASKED_<CLASS>_CONFIG`` / ``MOELA_FP8_GROUPED_GEMM_MASKED_TMA_<CLASS>_CONFIG`` pin one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from moela.reference.fp8 import check_fp8_grouped_gemm_masked
from moela.reference.grouped_gemm import check_masked_m

from ._common import autotune, cdiv, device_capability, ensure_tma_allocator, kernel_rows, num_sms
from .factory import kernel_op
from .fp8_gemm import fp8_config, fp8_kernel_block, m_class, pointer_meta
from .fp8_mainloop import (
    fp8_path,
    fp8_tma_tile,
    hopper_meta,
    hopper_tuner,
    merged_rows,
    scale_tma,
    tma_config,
    tma_pruner,
)
from .tl_helpers import SMEM_BUDGET, fp8_block_scaled_tile, grouped_tile_order

__all__ = ["fp8_grouped_gemm_masked", "launch_fp8_grouped_gemm_masked", "fp8_grouped_gemm_masked_configs",
           "fp8_grouped_gemm_masked_tma_configs"]


@triton.jit
def _expert_rows(masked_m_ptr, e, MAX_M):
    """m_e = clamp(masked_m[e], 0, max_m), clamped in the count's own width."""
    return tl.minimum(tl.maximum(tl.load(masked_m_ptr + e), 0), MAX_M).to(tl.int32)


@triton.jit
def _fp8_grouped_gemm_masked_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, masked_m_ptr, c_ptr,
    E, MAX_M, N, K,
    stride_xe, stride_xm, stride_xk, stride_xse, stride_xsm, stride_xsk,
    stride_we, stride_wn, stride_wk, stride_wse, stride_wsn, stride_wsk,
    stride_ce, stride_cm, stride_cn,
    SCALE_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
    STAGES: tl.constexpr,
):
    """grid: (E * cdiv(MAX_M, BLOCK_M) * cdiv(N, BLOCK_N),). Program -> (expert-row tile r,
    column tile) in GROUP_M super-rows, r -> (expert r // row tiles, row tile r % row tiles)."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(MAX_M, BLOCK_M)
    r, pid_n = grouped_tile_order(pid, E * tiles_m, tl.cdiv(N, BLOCK_N), GROUP_M)
    e = r // tiles_m
    rows_e = _expert_rows(masked_m_ptr, e, MAX_M)
    offs_m = (r % tiles_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_m, MAX_M - 1).to(tl.int64)
    cols = tl.minimum(offs_n, N - 1).to(tl.int64)
    num_kb = tl.where((r % tiles_m) * BLOCK_M < rows_e, K // SCALE_BLOCK, 0)  # tiles past m_e: zeros
    e64 = e.to(tl.int64)
    acc = fp8_block_scaled_tile(
        x_ptr + e64 * stride_xe, xs_ptr + e64 * stride_xse, w_ptr + e64 * stride_we, ws_ptr + e64 * stride_wse,
        rows, cols, pid_n * BLOCK_N, num_kb,
        stride_xm, stride_xk, stride_xsm, stride_xsk, stride_wn, stride_wk, stride_wsn, stride_wsk,
        BLOCK_M, BLOCK_N, SCALE_BLOCK, STAGES,
    )
    acc = tl.where((offs_m < rows_e)[:, None], acc, 0.0)
    mask = (offs_m < MAX_M)[:, None] & (offs_n < N)[None, :]
    c_ptrs = c_ptr + e64 * stride_ce + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fp8_grouped_gemm_masked_tma_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, masked_m_ptr, c_ptr,
    E, MAX_M, N, K,
    stride_xm, stride_xse, stride_xsm, stride_xsk, stride_wn, stride_wse, stride_wsn, stride_wsk,
    stride_ce, stride_cm, stride_cn,
    SCALE_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
    STAGES: tl.constexpr, SCALE_TMA: tl.constexpr,
):
    """The masked grouped FP8 GEMM on Hopper: descriptors over x as (E·max_m, K), w as (E·N, K),
    with SCALE_TMA (``fp8_mainloop.scale_tma``) x_s as (E·Kb, max_m) and w_s as (E·N/B, Kb).

    grid: (min(E * cdiv(MAX_M, BLOCK_M) * cdiv(N, BLOCK_N), SMs),); program p walks tiles p,
    p + grid, ... (the pointer kernel's order). A tile's rows past max_m belong to the next
    expert's buffer and its columns past N to the next expert's weight: read, never stored.
    x's experts are consecutive blocks of max_m rows and w's of N rows (checked by the launcher).
    """
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[E * MAX_M, K], strides=[stride_xm, 1],
                                       block_shape=[BLOCK_M, SCALE_BLOCK])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[E * N, K], strides=[stride_wn, 1],
                                       block_shape=[BLOCK_N, SCALE_BLOCK])
    tiles_m = tl.cdiv(MAX_M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_kb = K // SCALE_BLOCK
    n_blocks = tl.cdiv(N, SCALE_BLOCK)
    if WARP_SPECIALIZE and SCALE_TMA and BLOCK_N <= SCALE_BLOCK:
        as_desc = tl.make_tensor_descriptor(xs_ptr, shape=[E * num_kb, MAX_M], strides=[stride_xsk, 1],
                                            block_shape=[1, BLOCK_M])
        bs_desc = tl.make_tensor_descriptor(ws_ptr, shape=[E * n_blocks, num_kb], strides=[stride_wsn, 1],
                                            block_shape=[1, 4])
    else:
        as_desc = None
        bs_desc = None
    for tile in tl.range(tl.program_id(0), E * tiles_m * num_pid_n, tl.num_programs(0), flatten=False):
        r, pid_n = grouped_tile_order(tile, E * tiles_m, num_pid_n, GROUP_M)
        e = r // tiles_m
        row0 = (r % tiles_m) * BLOCK_M
        rows_e = _expert_rows(masked_m_ptr, e, MAX_M)
        offs_m = row0 + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        e64 = e.to(tl.int64)
        as_ptrs = xs_ptr + e64 * stride_xse + tl.minimum(offs_m, MAX_M - 1).to(tl.int64) * stride_xsm
        ws_base = ws_ptr + e64 * stride_wse
        if BLOCK_N <= SCALE_BLOCK:
            bs_ptrs = ws_base + (pid_n * BLOCK_N // SCALE_BLOCK) * stride_wsn + tl.zeros([BLOCK_M], tl.int32)
        else:
            bs_ptrs = ws_base + (tl.minimum(offs_n, N - 1) // SCALE_BLOCK) * stride_wsn
        tile_kb = tl.where(row0 < rows_e, num_kb, 0)  # tiles past m_e: zeros
        acc = fp8_tma_tile(x_desc, w_desc, e * MAX_M + row0, e * N + pid_n * BLOCK_N, as_ptrs, bs_ptrs, stride_xsk,
                           stride_wsk, 0, tile_kb, as_desc, bs_desc, e * num_kb, row0,
                           e * n_blocks + pid_n * BLOCK_N // SCALE_BLOCK,
                           BLOCK_M, BLOCK_N, SCALE_BLOCK, WARP_SPECIALIZE, STAGES, SCALE_TMA)
        acc = tl.where((offs_m < rows_e)[:, None], acc, 0.0)
        mask = (offs_m < MAX_M)[:, None] & (offs_n < N)[None, :]
        c_ptrs = c_ptr + e64 * stride_ce + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


def fp8_grouped_gemm_masked_configs(cls: str) -> list[triton.Config]:
    """Pointer-kernel configs by max_m (``fp8_grouped_gemm``'s lists)."""
    c = fp8_config
    if cls == "small":
        return [c(16, 64, 4, 4), c(32, 64, 4, 4), c(64, 64, 4, 4), c(16, 128, 4, 4)]
    if cls == "medium":
        return [c(64, 128, 4, 4), c(64, 64, 4, 4), c(128, 64, 4, 4), c(128, 128, 8, 4)]
    return [c(128, 128, 8, 4), c(64, 128, 4, 4), c(128, 64, 4, 4), c(128, 128, 8, 3)]


def fp8_grouped_gemm_masked_tma_configs(cls: str) -> list[triton.Config]:
    """Hopper configs by max_m (``fp8_gemm.fp8_gemm_tma_configs``' reasoning). DeepGEMM's masked
    4 × 256 (N 7168, K 2048): 64×128 tiles make 896 tiles (6.8 waves on 132 SMs), 128×128 448
    (3.4 waves); the wave model ranks them."""
    c = tma_config
    if cls == "small":
        return [c(64, 64, 4, 5), c(64, 32, 4, 6), c(64, 128, 4, 3), c(64, 16, 4, 8)]
    return [c(64, 128, 4, 3), c(128, 128, 8, 2), c(128, 64, 8, 4), c(128, 128, 4, 4, ws=True),
            c(128, 64, 4, 6, ws=True), c(64, 64, 4, 5), c(64, 32, 4, 6)]


def _masked_tiles(nargs: dict, bm: int, bn: int) -> tuple[int, int]:
    E, max_m, N = nargs["E"], nargs["MAX_M"], nargs["N"]
    return E * cdiv(max_m, bm) * cdiv(N, bn), min(bm, max_m)


_KEY = ["N", "K", "MAX_M", "SCALE_BLOCK"]
_TUNED = {
    cls: autotune(f"fp8_grouped_gemm_masked_{cls}", fp8_grouped_gemm_masked_configs(cls), key=_KEY)(
        _fp8_grouped_gemm_masked_kernel)
    for cls in ("small", "medium", "large")
}
_TMA_TUNED = {
    cls: hopper_tuner(autotune(
        f"fp8_grouped_gemm_masked_tma_{cls}", fp8_grouped_gemm_masked_tma_configs(cls), key=[*_KEY, "SCALE_TMA"],
        prune_configs_by={"early_config_prune": tma_pruner(_masked_tiles, SMEM_BUDGET, "x_ptr")},
    )(_fp8_grouped_gemm_masked_tma_kernel))
    for cls in ("small", "medium", "large")
}


def _flat_rows(t: Tensor) -> Tensor | None:
    """(E, R, K) as (E·R, K) without a copy, or None."""
    E, R, K = t.shape
    if E == 0 or R == 0 or t.stride(0) != R * t.stride(1):
        return None
    return t.reshape(E * R, K)


def launch_fp8_grouped_gemm_masked(out, x, x_s, w, w_s, masked_m, block, config, capability=None) -> None:
    """The masked grouped GEMM into ``out`` (E, max_m, N); ``capability`` (default: the device's)
    feeds the path rule ``fp8_mainloop.fp8_path``. E, max_m, N >= 1; masked_m contiguous."""
    cap = device_capability(x.device) if capability is None else capability
    x2, w2 = _flat_rows(x), _flat_rows(w)
    if fp8_path(cap, block, x2, w2) == "tma":
        _launch_tma(out, x2, x_s, w2, w_s, masked_m, block, config)
    else:
        _launch_pointer(out, x, x_s, w, w_s, masked_m, block, config)


def _launch_pointer(out, x, x_s, w, w_s, masked_m, block, config) -> None:
    E, max_m, K = x.shape
    N = w.shape[1]
    args = (x, x_s, w, w_s, masked_m, out, E, max_m, N, K, *x.stride(), *x_s.stride(), *w.stride(), *w_s.stride(),
            *out.stride())
    consts = dict(SCALE_BLOCK=block)
    tiles = lambda meta: E * cdiv(max_m, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"])
    if config is None:
        _TUNED[m_class(max_m)][lambda meta: (tiles(meta),)](*args, **consts)
    else:
        meta = pointer_meta(config)
        _fp8_grouped_gemm_masked_kernel[(tiles(meta),)](*args, **consts, **meta)


def tma_launch_args(out, x2, x_s, w2, w_s, masked_m, block) -> tuple[tuple, dict]:
    """The Hopper kernel's arguments (``x2``, ``w2``: x and w with experts and rows merged) and
    constexprs; also what the sm_90 compile test binds."""
    E, max_m, N = out.shape
    K = x2.shape[1]
    args = (x2, x_s, w2, w_s, masked_m, out, E, max_m, N, K, x2.stride(0), *x_s.stride(), w2.stride(0), *w_s.stride(),
            *out.stride())
    return args, dict(SCALE_BLOCK=block, SCALE_TMA=scale_tma(merged_rows(x_s.transpose(1, 2)), merged_rows(w_s)))


def _launch_tma(out, x2, x_s, w2, w_s, masked_m, block, config) -> None:
    E, max_m, N = out.shape
    args, consts = tma_launch_args(out, x2, x_s, w2, w_s, masked_m, block)
    sms = num_sms(x2.device)
    ensure_tma_allocator()
    tiles = lambda meta: E * cdiv(max_m, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"])
    if config is None:
        _TMA_TUNED[m_class(max_m)][lambda meta: (min(tiles(meta), sms),)](*args, **consts)
    else:
        meta = hopper_meta(config)
        _fp8_grouped_gemm_masked_tma_kernel[(min(tiles(meta), sms),)](*args, **consts, **meta)


def _domain(x, x_s, w, w_s, masked_m, out_dtype=torch.bfloat16, block=128, *, validate=False) -> None:
    fp8_kernel_block("fp8_grouped_gemm_masked", block, x.shape[2], "x")
    kernel_rows("fp8_grouped_gemm_masked", "x", x.shape[0] * x.shape[1])  # experts x rows, int32


@kernel_op("fp8_grouped_gemm_masked", contract=check_fp8_grouped_gemm_masked, domain=_domain, fp8=True)
def fp8_grouped_gemm_masked(out, x: Tensor, x_s: Tensor, w: Tensor, w_s: Tensor, masked_m: Tensor,
                            out_dtype: torch.dtype = torch.bfloat16, block: int = 128, *, validate: bool = False,
                            config=None) -> Tensor:
    """The grouped expert GEMM in FP8 on the masked layout (``moela.reference.fp8_grouped_gemm_masked``),
    without a host sync.

    Args:
        x: (E, max_m, K) float8_e4m3fn, one buffer of rows per expert; K a multiple of ``block``.
        x_s: (E, max_m, K/block) float32 (any strides).
        w: (E, N, K) float8_e4m3fn, w_s: (E, ceil(N/block), K/block) float32.
        masked_m: (E,) int32/int64 real rows per expert, read on the device; counts outside
            [0, max_m] are clamped into it.
        validate: check the counts (synchronises) and raise ValueError if one is out of range.
    Returns:
        (E, max_m, N) in out_dtype; rows at or past masked_m[e] are zero.

    Example::

        y = fp8_grouped_gemm_masked(x, x_s, w, w_s, masked_m)   # DeepEP low-latency buffers
    """
    max_m = x.shape[1]
    if validate:
        check_masked_m(masked_m, max_m)
    if out.numel() == 0:
        return
    masked_m = masked_m.contiguous()  # the kernels index it flat
    launch_fp8_grouped_gemm_masked(out, x, x_s, w, w_s, masked_m, block, config)
