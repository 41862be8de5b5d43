"""Grouped expert GEMM in FP8: rows ``offsets[e-1]:offsets[e]`` compute ``xs · w[e]ᵀ`` with block scales.

Legend: M rows grouped by expert (after dispatch), K input features, N output features, E experts,
B the scale block (128), Kb = K/B.

    xs (M, K) e4m3,     xs_s (M, Kb) f32        1×B activation scales (any strides)
    w (E, N, K) e4m3,   w_s (E, ceil(N/B), Kb)  B×B weight scales (DeepSeek's weight_scale_inv)
    offsets (E,) int32/int64                    cumulative row ends; empty groups repeat the end
    out (M, N) bf16 / fp16 / fp32               rows at or past offsets[E-1] are 0

Each group's rows are computed exactly like ``fp8_gemm`` (same per-block promotion, same main
loop), as in the reference.

Scheduling without a host sync: the row tiles are bounded by ``min(cdiv(M, BLOCK_M) + E, M)``
(Σ_g ceil(count_g / BLOCK_M) over the E groups and the tail of rows past offsets[E-1] is below
``cdiv(M, BLOCK_M) + E``, and every tile holds at least one row, so a decode step with more
experts than rows has no idle row tiles), times the column tiles. A tile loads the E offsets as
one vector, turns them into per-group tile counts and their cumulative sum, and finds its group
and row tile with one comparison and a few reductions (``tl_helpers.locate_m_tile``: no table in
memory, no extra launch). Tiles past the real tile count do nothing; tail tiles store zeros
without a K loop. Offsets are read as ``grouped_gemm`` reads them (clamped into [0, M] in their
own width, then a running max: a documented result for malformed offsets, never an
out-of-bounds access); ``validate=True`` checks them (a host sync) and raises.

Two kernels, one rule (``fp8_mainloop.fp8_path``): on Hopper with TMA-readable ``xs`` and ``w``
(as the 2-D view (E·N, K)), ``_fp8_grouped_gemm_tma_kernel`` runs ``min(tiles, SMs)`` persistent
programs over the virtual tiles (GROUP_M super-rows) with ``fp8_mainloop.fp8_tma_tile``: a
tile's rows past its group belong to the next group and columns past N to the next expert; the
descriptors read them, the store masks them. Otherwise ``_fp8_grouped_gemm_kernel`` (pointer
loads, one program per virtual tile, rows and columns clamped).

Configs: three lists per kernel chosen by the mean rows per expert (``fp8_gemm.m_class(ceil(M /
E))``), autotuned keyed on (N, K, M's power-of-two bucket: see ``_common.m_bucket``); the Hopper
lists are ordered by the wave model (``fp8_mainloop.tma_pruner``).
``MOELA_FP8_GROUPED_GEMM_<CLASS>_CONFIG`` / ``MOELA_FP8_GROUPED_GEMM_TMA_<CLASS>_CONFIG`` pin one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from moela.reference.fp8 import check_fp8_grouped_gemm
from moela.reference.grouped_gemm import check_offsets

from ._common import (
    autotune,
    cdiv,
    device_capability,
    ensure_tma_allocator,
    kernel_rows,
    m_bucket,
    next_power_of_2,
    num_sms,
)
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
from .tl_helpers import SMEM_BUDGET, fp8_block_scaled_tile, grouped_tile_order, locate_m_tile, locate_m_tile_by_chunks

__all__ = ["fp8_grouped_gemm", "launch_fp8_grouped_gemm", "fp8_grouped_gemm_configs", "fp8_grouped_gemm_tma_configs"]


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
    STAGES: tl.constexpr,
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
        BLOCK_M, BLOCK_N, SCALE_BLOCK, STAGES,
    )
    mask = (offs_m < end)[:, None] & (offs_n < N)[None, :]
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _fp8_grouped_gemm_tma_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, offsets_ptr, c_ptr,
    M, N, K, E,
    stride_xm, stride_xsm, stride_xsk, stride_wn, stride_wse, stride_wsn, stride_wsk, stride_cm, stride_cn,
    M_BUCKET,  # autotune key only: _common.m_bucket(M)
    SCALE_BLOCK: tl.constexpr, E_CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
    STAGES: tl.constexpr, SCALE_TMA: tl.constexpr,
):
    """The grouped FP8 GEMM on Hopper: tensor descriptors over xs (M, K) and w as (E·N, K), with
    SCALE_TMA (``fp8_mainloop.scale_tma``) over xs_s as (Kb, M) and w_s as (E·N/B, Kb) too.

    grid: (min(_row_tiles(M, E, BLOCK_M, ALIGN) * cdiv(N, BLOCK_N), SMs),). Program p walks the
    virtual tiles p, p + grid, ...; tile -> (row tile t over all groups, column tile) in GROUP_M
    super-rows, t -> (group, rows) through ``locate_m_tile_by_chunks`` (E_CHUNK groups at a time;
    no scans, which warp specialisation rejects). Descriptor-read scales need a tile's first row
    16-byte aligned in xs_s, so then a group's tiles start at its first row rounded down to 4
    (ALIGN = 4) and rows of the group before are computed, never stored. Group E (the tail) and
    tiles past the last get no K loop: zeros, or nothing to store. w's experts are consecutive
    blocks of N rows (stride_we = N · stride_wn, checked by the launcher).
    """
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[stride_xm, 1], block_shape=[BLOCK_M, SCALE_BLOCK])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[E * N, K], strides=[stride_wn, 1],
                                       block_shape=[BLOCK_N, SCALE_BLOCK])
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_kb = K // SCALE_BLOCK
    n_blocks = tl.cdiv(N, SCALE_BLOCK)
    if WARP_SPECIALIZE and SCALE_TMA and BLOCK_N <= SCALE_BLOCK:
        as_desc = tl.make_tensor_descriptor(xs_ptr, shape=[num_kb, M], strides=[stride_xsk, 1],
                                            block_shape=[1, BLOCK_M])
        bs_desc = tl.make_tensor_descriptor(ws_ptr, shape=[E * n_blocks, num_kb], strides=[stride_wsn, 1],
                                            block_shape=[1, 4])
        row_tiles = tl.minimum(tl.cdiv(M + (E + 1) * 3, BLOCK_M) + E, M)
    else:
        as_desc = None
        bs_desc = None
        row_tiles = tl.minimum(tl.cdiv(M, BLOCK_M) + E, M)
    for tile in tl.range(tl.program_id(0), row_tiles * num_pid_n, tl.num_programs(0), flatten=False):
        t, pid_n = grouped_tile_order(tile, row_tiles, num_pid_n, GROUP_M)
        if WARP_SPECIALIZE and SCALE_TMA and BLOCK_N <= SCALE_BLOCK:
            grp, start, end, first = locate_m_tile_by_chunks(offsets_ptr, t, M, E, BLOCK_M, E_CHUNK, 4)
        else:
            grp, start, end, first = locate_m_tile_by_chunks(offsets_ptr, t, M, E, BLOCK_M, E_CHUNK)
        expert = tl.maximum(tl.minimum(grp, E - 1), 0)
        offs_m = start + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        as_ptrs = xs_ptr + tl.minimum(offs_m, M - 1).to(tl.int64) * stride_xsm
        ws_base = ws_ptr + expert.to(tl.int64) * stride_wse
        if BLOCK_N <= SCALE_BLOCK:
            bs_ptrs = ws_base + (pid_n * BLOCK_N // SCALE_BLOCK) * stride_wsn + tl.zeros([BLOCK_M], tl.int32)
        else:
            bs_ptrs = ws_base + (tl.minimum(offs_n, N - 1) // SCALE_BLOCK) * stride_wsn
        tile_kb = tl.where((grp < E) & (start < end), num_kb, 0)  # the tail group: no K loop, zeros
        acc = fp8_tma_tile(x_desc, w_desc, start, expert * N + pid_n * BLOCK_N, as_ptrs, bs_ptrs, stride_xsk,
                           stride_wsk, 0, tile_kb, as_desc, bs_desc, 0, start,
                           expert * n_blocks + pid_n * BLOCK_N // SCALE_BLOCK,
                           BLOCK_M, BLOCK_N, SCALE_BLOCK, WARP_SPECIALIZE, STAGES, SCALE_TMA)
        mask = ((offs_m >= first) & (offs_m < end))[:, None] & (offs_n < N)[None, :]
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


def fp8_grouped_gemm_tma_configs(cls: str) -> list[triton.Config]:
    """Hopper configs by mean rows per expert (``fp8_gemm.fp8_gemm_tma_configs``' reasoning;
    small groups waste rows of a 64-row tile, so the small class has narrow column tiles and deep
    pipelines, reading the weights once)."""
    c = tma_config
    if cls == "small":
        return [c(64, 64, 4, 5), c(64, 32, 4, 6), c(64, 128, 4, 3), c(64, 16, 4, 8)]
    if cls == "medium":
        return [c(64, 128, 4, 3), c(128, 128, 8, 2), c(64, 64, 4, 5), c(128, 64, 8, 4),
                c(128, 128, 4, 4, ws=True), c(128, 64, 4, 6, ws=True), c(64, 32, 4, 6)]
    return [c(128, 128, 8, 2), c(128, 64, 8, 4), c(128, 128, 4, 4, ws=True), c(128, 64, 4, 6, ws=True),
            c(64, 128, 4, 3)]


def _grouped_tiles(nargs: dict, bm: int, bn: int) -> tuple[int, int]:
    """The wave model's view: the rows as if spread evenly over the experts."""
    M, N, E = nargs["M"], nargs["N"], max(nargs["E"], 1)
    rows = cdiv(M, E)
    return E * cdiv(rows, bm) * cdiv(N, bn), min(bm, rows)


