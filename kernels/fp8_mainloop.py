"""The Hopper main loop of the block-scaled FP8 GEMMs and the rule that picks it.

Legend: M rows of ``a`` (tokens), N output features, K reduction dim, B the scale block (the K
tile), Kb = K/B; a tile is BLOCK_M × BLOCK_N of the output.

:func:`fp8_tma_tile` computes one tile of ``Σ_kb promote(a_kb · b_kbᵀ)`` (``reference.fp8_gemm``:
each B-deep block product lands in a fresh float32 tile, is multiplied by ``a_s[rows, kb] ·
b_s[cols // B, kb]`` and added to the float32 accumulator, blocks in K order) over a range of K
blocks: all of K, or one split of it (split-K, :func:`split_chunk`). ``a`` and ``b``
tiles come through tensor descriptors (TMA, ``cp.async.bulk.tensor``; rows and columns past the
tensor are zero-filled, so no masks) that each program makes on the device
(``tl.make_tensor_descriptor``: the block shape follows the config's constexprs, so autotuning
and the config tables need nothing on the host; Triton's global scratch holds them, allocated
through torch by ``_common.ensure_tma_allocator``); the scales are pointer loads (any
strides), which the software pipeliner turns into ``cp.async``. Two schedules, chosen by the
``WARP_SPECIALIZE`` constexpr of a config:

- ``WARP_SPECIALIZE=False`` (software pipelined, ``num_warps`` 4 or 8): K blocks go two at a
  time. Block 2j's wgmma is waited for at once (the wait also retires block 2j-1's), then block
  2j+1's wgmma is issued and left in flight (``isAsync``, no wait until the next pair) while
  blocks 2j-1 and 2j are promoted: the compiled loop reads wgmma, commit, wait 0, wgmma,
  commit, then the promotions' FMAs, so the tensor cores idle only between a wait's return and
  the next issue. The scale loads are pipelined with the tiles (``cp.async``); no synchronous
  global load remains in the loop. A block past K (odd Kb) is zero-filled by TMA and promoted
  with scale 0.
- ``WARP_SPECIALIZE=True`` (``num_warps=4``, BLOCK_M = 128): ``tl.range(warp_specialize=True)``,
  which Triton 3.6 lowers to DeepGEMM's layout: one producer warpgroup issuing the TMA loads,
  two math warpgroups of 64 rows each (``setmaxnreg``). Each math warpgroup waits for its own
  wgmma before promoting it (Triton lowers the consumers' dots synchronously), so the overlap is
  between warpgroups: one promotes while the other's wgmma runs, as in DeepGEMM. The math
  warpgroups load the scales themselves (Triton leaves loads that feed no dot operand in the
  consumers) with ``ld.global``, one K block ahead of their use, unless ``SCALE_TMA``: then the
  scales come through descriptors too (the producer's TMA, as in DeepGEMM): the activation
  scales as a (Kb, M) view, M contiguous (column-major, :func:`fp8_quant.empty_col_major_scales`),
  one (1, BLOCK_M) row per K block; the weight scale from a (1, 4) box of the (N/B, Kb) weight
  scales (16 bytes, TMA's least) at the aligned column ``kb // 4 * 4``. Box columns start
  16-byte aligned (the interpreter insists), so a tile's first row is a multiple of 4 (the
  contiguous grouped kernel starts a group's tiles at its first row rounded down to 4).
  :func:`scale_tma` is the host's rule.

``B_ROW_SCALES`` (the wgrad, ``fp8_wgrad``: one b scale per row of b and K block, so one per
column of the tile) makes the promotion ``p · (a_s[:, None] · b_s[None, :])`` whatever BLOCK_N,
and both schedules then read the scales through descriptors (no pointer scales: their
per-column pointers would spill the pipelined schedule's registers, and the warp-specialised one
would load them synchronously): a_s as above, b_s in (BLOCK_N, 4) boxes of the (rows of b, K
blocks) scales. Each block's scales are read at the promotion that uses them; with tiles wider
than 64 columns the pipelined schedule promotes block 2j-1 before issuing block 2j+1 (three
float32 tiles live beside the column scales), so only block 2j's promotion overlaps a wgmma.

:func:`fp8_path` is the one rule choosing between these kernels and the pointer-based ones. The
configs (:func:`tma_config`) are ranked by a wave model (:func:`wave_cost`, :func:`tma_pruner`),
which also costs split-K configs (``SPLIT_K``, the kernels that take it) by their units and
partial tiles.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moela import knobs

from ._common import num_sms, tma_operand_ok

__all__ = [
    "fp8_tma_tile", "row_promoted", "fp8_path", "tma_ready", "ranking_sms", "tma_config", "tma_smem",
    "tma_config_fits", "wave_cost", "tma_pruner", "hopper_tuner", "hopper_meta", "HOPPER", "HOPPER_BLOCK",
    "HOPPER_SMS", "FLOP_PER_BYTE",
    "KEEP_CONFIGS", "scale_tma", "merged_rows", "split_chunk", "MAX_SPLIT_K", "HOPPER_CONFIG_KEYS",
    "check_config_keys",
]

#: The first compute capability with TMA and wgmma.
HOPPER = (9, 0)
#: The SM count configs are ranked for where no GPU runs them (a compile-only audit): H100 / H200.
HOPPER_SMS = 132


@triton.jit
def _block_scale(as_ptrs, bs_ptrs, kb, valid, stride_ask, stride_bsk,
                 BLOCK_N: tl.constexpr, SCALE_BLOCK: tl.constexpr):
    """The promotion factor of K block ``kb``: (BLOCK_M, 1) when the tile lies in one B-row
    block of b (one b scale), else (BLOCK_M, BLOCK_N); 0 where ``valid`` is false (the address
    then stays at block 0)."""
    k = tl.where(valid, kb, 0)
    a_s = tl.load(as_ptrs + k * stride_ask)
    b_s = tl.load(bs_ptrs + k * stride_bsk)
    if BLOCK_N <= SCALE_BLOCK:
        s = (a_s * b_s)[:, None]
    else:
        s = a_s[:, None] * b_s[None, :]
    return tl.where(valid, s, 0.0)


@triton.jit
def _box_column(box, j):
    """Column ``j`` (0 to 3) of a (rows, 4) box of scales: (rows,)."""
    return tl.sum(tl.where(tl.arange(0, 4)[None, :] == j, box, 0.0), axis=1)


@triton.jit
def row_promoted(p, as_desc, bs_desc, as_kb0, as_m, bs_row, kb, valid):
    """``p · (a_s[:, None] · b_s[None, :])`` of K block ``kb`` with one b scale per row of b
    (B_ROW_SCALES), the scales through descriptors (``fp8_tma_tile``; also the grouped wgrad's
    masked edge blocks); 0 where ``valid`` is false (the reads then stay at block 0)."""
    k = tl.where(valid, kb, 0)
    a_s = tl.trans(as_desc.load([as_kb0 + k, as_m]))  # (BLOCK_M, 1)
    b_s = _box_column(bs_desc.load([bs_row, k // 4 * 4]), k % 4)[None, :]  # (1, BLOCK_N)
    return p * (tl.where(valid, a_s, 0.0) * tl.where(valid, b_s, 0.0))


@triton.jit
def fp8_tma_tile(
    a_desc, b_desc, a_row, b_row, as_ptrs, bs_ptrs, stride_ask, stride_bsk, kb0, num_kb,
    as_desc, bs_desc, as_kb0, as_m, bs_row,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SCALE_BLOCK: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
    STAGES: tl.constexpr, SCALE_TMA: tl.constexpr, B_ROW_SCALES: tl.constexpr = False, acc=None,
):
    """A (BLOCK_M, BLOCK_N) float32 tile of ``Σ_{kb0 <= kb < kb0 + num_kb} (a·bᵀ)_kb · a_s[:, kb] · b_s[:, kb]``.

    a_desc / b_desc: tensor descriptors (``tl.make_tensor_descriptor``) with blocks (BLOCK_M,
    SCALE_BLOCK) / (BLOCK_N, SCALE_BLOCK), read from rows ``a_row`` / ``b_row``; as_ptrs:
    (BLOCK_M,) pointers to the tile's rows of a_s (in bounds); bs_ptrs: the b_s row of the tile's
    B-row block repeated (BLOCK_M,) times when BLOCK_N <= SCALE_BLOCK (a vector load, which the
    pipeliner takes and a scalar one it does not), else (BLOCK_N,) pointers to each column's b_s
    row; kb0 >= 0 the first K block (a literal 0 where a caller takes the whole K), num_kb >= 0.
    An odd num_kb also loads block kb0 + num_kb in the pipelined schedule (promoted with scale 0):
    it must lie past K, where TMA zero-fills it, so a range that ends before K has an even length.
    STAGES: the software pipeline's depth, named on the loop (``num_stages`` of the config): with
    it the pipeliner also takes the scale loads, which feed no dot operand.
    SCALE_TMA (warp-specialised schedule and BLOCK_N <= SCALE_BLOCK, one weight scale per tile and
    K block; else ignored, and the descriptors may be None): the scales through as_desc (rows: K
    blocks from ``as_kb0``, columns: M from ``as_m``, block (1, BLOCK_M)) and bs_desc (row
    ``bs_row``, columns: K blocks, block (1, 4)) instead of as_ptrs / bs_ptrs. The kernels make
    the descriptors under the same condition.
    B_ROW_SCALES (the wgrad; default False: b_s per B×B block of b, as above): one b scale per row
    of b and K block, so the promotion is ``p · (a_s[:, None] · b_s[None, :])`` whatever BLOCK_N.
    Both schedules then read the scales through descriptors (SCALE_TMA must be true; as_ptrs,
    bs_ptrs and the strides are not read): as_desc as above, bs_desc holds b_s as (rows of b, K
    blocks) with block (BLOCK_N, 4), read at row ``bs_row`` and the 16-byte aligned column
    ``kb // 4 * 4`` (TMA's least box width; the warp-specialised schedule's data partition cannot
    take the column's selection on a's scales, whose rows it splits over the math warpgroups,
    hence a's transposed view). In the pipelined schedule each block's scales are read at the
    promotion that uses them, so one block's column scales are live at a time.
    acc: a (BLOCK_M, BLOCK_N) float32 tile the blocks are added to, in K order (default: zeros;
    the grouped wgrad passes the sum of its leading edge block, so that it adds in token order).
    """
    if acc is None:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if B_ROW_SCALES:
        tl.static_assert(SCALE_TMA, "B_ROW_SCALES reads the scales through descriptors")
    if WARP_SPECIALIZE and B_ROW_SCALES:
        for kb in tl.range(kb0, kb0 + num_kb, warp_specialize=True):
            a = a_desc.load([a_row, kb * SCALE_BLOCK])
            b = b_desc.load([b_row, kb * SCALE_BLOCK])
            acc += row_promoted(tl.dot(a, b.T), as_desc, bs_desc, as_kb0, as_m, bs_row, kb, True)
    elif WARP_SPECIALIZE and SCALE_TMA and BLOCK_N <= SCALE_BLOCK:
        for kb in tl.range(kb0, kb0 + num_kb, warp_specialize=True):
            a = a_desc.load([a_row, kb * SCALE_BLOCK])
            b = b_desc.load([b_row, kb * SCALE_BLOCK])
            a_s = tl.trans(as_desc.load([as_kb0 + kb, as_m]))  # (BLOCK_M, 1)
            b4 = bs_desc.load([bs_row, kb // 4 * 4])  # (1, 4) from a 16-byte aligned column
            b_s = tl.sum(tl.where(tl.arange(0, 4)[None, :] == kb % 4, b4, 0.0), axis=1, keep_dims=True)  # (1, 1)
            acc += tl.dot(a, b.T) * (a_s * b_s)
    elif WARP_SPECIALIZE:
        s_next = _block_scale(as_ptrs, bs_ptrs, kb0, num_kb > 0, stride_ask, stride_bsk, BLOCK_N, SCALE_BLOCK)
        for kb in tl.range(kb0, kb0 + num_kb, warp_specialize=True):
            s = s_next  # loaded one block ahead: its latency hides behind this block's wgmma
            s_next = _block_scale(as_ptrs, bs_ptrs, kb + 1, kb + 1 < kb0 + num_kb, stride_ask, stride_bsk,
                                  BLOCK_N, SCALE_BLOCK)
            a = a_desc.load([a_row, kb * SCALE_BLOCK])
            b = b_desc.load([b_row, kb * SCALE_BLOCK])
            acc += tl.dot(a, b.T) * s
    else:
        # p1: the odd block of the previous pair, still in flight when the loop body ends.
        p1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in tl.range(kb0, kb0 + num_kb, 2, num_stages=STAGES):
            if not B_ROW_SCALES:
                s_prev = _block_scale(as_ptrs, bs_ptrs, kb - 1, kb > kb0, stride_ask, stride_bsk, BLOCK_N,
                                      SCALE_BLOCK)
                s0 = _block_scale(as_ptrs, bs_ptrs, kb, True, stride_ask, stride_bsk, BLOCK_N, SCALE_BLOCK)
            a0 = a_desc.load([a_row, kb * SCALE_BLOCK])
            b0 = b_desc.load([b_row, kb * SCALE_BLOCK])
            a1 = a_desc.load([a_row, (kb + 1) * SCALE_BLOCK])  # past K (odd num_kb): zeros
            b1 = b_desc.load([b_row, (kb + 1) * SCALE_BLOCK])
            p0 = tl.dot(a0, b0.T)  # waited for at once, with the previous p1
            if B_ROW_SCALES and BLOCK_N <= 64:  # both promotions while p1 runs: four tiles live
                q = p1
                p1 = tl.dot(a1, b1.T)
                acc += row_promoted(q, as_desc, bs_desc, as_kb0, as_m, bs_row, kb - 1, kb > kb0)
                acc += row_promoted(p0, as_desc, bs_desc, as_kb0, as_m, bs_row, kb, True)
            elif B_ROW_SCALES:  # wider: p1's promotion before the next issue, three tiles live
                acc += row_promoted(p1, as_desc, bs_desc, as_kb0, as_m, bs_row, kb - 1, kb > kb0)
                p1 = tl.dot(a1, b1.T)
                acc += row_promoted(p0, as_desc, bs_desc, as_kb0, as_m, bs_row, kb, True)
            else:
                acc += p1 * s_prev
                p1 = tl.dot(a1, b1.T)  # left in flight ...
                acc += p0 * s0
        # The block the final p1 holds (past K when num_kb is odd: zeros; none, kb0, when num_kb = 0).
        last = kb0 + tl.maximum((num_kb + 1) // 2 * 2 - 1, 0)
        in_range = last < kb0 + num_kb
        if B_ROW_SCALES:
            acc += row_promoted(p1, as_desc, bs_desc, as_kb0, as_m, bs_row, last, in_range)
        else:
            acc += p1 * _block_scale(as_ptrs, bs_ptrs, last, in_range, stride_ask, stride_bsk, BLOCK_N, SCALE_BLOCK)
    return acc


# ----------------------------------------------------------------------------------------------
# Host side: the path rule, device facts
# ----------------------------------------------------------------------------------------------

#: The scale block the Hopper kernels take (DeepSeek's; their configs are sized for it).
HOPPER_BLOCK = 128


def tma_ready(t: torch.Tensor | None) -> bool:
    """Can a tensor descriptor read this 2-D tensor (``_common.tma_operand_ok``, no empty dim)?"""
    return t is not None and t.ndim == 2 and t.numel() > 0 and tma_operand_ok(t)


def merged_rows(t: torch.Tensor) -> torch.Tensor | None:
    """A 3-D tensor's first two dims merged into one (a view), or None where its strides do not
    allow a view; a 2-D tensor as it is."""
    if t.ndim == 2:
        return t
    if t.ndim == 3 and t.stride(0) == t.shape[1] * t.stride(1):
        return t.as_strided((t.shape[0] * t.shape[1], t.shape[2]), (t.stride(1), t.stride(2)))
    return None


def scale_tma(a_scales_t: torch.Tensor | None, b_scales: torch.Tensor | None) -> bool:
    """Can the warp-specialised schedule read the scales through descriptors (``SCALE_TMA``)?
    ``a_scales_t``: the activation scales as (K blocks, rows), rows contiguous (the transposed
    view of column-major scales); ``b_scales``: the weight scales as (N blocks, K blocks), K
    blocks contiguous; both :func:`tma_ready` (None: no such view); ``MOELA_SCALE_TMA`` not 0."""
    return knobs.get("MOELA_SCALE_TMA") != "0" and tma_ready(a_scales_t) and tma_ready(b_scales)


def fp8_path(capability: tuple[int, int], block: int, *tma_operands: torch.Tensor | None) -> str:
    """The FP8 GEMM kernels' one path rule: ``"tma"`` (the Hopper kernels: tensor descriptors,
    persistent tiles, wgmma) when the device has TMA (compute capability >= 9.0; the interpreter
    counts as 9.0) and ``MOELA_TMA`` is not ``0``, the scale block is ``HOPPER_BLOCK`` (128) and
    every operand those kernels read through descriptors (the e4m3 activations and weights as
    2-D views, ``None`` where no 2-D view exists) satisfies :func:`tma_ready`; otherwise
    ``"pointer"`` (the pointer-based kernels: Ada's sm_89, other scale blocks, odd strides or
    alignment, K = 0). Scales and outputs go through pointers on both paths: any strides.
    ``capability`` is an input so that tests can run either path anywhere.
    """
    if knobs.get("MOELA_TMA") == "0" or tuple(capability) < HOPPER or block != HOPPER_BLOCK:
        return "pointer"
    return "tma" if all(tma_ready(t) for t in tma_operands) else "pointer"


def ranking_sms(device: torch.device) -> int:
    """The SM count the pruners rank configs for: the GPU's (``_common.num_sms``), the
    interpreter's few programs, or ``HOPPER_SMS`` for tensors no kernel will run on (meta or CPU
    tensors outside the interpreter: a compile-only audit)."""
    if device.type == "cuda" or knobs.interpret():
        return num_sms(device)
    return HOPPER_SMS


# ----------------------------------------------------------------------------------------------
# Configs of the Hopper kernels: smem, the wave model that orders them, the pruner
# ----------------------------------------------------------------------------------------------

#: FLOPs an SM's tensor cores do in the time it reads one operand byte (H100/H200 FP8: ~15 TFLOP/s
#: per SM against ~100 GB/s of L2 per SM): the wave model's exchange rate between MMA and bytes.
FLOP_PER_BYTE = 150
#: How many configs the pruner hands the autotuner (the first is what MOELA_AUTOTUNE=0 runs).
KEEP_CONFIGS = 4
#: The most programs one tile's K may be split over (``SPLIT_K``).
MAX_SPLIT_K = 16


def tma_config(bm: int, bn: int, warps: int, stages: int, ws: bool = False, group_m: int = 8,
               split_k: int = 1) -> triton.Config:
    """A Hopper config; ``ws``: the warp-specialised schedule (num_warps=4, BLOCK_M=128);
    ``split_k`` > 1: K split over that many programs per tile (``SPLIT_K``, a kernel that takes it:
    ``fp8_gemm``; left out at 1, which :func:`hopper_tuner` completes where the kernel has it)."""
    kwargs = {"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": group_m, "WARP_SPECIALIZE": ws, "STAGES": stages}
    if split_k != 1:
        kwargs["SPLIT_K"] = split_k
    return triton.Config(kwargs, num_warps=warps, num_stages=stages)


def split_chunk(num_kb: int, split_k: int) -> int:
    """K blocks per split: ``cdiv(num_kb, split_k)`` rounded up to even (the pipelined loop goes in
    pairs, and only the last split may end on an odd block: K's end, which TMA zero-fills), so the
    last splits may get fewer blocks or none. The kernels compute the same in ``tl``."""
    per_split = -(-num_kb // split_k)
    return per_split + per_split % 2


def tma_smem(config: triton.Config, block: int) -> int:
    """Shared memory a config takes (bytes): its pipeline buffers (two K blocks per stage without
    warp specialisation) and the epilogue's layout conversion."""
    k = config.kwargs
    per_stage = (k["BLOCK_M"] + k["BLOCK_N"]) * block * (1 if k["WARP_SPECIALIZE"] else 2)
    return config.num_stages * per_stage + k["BLOCK_M"] * k["BLOCK_N"]


def tma_config_fits(config: triton.Config, block: int, budget: int) -> bool:
    """Within the shared-memory budget, and warp specialisation only where Triton 3.6 lowers it
    well: num_warps=4 and 128-row tiles (two math warpgroups of 64 rows; 64-row tiles would
    make both warpgroups compute the same rows), at most one scale block of columns (one weight
    scale per K block: what the descriptor-fed scales take), and never with split-K (``SPLIT_K``
    from 1 to ``MAX_SPLIT_K``; splits take the pipelined schedule)."""
    k = config.kwargs
    split = k.get("SPLIT_K", 1)
    if not 1 <= split <= MAX_SPLIT_K or (split > 1 and k["WARP_SPECIALIZE"]):
        return False
    if k["WARP_SPECIALIZE"] and (config.num_warps != 4 or k["BLOCK_M"] != 128 or k["BLOCK_N"] > block):
        return False
    return tma_smem(config, block) <= budget


def wave_cost(bm: int, bn: int, tiles: int, rows: int, sms: int, split_k: int = 1, num_kb: int = 1,
              block: int = HOPPER_BLOCK) -> float:
    """The wave model: ``ceil(tiles / sms)`` rounds of one tile per SM, each costing its MMA work
    (``2·bm·bn`` FLOP per K element, at ``FLOP_PER_BYTE``) plus its operand bytes (``rows`` of a
    that exist, ``bn`` of b per K element). Relative units (per K element of the whole K); ranks
    configs, nothing more.

    Split-K (``split_k`` > 1, K = ``num_kb`` blocks of ``block``): ``tiles · split_k`` units, each
    doing its :func:`split_chunk` of the K blocks and writing its float32 partial tile (``4·rows·bn``
    bytes), in ``ceil(units / sms)`` rounds; then the last unit of each tile reads the other
    ``split_k - 1`` partials. Fewer, wider tiles read a's rows fewer times: what split-K buys.
    """
    per_k = 2 * bm * bn / FLOP_PER_BYTE + rows + bn
    if split_k == 1:
        return -(-tiles // sms) * per_k
    partial = 4 * rows * bn / (num_kb * block)
    unit = per_k * split_chunk(num_kb, split_k) / num_kb + partial
    return -(-(tiles * split_k) // sms) * unit + (split_k - 1) * partial


def tma_pruner(tiles_of, budget: int, tensor: str, keep: int = KEEP_CONFIGS):
    """early_config_prune for a Hopper kernel: configs that fit (:func:`tma_config_fits`),
    ordered by :func:`wave_cost` (stable: ties keep the list's order), the best ``keep``.

    ``tiles_of(nargs, bm, bn) -> (tiles, rows per tile)`` says how the op tiles its problem;
    the tensor argument ``tensor`` gives the device (its SM count). A config with ``SPLIT_K`` > 1
    is costed as split-K over the problem's ``K`` (an argument of the kernel).
    """

    def prune(configs: list[triton.Config], nargs: dict, **kwargs) -> list[triton.Config]:
        block = kwargs.get("SCALE_BLOCK", nargs.get("SCALE_BLOCK"))
        sms = ranking_sms(nargs[tensor].device)
        fits = [c for c in configs if tma_config_fits(c, block, budget)] or configs[:1]

        def cost(c: triton.Config) -> float:
            bm, bn, split = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs.get("SPLIT_K", 1)
            tiles, rows = tiles_of(nargs, bm, bn)
            if split == 1:
                return wave_cost(bm, bn, max(tiles, 1), rows, sms)
            return wave_cost(bm, bn, max(tiles, 1), rows, sms, split, max(nargs["K"] // block, 1), block)

        return sorted(fits, key=cost)[:keep]

    return prune


def hopper_tuner(tuner):
    """An autotuner of a Hopper kernel with its configs completed in place: GROUP_M (8),
    WARP_SPECIALIZE (False), STAGES (num_stages) and, where the kernel takes it, SPLIT_K (1)
    where a config does not name them (one pinned through the environment names only what it
    sets)."""
    split = "SPLIT_K" in tuner.arg_names
    for c in tuner.configs:
        c.kwargs.setdefault("GROUP_M", 8)
        c.kwargs.setdefault("WARP_SPECIALIZE", False)
        c.kwargs.setdefault("STAGES", c.num_stages)
        if split:
            c.kwargs.setdefault("SPLIT_K", 1)
    return tuner


#: The keys an explicit config of a Hopper kernel may name, and those it must name.
HOPPER_CONFIG_KEYS = ({"BLOCK_M", "BLOCK_N", "GROUP_M", "WARP_SPECIALIZE", "STAGES", "num_warps", "num_stages"},
                      {"BLOCK_M", "BLOCK_N"})


def check_config_keys(config: dict, keys: tuple[set, set], op: str, kernel: str) -> dict:
    """``config`` (a dict) as a dict when it names only keys of ``keys[0]`` and all of ``keys[1]``;
    else ValueError naming the op's ``kernel`` ("Hopper", "pointer"), the keys and what is off."""
    allowed, required = keys
    unknown, missing = sorted(set(config) - allowed), sorted(required - set(config))
    if unknown or missing:
        raise ValueError(f"config: the {kernel} {op} kernel (the one fp8_mainloop.fp8_path picks for these "
                         f"operands) takes {sorted(allowed)}, {sorted(required)} required; got {dict(config)!r} "
                         f"(unknown: {unknown}, missing: {missing})")
    return dict(config)


def hopper_meta(config: dict, split_k: bool = False) -> dict:
    """An explicit ``config=`` dict completed like :func:`hopper_tuner` completes configs;
    ``split_k``: the kernel takes SPLIT_K (completed to 1; outside 1 .. ``MAX_SPLIT_K``, or above 1
    with warp specialisation, raises ValueError)."""
    meta = {"GROUP_M": 8, "WARP_SPECIALIZE": False, "STAGES": config.get("num_stages", 3), **config}
    if split_k:
        meta.setdefault("SPLIT_K", 1)
        if not 1 <= meta["SPLIT_K"] <= MAX_SPLIT_K or (meta["SPLIT_K"] > 1 and meta["WARP_SPECIALIZE"]):
            raise ValueError(f"config: SPLIT_K takes 1 to {MAX_SPLIT_K}, and > 1 only without WARP_SPECIALIZE "
                             f"(the pipelined schedule), got SPLIT_K={meta['SPLIT_K']!r}, "
                             f"WARP_SPECIALIZE={meta['WARP_SPECIALIZE']!r}")
    return meta
