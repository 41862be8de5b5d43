"""Block-scaled FP8 GEMM (DeepSeek-V3's recipe): ``c = a · bᵀ`` with 1×B and B×B scales.

Legend: M rows of ``a`` (tokens), N output features, K reduction dim, B the scale block (128),
Kb = K/B.

    a (M, K) e4m3,  a_s (M, Kb) f32      one scale per row and K block (any strides; the
                                         column-major layout of ``fp8_quant.to_col_major`` is
                                         the fastest to read)
    b (N, K) e4m3,  b_s (ceil(N/B), Kb)  one scale per B×B block of b (F.linear layout)
    c (M, N) bf16 / fp16 / fp32

Algorithm (the reference's per-block promotion): for each K block kb, ``p = a_blk · b_blkᵀ`` on the
tensor cores into a fresh float32 tile, then ``acc += p · (a_s[:, kb] · b_s[n // B, kb])``; the
tile is cast to ``out_dtype`` once at the end. The reference multiplies ``(p · a_s) · b_s``; the
kernels form the combined scale first (one FMA per accumulator element): the two differ by at
most one float32 rounding per block. On a GPU, Hopper's FP8 tensor cores accumulate a 128-deep
block with less than float32 precision (about 14 bits, DeepSeek-V3 report §3.3.2): that is why the
promotion happens every 128 of K, and why GPU results are near, not bit, exact.

Two kernels, one rule (``fp8_mainloop.fp8_path``):

- ``_fp8_gemm_tma_kernel`` (Hopper, sm_90+, block 128, a and b TMA-readable): persistent,
  ``min(tiles · SPLIT_K, SMs)`` programs walk the (BLOCK_M, BLOCK_N) tiles in GROUP_M super-rows
  (L2 reuse), each tile through ``fp8_mainloop.fp8_tma_tile`` (tensor descriptors, the promotion
  overlapped with the next wgmma, or the warp-specialised schedule). Rows past M and columns
  past N are zero-filled by TMA and masked at the store. Decode-sized M runs 64-row tiles
  (wgmma's smallest; TMA reads only the rows that exist) and, where the wave model says it pays
  (decode and medium M, the workspace within ``SPLIT_K_WORKSPACE``), splits K (``SPLIT_K``): each
  of a tile's SPLIT_K programs computes a K range into a float32 workspace, and the last to arrive
  (an acq_rel counter per tile) adds the partials in split order and stores c, in the same launch.
  Wider tiles then still fill the SMs while a's rows are read once per tile rather than once per
  narrow column tile (M = 64, N = 2112, K = 7168: 33 tiles of 64×64 split 4 make 132 programs and
  read a 33 times; unsplit 64×16 tiles read it 132 times, 60 MB against a 15 MB weight). The
  workspace and counters are cached per device and stream (``split_k_buffers``; a graph capture
  makes none: warm up first).
- ``_fp8_gemm_kernel`` (pointer loads, cp.async pipelines): GPUs before Hopper (sm_89), scale
  blocks other than 128 and operands a descriptor cannot take; one program per tile, rows and
  columns clamped for loads.

Both take any M >= 0 and N >= 0, K a multiple of the block; scales and the output any strides.

Configs come in three lists per kernel chosen by an M class (decode M <= 64, medium M <= 512,
large). The Hopper lists are pruned and ordered by a wave model (``fp8_mainloop.tma_pruner``:
tiles, or tiles × SPLIT_K units, over SMs, a unit's MMA work and operand bytes, the split-K
partials' traffic) and autotuned keyed on (N, K, M's power-of-two bucket; SPLIT_K is a config
field like the block sizes); the pointer lists are keyed on (N, K). ``MOELA_FP8_GEMM_<CLASS>_CONFIG`` /
``MOELA_FP8_GEMM_TMA_<CLASS>_CONFIG`` (CLASS: SMALL, MEDIUM, LARGE) pin one config. The kernels'
domain is narrower than the reference's: K a multiple of the block, blocks of 32, 64, 128 or 256.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from moela.reference.fp8 import check_fp8_gemm

from ._common import autotune, cdiv, device_capability, ensure_tma_allocator, m_bucket, next_power_of_2, num_sms
from .factory import kernel_op
from .fp8_mainloop import fp8_path, fp8_tma_tile, hopper_meta, hopper_tuner, scale_tma, tma_config, tma_pruner
from .tl_helpers import SMEM_BUDGET, fp8_block_scaled_tile, grouped_tile_order

__all__ = [
    "fp8_gemm", "fp8_kernel_block", "fp8_gemm_configs", "fp8_gemm_tma_configs", "fp8_config", "pointer_meta",
    "launch_fp8_gemm", "m_class", "BLOCKS", "split_k_need", "split_k_buffers", "SPLIT_K_WORKSPACE",
]

#: The scale blocks the FP8 GEMM kernels take (the K tile is the scale block).
BLOCKS = (32, 64, 128, 256)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _fp8_gemm_kernel(
    a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, bias_ptr,
    M, N, K,
    stride_am, stride_ak, stride_asm, stride_ask,
    stride_bn, stride_bk, stride_bsn, stride_bsk,
    stride_cm, stride_cn,
    SCALE_BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
    STAGES: tl.constexpr,
):
    """c[M, N] = Σ_kb promote(a_kb · b_kbᵀ) (+ bias), BLOCK_K = SCALE_BLOCK.

    grid: (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),). Each program owns one (BLOCK_M, BLOCK_N) tile of
    c and runs K/SCALE_BLOCK steps.
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = grouped_tile_order(pid, num_pid_m, num_pid_n, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_m, M - 1).to(tl.int64)
    cols = tl.minimum(offs_n, N - 1).to(tl.int64)

    acc = fp8_block_scaled_tile(
        a_ptr, as_ptr, b_ptr, bs_ptr, rows, cols, pid_n * BLOCK_N, K // SCALE_BLOCK,
        stride_am, stride_ak, stride_asm, stride_ask, stride_bn, stride_bk, stride_bsn, stride_bsk,
        BLOCK_M, BLOCK_N, SCALE_BLOCK, STAGES,
    )
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fp8_gemm_epilogue(acc, c_ptr, bias_ptr, offs_m, offs_n, mask, N, stride_cm, stride_cn, HAS_BIAS: tl.constexpr):
    """c[offs_m, offs_n] = acc (+ bias), one cast to c's dtype, stored where ``mask`` (inside (M, N))."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + tl.minimum(offs_n, N - 1)).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _split_k_fixup(acc, ws_ptrs, split_stride, counter_ptr, split, split_k, mask,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Split ``split`` of a tile hands in its float32 partial ``acc``; returns (the sum of the
    tile's ``split_k`` partials in split order, whether this unit arrived last and so owns the
    epilogue; the sum is zeros where it did not).

    ws_ptrs: (BLOCK_M, BLOCK_N) pointers to the tile in split 0's partials, split s at
    ``s · split_stride`` elements from them, written and read only where ``mask``; counter_ptr:
    the tile's int32 counter, 0 at launch and left at 0.

    The serial split-K fixup of CUTLASS: store the partial, a CTA barrier, one thread's
    ``atom.acq_rel.gpu`` add on the counter. The unit that reads ``split_k - 1`` is the last: it
    loads every partial (its own too: no second float32 tile stays live in registers) with
    ``.cg`` (from L2, past the SM's L1, which is not coherent) and adds them in split order, so the
    bits do not depend on the order of arrival. Memory ordering: the barrier orders every
    thread's partial stores before the atomic (CTA scope); the atomic's release at gpu scope is
    cumulative, so those stores are visible to whichever CTA's acquiring atomic reads its
    result; the reducer's result reaches its other threads through shared memory and a barrier
    (Triton's lowering of a scalar atomic), so their loads follow the acquire. Nothing waits for
    another program: correct in any order of execution, the interpreter's one-by-one included.
    """
    tl.store(ws_ptrs + split * split_stride, acc, mask=mask)
    tl.debug_barrier()  # every thread's partial stores before the release below
    arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    last = arrived == split_k - 1
    total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if last:
        for s in tl.range(0, split_k):  # split order, whichever unit reduces: the same bits
            total += tl.load(ws_ptrs + s * split_stride, mask=mask, other=0.0, cache_modifier=".cg")
        tl.store(counter_ptr, 0)  # every split has arrived: nothing else touches it in this launch
    return total, last