def _row_tiles(M: int, E: int, block_m: int, align: int = 1) -> int:
    """The grid's row tiles: at least the real ones, Σ_g ceil(count_g / BLOCK_M) over the E groups
    and the tail (module docstring), with tiles starting at rows rounded down to ``align``
    (``tl_helpers.locate_m_tile_by_chunks``); the kernel's ``num_pid_m``."""
    return min(cdiv(M + (E + 1) * (align - 1), block_m) + E, M)


#: Groups the Hopper kernel's tile search takes at a time: (E_CHUNK, E_CHUNK) triangular reductions.
E_CHUNK = 16
_KEY = ["N", "K", "SCALE_BLOCK", "M_BUCKET"]
_TUNED = {
    cls: autotune(f"fp8_grouped_gemm_{cls}", fp8_grouped_gemm_configs(cls), key=_KEY)(
        _fp8_grouped_gemm_kernel)
    for cls in ("small", "medium", "large")
}
_TMA_TUNED = {
    cls: hopper_tuner(autotune(
        f"fp8_grouped_gemm_tma_{cls}", fp8_grouped_gemm_tma_configs(cls), key=[*_KEY, "SCALE_TMA"],
        prune_configs_by={"early_config_prune": tma_pruner(_grouped_tiles, SMEM_BUDGET, "x_ptr")},
    )(_fp8_grouped_gemm_tma_kernel))
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
    offsets = offsets.contiguous()  # the kernels index it flat
    launch_fp8_grouped_gemm(out, xs, xs_s, w, w_s, offsets, block, config)


def _rows_view(w: Tensor) -> Tensor | None:
    """w (E, N, K) as (E·N, K) without a copy, or None."""
    E, N, K = w.shape
    if E == 0 or w.stride(0) != N * w.stride(1):
        return None
    return w.reshape(E * N, K)


def launch_fp8_grouped_gemm(out, xs, xs_s, w, w_s, offsets, block, config, capability=None) -> None:
    """The grouped GEMM into ``out`` (M, N); ``capability`` (default: the device's) feeds the path
    rule ``fp8_mainloop.fp8_path``. M >= 1, N >= 1, offsets contiguous."""
    cap = device_capability(xs.device) if capability is None else capability
    w2 = _rows_view(w)
    if fp8_path(cap, block, xs, w2) == "tma":
        _launch_tma(out, xs, xs_s, w2, w_s, offsets, block, config)
    else:
        _launch_pointer(out, xs, xs_s, w, w_s, offsets, block, config)


def _launch_pointer(out, xs, xs_s, w, w_s, offsets, block, config) -> None:
    M, K = xs.shape
    E, N, _ = w.shape
    args = (xs, xs_s, w, w_s, offsets, out, M, N, K, E,
            *xs.stride(), *xs_s.stride(), *w.stride(), *w_s.stride(), *out.stride(), m_bucket(M))
    consts = dict(SCALE_BLOCK=block, BLOCK_E=next_power_of_2(E + 1))
    if config is None:
        grid = lambda meta: (_row_tiles(M, E, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)
        _TUNED[m_class(cdiv(M, max(E, 1)))][grid](*args, **consts)
    else:
        meta = pointer_meta(config)
        grid = (_row_tiles(M, E, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)
        _fp8_grouped_gemm_kernel[grid](*args, **consts, **meta)


def tma_launch_args(out, xs, xs_s, w2, w_s, offsets, block) -> tuple[tuple, dict]:
    """The Hopper kernel's arguments (``w2``: w as (E·N, K)) and constexprs; also what the sm_90
    compile test binds."""
    M, K = xs.shape
    E = offsets.shape[0]
    N = w2.shape[0] // E
    args = (xs, xs_s, w2, w_s, offsets, out, M, N, K, E, xs.stride(0), *xs_s.stride(), w2.stride(0), *w_s.stride(),
            *out.stride(), m_bucket(M))
    return args, dict(SCALE_BLOCK=block, E_CHUNK=min(next_power_of_2(E + 1), E_CHUNK),
                      SCALE_TMA=scale_tma(xs_s.t(), merged_rows(w_s)))


def _align(meta: dict, consts: dict) -> int:
    """The row alignment of the Hopper kernel's tiles (its ALIGN): 4 where the warp-specialised
    schedule reads the scales through descriptors (the kernel's rule: SCALE_TMA and BLOCK_N at
    most one scale block), else 1."""
    return 4 if meta.get("WARP_SPECIALIZE") and consts["SCALE_TMA"] and meta["BLOCK_N"] <= consts["SCALE_BLOCK"] else 1


def _launch_tma(out, xs, xs_s, w2, w_s, offsets, block, config) -> None:
    M = xs.shape[0]
    E = offsets.shape[0]
    N = w2.shape[0] // E
    args, consts = tma_launch_args(out, xs, xs_s, w2, w_s, offsets, block)
    sms = num_sms(xs.device)
    ensure_tma_allocator()
    if config is None:
        grid = lambda meta: (min(_row_tiles(M, E, meta["BLOCK_M"], _align(meta, consts)) * cdiv(N, meta["BLOCK_N"]),
                                 sms),)
        _TMA_TUNED[m_class(cdiv(M, max(E, 1)))][grid](*args, **consts)
    else:
        meta = hopper_meta(config)
        grid = (min(_row_tiles(M, E, meta["BLOCK_M"], _align(meta, consts)) * cdiv(N, meta["BLOCK_N"]), sms),)
        _fp8_grouped_gemm_tma_kernel[grid](*args, **consts, **meta)