@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _fp8_gemm_tma_kernel(
    a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, bias_ptr, ws_ptr, counters_ptr,
    M, N, K,
    stride_am, stride_asm, stride_ask, stride_bn, stride_bsn, stride_bsk, stride_cm, stride_cn,
    M_BUCKET,  # autotune key only: _common.m_bucket(M)
    ws_size, counters_size,  # elements of ws and counters (split-K)
    SCALE_BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
    STAGES: tl.constexpr, SCALE_TMA: tl.constexpr, SPLIT_K: tl.constexpr = 1,
):
    """c[M, N] = Σ_kb promote(a_kb · b_kbᵀ) (+ bias) on Hopper: tensor descriptors, persistent tiles.

    grid: (min(cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N) * SPLIT_K, SMs),). Program p computes units
    p, p + grid, p + 2·grid, ...: unit u is split ``u % SPLIT_K`` of tile ``u // SPLIT_K`` (tile ->
    (pid_m, pid_n) in GROUP_M super-rows), computed with ``fp8_mainloop.fp8_tma_tile``. a (M, K)
    and b (N, K) are read through descriptors made here, and with SCALE_TMA
    (``fp8_mainloop.scale_tma``) a_s as (Kb, M) and b_s as (N/B, Kb) too.

    Split-K (SPLIT_K > 1; the pipelined schedule): split s takes the K blocks
    [s·chunk, min((s+1)·chunk, Kb)), chunk = ``fp8_mainloop.split_chunk(Kb, SPLIT_K)`` (even: only
    the last split may end on an odd block, K's end), possibly none. Each unit stores its float32
    partial in ws, (SPLIT_K, cdiv(M, BLOCK_M)·BLOCK_M, cdiv(N, BLOCK_N)·BLOCK_N) float32 (rows < M
    and columns < N only), and counts itself on the tile's int32 counter; the last to arrive sums
    the tile's partials in split order, runs the epilogue and puts the counter back to 0
    (:func:`_split_k_fixup`: memory ordering, determinism). ws and counters (``ws_size`` /
    ``counters_size`` elements, the counters 0) come from the launcher, which sizes them for the
    configs it may run; where they are too small for this config, K is not split.
    """
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1], block_shape=[BLOCK_M, SCALE_BLOCK])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[stride_bn, 1], block_shape=[BLOCK_N, SCALE_BLOCK])
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    num_kb = K // SCALE_BLOCK
    if WARP_SPECIALIZE and SCALE_TMA and BLOCK_N <= SCALE_BLOCK:
        as_desc = tl.make_tensor_descriptor(as_ptr, shape=[num_kb, M], strides=[stride_ask, 1],
                                            block_shape=[1, BLOCK_M])
        bs_desc = tl.make_tensor_descriptor(bs_ptr, shape=[tl.cdiv(N, SCALE_BLOCK), num_kb], strides=[stride_bsn, 1],
                                            block_shape=[1, 4])
    else:
        as_desc = None
        bs_desc = None
    if SPLIT_K == 1:
        split_k = 1
    else:
        tl.static_assert(not WARP_SPECIALIZE, "split-K runs the pipelined schedule")
        ws_cols = num_pid_n * BLOCK_N
        split_stride = (num_pid_m * BLOCK_M).to(tl.int64) * ws_cols  # ws: (SPLIT_K, M rounded up, N rounded up)
        fits = (split_stride * SPLIT_K <= ws_size) & (num_tiles <= counters_size)
        split_k = tl.where(fits, SPLIT_K, 1)
        chunk = tl.cdiv(num_kb, split_k)
        chunk += chunk % 2
    for unit in tl.range(tl.program_id(0), num_tiles * split_k, tl.num_programs(0), flatten=False):
        tile = unit // split_k
        pid_m, pid_n = grouped_tile_order(tile, num_pid_m, num_pid_n, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        as_ptrs = as_ptr + tl.minimum(offs_m, M - 1).to(tl.int64) * stride_asm
        if BLOCK_N <= SCALE_BLOCK:
            bs_ptrs = bs_ptr + (pid_n * BLOCK_N // SCALE_BLOCK) * stride_bsn + tl.zeros([BLOCK_M], tl.int32)
        else:
            bs_ptrs = bs_ptr + (tl.minimum(offs_n, N - 1) // SCALE_BLOCK) * stride_bsn
        if SPLIT_K == 1:
            kb0 = 0
            unit_kb = num_kb
        else:
            split = unit % split_k
            kb0 = tl.minimum(split * chunk, num_kb)
            unit_kb = tl.minimum(num_kb - kb0, chunk)
        acc = fp8_tma_tile(a_desc, b_desc, pid_m * BLOCK_M, pid_n * BLOCK_N, as_ptrs, bs_ptrs, stride_ask, stride_bsk,
                           kb0, unit_kb, as_desc, bs_desc, 0, pid_m * BLOCK_M, pid_n * BLOCK_N // SCALE_BLOCK,
                           BLOCK_M, BLOCK_N, SCALE_BLOCK, WARP_SPECIALIZE, STAGES, SCALE_TMA)
        mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        if SPLIT_K == 1:
            _fp8_gemm_epilogue(acc, c_ptr, bias_ptr, offs_m, offs_n, mask, N, stride_cm, stride_cn, HAS_BIAS)
        elif split_k == 1:
            _fp8_gemm_epilogue(acc, c_ptr, bias_ptr, offs_m, offs_n, mask, N, stride_cm, stride_cn, HAS_BIAS)
        else:
            ws_ptrs = ws_ptr + offs_m.to(tl.int64)[:, None] * ws_cols + offs_n[None, :]
            total, last = _split_k_fixup(acc, ws_ptrs, split_stride, counters_ptr + tile, split, split_k, mask,
                                         BLOCK_M, BLOCK_N)
            if last:
                _fp8_gemm_epilogue(total, c_ptr, bias_ptr, offs_m, offs_n, mask, N, stride_cm, stride_cn, HAS_BIAS)


def m_class(M: int) -> str:
    """The config list an M picks: "small" (decode, M <= 64), "medium" (M <= 512), "large"."""
    return "small" if M <= 64 else "medium" if M <= 512 else "large"


def fp8_config(bm: int, bn: int, warps: int, stages: int, group_m: int = 8) -> triton.Config:
    """A pointer kernel's config; STAGES names the pipeline depth on its K loop (see tl_helpers)."""
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": group_m, "STAGES": stages}, num_warps=warps,
                         num_stages=stages)


def pointer_meta(config: dict) -> dict:
    """A pointer kernel's launch options from a plain config dict (tests, sweeps): GROUP_M 8 and
    STAGES = num_stages unless given."""
    meta = {"GROUP_M": 8, **config}
    meta.setdefault("STAGES", meta.get("num_stages", 3))
    return meta


def fp8_gemm_configs(cls: str) -> list[triton.Config]:
    """The pointer kernel's configs per M class (first = default; sized for Hopper's and Ada's
    shared memory). BLOCK_K is the scale block, not tuned.

    The promotion keeps two float32 tiles live (the accumulator and the fresh block product), so
    a tile gets at most ~64 accumulator registers per thread: 128×128 with 8 warps, 64×128 or
    128×64 with 4; BLOCK_M >= 64 uses wgmma (one warpgroup per 64 rows), smaller BLOCK_M the
    mma.sync path, which is enough for memory-bound decode. Stages × (BLOCK_M + BLOCK_N) × 128 B
    of shared memory stay under Hopper's 227 KB.
    """
    c = fp8_config
    if cls == "small":  # decode: memory-bound on b; many programs (N/16 = 132 for N = 2112), deep pipelines
        return [c(16, 64, 4, 4), c(16, 32, 4, 4), c(16, 128, 4, 4), c(32, 64, 4, 5), c(64, 64, 4, 4), c(16, 64, 4, 6),
                c(64, 32, 4, 6), c(16, 32, 2, 8), c(16, 16, 1, 8)]
    if cls == "medium":
        return [c(64, 64, 4, 4), c(64, 128, 4, 4), c(128, 64, 4, 4), c(32, 64, 4, 5), c(64, 32, 4, 5),
                c(128, 128, 8, 4)]
    return [c(128, 128, 8, 4), c(64, 128, 4, 4), c(128, 64, 4, 4), c(128, 128, 8, 3), c(64, 256, 8, 3),
            c(128, 128, 8, 5), c(64, 64, 4, 5)]


def fp8_gemm_tma_configs(cls: str) -> list[triton.Config]:
    """Hopper configs per M class (``tma_pruner`` orders them by the wave model; compiled for sm_90
    by tests/kernels/test_fp8_sm90.py: no spills, within shared memory).

    Without warp specialisation the promotion keeps three float32 tiles live (the accumulator,
    the waited block, the block in flight): 64 rows × up to 128 columns per warpgroup, so 128-row
    tiles take 8 warps. Stages hold two K blocks each. Decode (M <= 64): 64-row tiles (wgmma's
    smallest; TMA zero-fills rows past M without reading them) over 16-128 columns, deep
    pipelines, and split-K (``split_k``: K over 2-8 programs per tile), which fills the SMs with
    fewer, wider tiles, each reading a's rows for its part of K only (M = 64, N = 2112, K = 7168:
    64×64 tiles split 4 make 132 units and read a 33 times, 64×16 tiles 132 times). The
    warp-specialised configs (``ws``) are 128-row tiles at num_warps=4 (+ the producer). Medium M
    (a few 64-row tiles) has split configs too: at M = 128 the model splits K where N is small.
    """
    c = tma_config
    if cls == "small":
        return [c(64, 16, 4, 8), c(64, 32, 4, 6), c(64, 64, 4, 5), c(64, 128, 4, 3),
                c(64, 32, 4, 6, split_k=2), c(64, 32, 4, 6, split_k=4), c(64, 64, 4, 5, split_k=2),
                c(64, 64, 4, 5, split_k=4), c(64, 64, 4, 5, split_k=8), c(64, 128, 4, 3, split_k=2),
                c(64, 128, 4, 3, split_k=4), c(64, 128, 4, 3, split_k=8)]
    if cls == "medium":  # the narrow tiles fill the SMs when M is a tile or two (128 x 2112: 64x32 -> 132 tiles)
        return [c(64, 128, 4, 3), c(128, 128, 8, 2), c(64, 64, 4, 5), c(128, 64, 8, 4),
                c(128, 128, 4, 4, ws=True), c(128, 64, 4, 6, ws=True), c(64, 32, 4, 6), c(64, 16, 4, 8),
                c(64, 64, 4, 5, split_k=2), c(64, 64, 4, 5, split_k=4), c(64, 128, 4, 3, split_k=2),
                c(64, 128, 4, 3, split_k=4)]
    return [c(128, 128, 8, 2), c(128, 64, 8, 4), c(128, 128, 4, 4, ws=True), c(128, 64, 4, 6, ws=True),
            c(64, 128, 4, 3)]


def _dense_tiles(nargs: dict, bm: int, bn: int) -> tuple[int, int]:
    M, N = nargs["M"], nargs["N"]
    return cdiv(M, bm) * cdiv(N, bn), min(bm, M)


#: The most float32 elements a split-K config's workspace may take at a shape (16 MiB); a split
#: config needing more there is pruned (it would pay only where tiles are few, so never matters
#: at DeepSeek's decode shapes).
SPLIT_K_WORKSPACE = 1 << 22


def _split_k_workspace(config: dict, M: int, N: int) -> int:
    """Float32 elements of the split-K workspace ``config`` (kwargs) takes at (M, N); 0 unsplit."""
    split = config.get("SPLIT_K", 1)
    if split == 1:
        return 0
    return cdiv(M, config["BLOCK_M"]) * cdiv(N, config["BLOCK_N"]) * split * config["BLOCK_M"] * config["BLOCK_N"]


def _tma_prune(prune):
    """The Hopper pruner after dropping split configs whose workspace exceeds ``SPLIT_K_WORKSPACE``."""

    def wrapped(configs: list[triton.Config], nargs: dict, **kwargs) -> list[triton.Config]:
        M, N = nargs["M_BUCKET"], nargs["N"]  # the bucket's largest M: the choice serves the whole bucket
        kept = [c for c in configs if _split_k_workspace(c.kwargs, M, N) <= SPLIT_K_WORKSPACE]
        return prune(kept or configs[:1], nargs, **kwargs)

    return wrapped


_KEY = ["N", "K", "SCALE_BLOCK", "HAS_BIAS"]
_TUNED = {
    cls: autotune(f"fp8_gemm_{cls}", fp8_gemm_configs(cls), key=_KEY)(_fp8_gemm_kernel)
    for cls in ("small", "medium", "large")
}
_TMA_TUNED = {
    cls: hopper_tuner(autotune(
        f"fp8_gemm_tma_{cls}", fp8_gemm_tma_configs(cls),
        key=["N", "K", "SCALE_BLOCK", "HAS_BIAS", "M_BUCKET", "SCALE_TMA"],
        prune_configs_by={"early_config_prune": _tma_prune(tma_pruner(_dense_tiles, SMEM_BUDGET, "a_ptr"))},
    )(_fp8_gemm_tma_kernel))
    for cls in ("small", "medium", "large")
}


# ----------------------------------------------------------------------------------------------
# The op
# ----------------------------------------------------------------------------------------------


def fp8_kernel_block(op: str, block: int, K: int, name: str) -> None:
    """The FP8 GEMM kernels' domain: block in ``BLOCKS`` and K a multiple of it."""
    if block not in BLOCKS:
        raise ValueError(f"block: the Triton {op} kernel takes one of {BLOCKS} (the K tile is the scale "
                         f"block), got {block!r} (moela.reference.{op} takes any)")
    if K % block:
        raise ValueError(f"{name}: the Triton {op} kernel takes K (the last dim) a multiple of block={block}, "
                         f"got K={K} (moela.reference.{op} takes partial blocks)")


def launch_fp8_gemm(out, a, a_s, b, b_s, block, bias, config, capability=None) -> None:
    """The block-scaled GEMM into ``out`` (M, N), ``bias`` (N,) or None added to the float32
    accumulator; shared with ``fp8_linear``. ``capability`` (default: the device's,
    ``_common.device_capability``) feeds the path rule ``fp8_mainloop.fp8_path``."""
    M, K = a.shape
    N = b.shape[0]
    if M == 0 or N == 0:
        return
    bias = None if bias is None else bias.contiguous()  # the kernels index it flat
    cap = device_capability(a.device) if capability is None else capability
    if fp8_path(cap, block, a, b) == "tma":
        _launch_tma(out, a, a_s, b, b_s, block, bias, config)
    else:
        _launch_pointer(out, a, a_s, b, b_s, block, bias, config)


def _launch_pointer(out, a, a_s, b, b_s, block, bias, config) -> None:
    M, K = a.shape
    N = b.shape[0]
    args = (a, a_s, b, b_s, out, bias if bias is not None else a_s, M, N, K,
            *a.stride(), *a_s.stride(), *b.stride(), *b_s.stride(), *out.stride())
    consts = dict(SCALE_BLOCK=block, HAS_BIAS=bias is not None)
    if config is None:
        grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)
        _TUNED[m_class(M)][grid](*args, **consts)
    else:
        meta = pointer_meta(config)
        _fp8_gemm_kernel[(cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)](*args, **consts, **meta)


def split_k_need(configs, M: int, N: int, limit: int | None = None) -> tuple[int, int]:
    """(workspace float32 elements, counters) the split-K configs among ``configs`` (kwargs dicts)
    take at (M, N): ``tiles · SPLIT_K · BLOCK_M · BLOCK_N`` and ``tiles``, the largest of each;
    with ``limit``, only configs whose workspace is within it (the others are pruned)."""
    ws = counters = 0
    for k in configs:
        need = _split_k_workspace(k, M, N)
        if need and (limit is None or need <= limit):
            ws, counters = max(ws, need), max(counters, cdiv(M, k["BLOCK_M"]) * cdiv(N, k["BLOCK_N"]))
    return ws, counters


@functools.lru_cache(maxsize=1024)
def _class_need(cls: str, M: int, N: int) -> tuple[int, int]:
    return split_k_need([c.kwargs for c in _TMA_TUNED[cls].configs], M, N, SPLIT_K_WORKSPACE)


#: (device, stream) -> (workspace, counters) of the split-K configs: one pair per stream, so that
#: launches on two streams never share partials or counters. Kept for the life of the process: a
#: CUDA graph holds their addresses, and the counters stay zero between launches.
_SPLIT_K_BUFFERS: dict[tuple[torch.device, int], tuple[Tensor, Tensor]] = {}
#: Buffers a larger need replaced (and a capture's placeholders): never freed, since a captured
#: graph may still use them.
_RETIRED_BUFFERS: list[Tensor] = []


def _stream_of(device: torch.device) -> int:
    """The current stream of a CUDA device (its raw handle, ~0.1 µs), 0 elsewhere."""
    if device.type != "cuda":
        return 0
    return torch._C._cuda_getCurrentRawStream(device.index if device.index is not None else torch.cuda.current_device())


def _capturing(device: torch.device) -> bool:
    """Is the current stream of ``device`` capturing a CUDA graph?"""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def split_k_buffers(device: torch.device, ws_elems: int, counters: int) -> tuple[Tensor, Tensor]:
    """The split-K workspace (float32) and tile counters (int32, zero) of the current stream on
    ``device``, at least ``ws_elems`` and ``counters`` long (powers of two: few regrowths). No
    host sync: a new counter buffer is zeroed on the current stream.

    During a CUDA-graph capture nothing is made or grown (a zeroing there would only be recorded,
    and run when the graph replays): the stream's buffers serve the capture as they are, and a
    launch that needs more runs unsplit (the kernel checks the sizes it is given). Warm up before
    capturing, as ``Transformer.decode_graph`` does, and the captured launches split.
    """
    key = (device, _stream_of(device))
    ws, cnt = _SPLIT_K_BUFFERS.get(key, (None, None))
    if ws is not None and ws.numel() >= ws_elems and cnt.numel() >= counters:
        return ws, cnt
    if _capturing(device):
        if ws is None:  # placeholders the kernel never touches: too small for any split
            ws = torch.empty(1, dtype=torch.float32, device=device)
            cnt = torch.empty(1, dtype=torch.int32, device=device)
            _RETIRED_BUFFERS.extend((ws, cnt))
        return ws, cnt
    if ws is None or ws.numel() < ws_elems:
        if ws is not None:
            _RETIRED_BUFFERS.append(ws)
        ws = torch.empty(next_power_of_2(max(ws_elems, 4096)), dtype=torch.float32, device=device)
    if cnt is None or cnt.numel() < counters:
        if cnt is not None:
            _RETIRED_BUFFERS.append(cnt)
        cnt = torch.zeros(next_power_of_2(max(counters, 1024)), dtype=torch.int32, device=device)
    _SPLIT_K_BUFFERS[key] = ws, cnt
    return ws, cnt


def tma_launch_args(out, a, a_s, b, b_s, block, bias, config=None) -> tuple[tuple, dict]:
    """The Hopper kernel's arguments and constexprs (also what the sm_90 compile test binds); the
    split-K buffers sized for ``config`` (a kwargs dict), or for every config of M's class."""
    M, K = a.shape
    N = b.shape[0]
    need = _class_need(m_class(M), m_bucket(M), N) if config is None else split_k_need([config], M, N)
    ws, counters = split_k_buffers(a.device, *need)
    args = (a, a_s, b, b_s, out, bias if bias is not None else a_s, ws, counters, M, N, K, a.stride(0), *a_s.stride(),
            b.stride(0), *b_s.stride(), *out.stride(), m_bucket(M), ws.numel(), counters.numel())
    return args, dict(SCALE_BLOCK=block, HAS_BIAS=bias is not None, SCALE_TMA=scale_tma(a_s.t(), b_s))


def _launch_tma(out, a, a_s, b, b_s, block, bias, config) -> None:
    M, N = a.shape[0], b.shape[0]
    sms = num_sms(a.device)
    ensure_tma_allocator()
    if config is None:
        args, consts = tma_launch_args(out, a, a_s, b, b_s, block, bias)
        grid = lambda meta: (min(cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]) * meta.get("SPLIT_K", 1), sms),)
        _TMA_TUNED[m_class(M)][grid](*args, **consts)
    else:
        meta = hopper_meta(config, split_k=True)
        args, consts = tma_launch_args(out, a, a_s, b, b_s, block, bias, meta)
        grid = (min(cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]) * meta.get("SPLIT_K", 1), sms),)
        _fp8_gemm_tma_kernel[grid](*args, **consts, **meta)


def _domain(a, a_s, b, b_s, out_dtype=torch.bfloat16, block=128) -> None:
    fp8_kernel_block("fp8_gemm", block, a.shape[1], "a")


@kernel_op("fp8_gemm", contract=check_fp8_gemm, domain=_domain, fp8=True)
def fp8_gemm(out, a: Tensor, a_s: Tensor, b: Tensor, b_s: Tensor, out_dtype: torch.dtype = torch.bfloat16,
             block: int = 128, *, config=None) -> Tensor:
    """``a · bᵀ`` with block scales and per-block float32 promotion (``moela.reference.fp8_gemm``).

    Args:
        a: (M, K) float8_e4m3fn, any M >= 0 (decode M = 1 included); K a multiple of ``block``.
        a_s: (M, K/block) float32, any strides (column-major is fastest: ``fp8_quant.to_col_major``).
        b: (N, K) float8_e4m3fn (F.linear layout), any N.
        b_s: (ceil(N/block), K/block) float32.
        out_dtype: bfloat16 (default), float16 or float32.
        block: the scale block, 128 for DeepSeek (32, 64, 128 or 256).
    Returns:
        (M, N) in out_dtype.

    Example::

        q, s = quant_act(x)                    # x (M, K) bf16
        y = fp8_gemm(q, s, w_fp8, w_scale_inv)  # (M, N) bf16
    """
    launch_fp8_gemm(out, a, a_s, b, b_s, block, None, config)
