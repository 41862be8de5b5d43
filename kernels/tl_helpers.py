"""Triton helpers that several kernel files share (device functions and their host-side twins).

- arithmetic as torch's CUDA kernels do it: :func:`exp` (libdevice on a GPU, float64 then
  rounded under the interpreter), :func:`div` (IEEE division; Triton's float32 ``/`` is
  approximate on a GPU);
- DeepSeek's FP8 quantization math (``moela.reference.fp8``), bit for bit: :func:`abs_bits`,
  :func:`ue8m0_ceil`, :func:`block_scale`, :func:`saturate_to_fp8`;
- GEMM tiling: :func:`grouped_tile_order` (the GROUP_M L2 swizzle),
  :func:`fp8_block_scaled_tile` (the per-128 promoted FP8 main loop),
  :func:`fp8_scaled_range_tile` (the training GEMMs' main loop: a reduction range with partial
  blocks, per-row or per-block scales of the second operand) and the grouped GEMMs'
  bounds-safe reading of ``offsets``: :func:`group_bounds`, :func:`group_rows`,
  :func:`locate_m_tile`, and two lookups with loads and reductions only (what warp-specialised
  loops take): :func:`locate_m_tile_by_chunks` (the offsets read in chunks) and
  :func:`scheduled_m_tile` (the table of ``kernels.group_schedule``);
- host side: :func:`dot_precision` (torch's TF32 setting for float32 dots),
  :data:`SMEM_BUDGET`, what a config's pipeline may take of Hopper's shared memory, and
  :func:`fp8_train_block`, the scale blocks the FP8 training GEMMs take.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

__all__ = [
    "exp", "div", "abs_bits", "ue8m0_ceil", "block_scale", "saturate_to_fp8", "grouped_tile_order",
    "fp8_block_scaled_tile", "fp8_scaled_range_tile", "group_bounds", "group_rows", "locate_m_tile",
    "locate_m_tile_by_chunks", "scheduled_m_tile", "schedule_row", "dot_precision", "SMEM_BUDGET", "SCHEDULE_BLOCK_M",
    "FP8_TRAIN_BLOCKS", "fp8_train_block",
]

#: Shared memory a config's pipeline may take (H100/H200: 227 KB per block, minus some slack).
SMEM_BUDGET = 220 * 1024

#: The M-tile heights ``kernels.group_schedule`` counts tiles for (one table row each).
SCHEDULE_BLOCK_M = (16, 32, 64, 128, 256)


@triton.jit
def exp(x, PRECISE: tl.constexpr):
    """exp as torch's kernels compute it: libdevice on a GPU; float64 then rounded in the interpreter."""
    if PRECISE:
        return libdevice.exp(x)
    elif x.dtype == tl.float64:
        return tl.exp(x)
    else:
        return tl.exp(x.to(tl.float64)).to(x.dtype)


@triton.jit
def div(a, b, IS_F64: tl.constexpr):
    """IEEE division (Triton's float32 ``/`` is approximate on a GPU; float64's is IEEE)."""
    if IS_F64:
        return a / b
    else:
        return tl.math.div_rn(a, b)


@triton.jit
def abs_bits(x):
    """|x| as int32 bits: for non-negative floats the integer order is the float order, and every
    NaN (sign cleared) sorts above inf, so an integer max of these is a NaN-propagating amax (a
    GPU's float max drops NaN; a custom-combine tl.reduce would be slow in the interpreter)."""
    return tl.abs(x).to(tl.int32, bitcast=True)


@triton.jit
def ue8m0_ceil(scale):
    """``2**ceil(log2(scale))`` exactly (``reference.fp8.block_scale``), in integer ops so that a GPU
    (whose log2 is approximate) computes the same bits: a positive normal float32 is its own power
    of two when its mantissa bits are zero, else the exponent goes up by one. inf and NaN pass
    through; an exponent that reaches 255 gives inf, like exp2(128).
    """
    bits = scale.to(tl.int32, bitcast=True)
    expo = (bits >> 23) & 0xFF
    up = ((bits & 0x7FFFFF) != 0).to(tl.int32)
    rounded = ((expo + up) << 23).to(tl.float32, bitcast=True)
    return tl.where(expo == 0xFF, scale, rounded)


@triton.jit
def block_scale(amax, UE8M0: tl.constexpr):
    """float32 scale from a block's float32 amax (``reference.fp8.block_scale``)."""
    floor = tl.full(amax.shape, 1e-4, tl.float32)  # AMAX_FLOOR
    scale = tl.math.div_rn(tl.maximum(amax, floor, propagate_nan=tl.PropagateNan.ALL), 448.0)  # FP8_MAX
    if UE8M0:
        scale = ue8m0_ceil(scale)
    return scale


@triton.jit
def saturate_to_fp8(x, scale, dtype: tl.constexpr):
    """``clamp(x / scale, ±448).to(e4m3)``: IEEE division, NaN kept through the clamp."""
    y = tl.math.div_rn(x, scale)
    y = tl.clamp(y, -448.0, 448.0, propagate_nan=tl.PropagateNan.ALL)
    return y.to(dtype)


@triton.jit
def grouped_tile_order(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """pid -> (pid_m, pid_n), walking GROUP_M rows of tiles column by column (L2 reuse)."""
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_m
    pid_n = (pid % width) // group_m
    return pid_m, pid_n


@triton.jit
def fp8_block_scaled_tile(
    a_ptr, as_ptr, b_ptr, bs_ptr,
    rows, cols, n_start, num_kb,
    stride_am, stride_ak, stride_asm, stride_ask,
    stride_bn, stride_bk, stride_bsn, stride_bsk,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
):
    """The pointer-based FP8 main loop: a (BLOCK_M, BLOCK_N) float32 tile of
    ``Σ_kb (a[rows, kb] · b[cols, kb]ᵀ) · a_s[rows, kb] · b_s[cols // BLOCK_K, kb]``.

    rows / cols: in-bounds int64 indices (already clamped); n_start: the tile's first column
    (a multiple of BLOCK_N). BLOCK_K is the scale block; STAGES the pipeline's depth (the
    config's ``num_stages``), named on the loop so that the software pipeliner also takes the
    scale loads, which feed no dot operand. Every load is addressed from the loop index and is a
    vector (a tile inside one B-row block of b reads its one b scale as a BLOCK_M-vector of equal
    addresses): all become cp.async, no synchronous global load stays in the loop.
    """
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + cols[None, :] * stride_bn
    as_ptrs = as_ptr + rows * stride_asm
    if BLOCK_N <= BLOCK_K:  # the tile lies inside one B-row block of b: one scale per K block
        bs_ptrs = bs_ptr + (n_start // BLOCK_K) * stride_bsn + rows * 0
    else:
        bs_ptrs = bs_ptr + (cols // BLOCK_K) * stride_bsn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in tl.range(0, num_kb, num_stages=STAGES):
        a = tl.load(a_ptrs + kb * (BLOCK_K * stride_ak))
        b = tl.load(b_ptrs + kb * (BLOCK_K * stride_bk))
        a_s = tl.load(as_ptrs + kb * stride_ask)
        b_s = tl.load(bs_ptrs + kb * stride_bsk)
        partial = tl.dot(a, b)  # this K block, fresh float32 (the promotion boundary)
        if BLOCK_N <= BLOCK_K:
            acc += partial * (a_s * b_s)[:, None]
        else:
            acc += partial * (a_s[:, None] * b_s[None, :])
    return acc


@triton.jit
def _fp8_scaled_block(
    a_ptr, as_ptrs, b_ptr, bs_ptrs, rows, cols, offs_r, rb, lo, hi,
    stride_am, stride_ar, stride_asr, stride_bn, stride_br, stride_bsr,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, ROW_VECTOR: tl.constexpr, MASKED: tl.constexpr,
):
    """One promoted block of :func:`fp8_scaled_range_tile`: the float32 product of reduction block
    ``rb`` (only r in [lo, hi) when MASKED), scaled by its a and b scales."""
    r = offs_r + rb * BLOCK_R  # rb · BLOCK_R < the reduction length: fits int32
    a_ptrs = a_ptr + rows[:, None] * stride_am + r[None, :] * stride_ar
    b_ptrs = b_ptr + r[:, None] * stride_br + cols[None, :] * stride_bn
    if MASKED:
        inside = (r >= lo) & (r < hi)
        a = tl.load(a_ptrs, mask=inside[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=inside[:, None], other=0.0)
    else:
        a = tl.load(a_ptrs)
        b = tl.load(b_ptrs)
    a_s = tl.load(as_ptrs + rb * stride_asr)
    b_s = tl.load(bs_ptrs + rb * stride_bsr)
    partial = tl.dot(a, b)  # this block, fresh float32 (the promotion boundary)
    if ROW_VECTOR:
        return (partial * a_s[:, None]) * b_s[None, :]
    else:
        return partial * (a_s * b_s)[:, None]


@triton.jit
def fp8_scaled_range_tile(
    a_ptr, as_ptr, b_ptr, bs_ptr,
    rows, cols, n_start, red_start, red_end,
    stride_am, stride_ar, stride_asm, stride_asr,
    stride_bn, stride_br, stride_bsn, stride_bsr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    B_ROW_SCALES: tl.constexpr, EVEN: tl.constexpr, STAGES: tl.constexpr,
):
    """The FP8 training GEMMs' main loop: a (BLOCK_M, BLOCK_N) float32 tile of
    ``Σ_rb promote(Σ_{r ∈ rb ∩ [red_start, red_end)} a[rows, r] · b[cols, r]) · a_s[rows, rb] · b_s[·, rb]``.

    The reduction index r runs over [red_start, red_end) (0 <= red_start <= red_end) in the scale
    blocks rb of BLOCK_R (global blocks: rb = r // BLOCK_R), one fresh float32 product per block
    (the promotion), blocks in order. b's scale is ``b_s[cols, rb]`` with B_ROW_SCALES (one per
    row of b: the wgrad's token quantization) and ``b_s[cols // BLOCK_R, rb]`` otherwise (a
    weight's B×B blocks: the dgrad; one per block when BLOCK_N <= BLOCK_R, loaded as a BLOCK_M
    vector of one address, which the pipeliner takes where it leaves a scalar load synchronous).
    The product is scaled as the reference scales it, ``(p · a_s) · b_s``, except the one-scale
    case: ``p · (a_s · b_s)`` (one multiply per element; one rounding apart). rows / cols:
    in-bounds int64 indices (already clamped); n_start: the tile's first column, a multiple of
    BLOCK_N.

    The main loop runs over the blocks that lie wholly inside the range, without masks, its depth
    ``STAGES`` named on the loop so that the scale loads (which feed no dot operand) are pipelined
    with the tiles (``cp.async``). EVEN: the range ends at block edges (the dense GEMMs' full
    blocks); otherwise the partial first and last blocks (a group's edges, a ragged end) are done
    before and after it with masked loads, tokens outside the range as zeros.
    """
    offs_r = tl.arange(0, BLOCK_R).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    as_ptrs = as_ptr + rows * stride_asm
    if B_ROW_SCALES:
        bs_ptrs = bs_ptr + cols * stride_bsn
    elif BLOCK_N <= BLOCK_R:  # the tile lies inside one block of b's rows: one scale per step
        bs_ptrs = bs_ptr + (n_start // BLOCK_R) * stride_bsn + tl.zeros([BLOCK_M], tl.int64)
    else:
        bs_ptrs = bs_ptr + (cols // BLOCK_R) * stride_bsn
    ROW_VECTOR: tl.constexpr = B_ROW_SCALES or BLOCK_N > BLOCK_R
    if EVEN:
        first_full, end_full = red_start // BLOCK_R, red_end // BLOCK_R
    else:
        first_full = tl.cdiv(red_start, BLOCK_R)
        end_full = tl.maximum(red_end // BLOCK_R, first_full)
        if red_start % BLOCK_R != 0 and red_start < red_end:  # the partial first block (maybe the only one)
            acc += _fp8_scaled_block(a_ptr, as_ptrs, b_ptr, bs_ptrs, rows, cols, offs_r, red_start // BLOCK_R,
                                     red_start, red_end, stride_am, stride_ar, stride_asr, stride_bn, stride_br,
                                     stride_bsr, BLOCK_N, BLOCK_R, ROW_VECTOR, True)
    for rb in tl.range(first_full, end_full, num_stages=STAGES):
        acc += _fp8_scaled_block(a_ptr, as_ptrs, b_ptr, bs_ptrs, rows, cols, offs_r, rb, red_start, red_end,
                                 stride_am, stride_ar, stride_asr, stride_bn, stride_br, stride_bsr,
                                 BLOCK_N, BLOCK_R, ROW_VECTOR, False)
    if not EVEN:
        last = red_end // BLOCK_R
        if red_end % BLOCK_R != 0 and last * BLOCK_R >= red_start:  # the partial last block, not the first
            acc += _fp8_scaled_block(a_ptr, as_ptrs, b_ptr, bs_ptrs, rows, cols, offs_r, last, red_start, red_end,
                                     stride_am, stride_ar, stride_asr, stride_bn, stride_br, stride_bsr,
                                     BLOCK_N, BLOCK_R, ROW_VECTOR, True)
    return acc


@triton.jit
def _max(a, b):
    return tl.maximum(a, b)


@triton.jit
def _safe_ends(offsets_ptr, idx, valid, fill, M):
    """``cummax(clamp(offsets[idx], 0, M))`` over the vector ``idx`` (``fill`` where not valid):
    clamped in the offsets' own width before narrowing to int32, then made non-decreasing."""
    raw = tl.load(offsets_ptr + idx, mask=valid, other=fill)
    return tl.associative_scan(tl.minimum(tl.maximum(raw, 0), M).to(tl.int32), 0, _max)


@triton.jit
def group_bounds(offsets_ptr, E, M, BLOCK_E: tl.constexpr):
    """(starts, ends) of groups 0..BLOCK_E-1 (BLOCK_E > E): group e < E owns [starts[e], ends[e]),
    group E is the tail [ends[E-1], M), groups past E are empty. Malformed offsets (negative,
    past M, decreasing) never leave [0, M]: a group ending before its predecessor is empty."""
    e = tl.arange(0, BLOCK_E)
    ends = _safe_ends(offsets_ptr, e, e < E, M, M)
    starts = _safe_ends(offsets_ptr, e - 1, (e > 0) & (e <= E), 0, M)
    return starts, tl.where(e <= E, ends, starts)


@triton.jit
def group_rows(offsets_ptr, g, E, M, BLOCK_E: tl.constexpr):
    """Rows [start, end) of group g < E (``group_bounds``' rule)."""
    starts, ends = group_bounds(offsets_ptr, E, M, BLOCK_E)
    mine = tl.arange(0, BLOCK_E) == g
    return tl.sum(tl.where(mine, starts, 0), 0), tl.sum(tl.where(mine, ends, 0), 0)


@triton.jit
def locate_m_tile(offsets_ptr, tile_m, M, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Virtual M-tile -> (group, first row, end row); BLOCK_E > E.

    Tiles are numbered group by group, cdiv(rows, BLOCK_M) each; the tail [offsets[E-1], M)
    comes last as group E. A tile past the last one gets first row == end row == 0. Costs two
    loads of E offsets, three scans and two reductions per program.
    """
    e = tl.arange(0, BLOCK_E)
    starts, ends = group_bounds(offsets_ptr, E, M, BLOCK_E)
    tiles = (ends - starts + BLOCK_M - 1) // BLOCK_M  # 0 for e > E
    last = tl.cumsum(tiles, 0)  # tiles up to and including group e
    first = last - tiles
    mine = (first <= tile_m) & (tile_m < last)  # true for at most one e
    row_start = starts + (tile_m - first) * BLOCK_M
    # One reduction for both row bounds (each < 2**31): only the owning group is non-zero.
    rows = tl.sum(tl.where(mine, (row_start.to(tl.int64) << 32) | ends.to(tl.int64), 0), 0)
    group = tl.sum(tl.where(mine, e, 0), 0)
    return group, (rows >> 32).to(tl.int32), rows.to(tl.int32)


@triton.jit
def locate_m_tile_by_chunks(offsets_ptr, tile_m, M, E, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr,
                            ALIGN: tl.constexpr = 1):
    """:func:`locate_m_tile` without scans: (group, first row, end row, the group's first row),
    the same rule for the offsets (clamped into [0, M] in their own width, then a running max;
    the tail [ends[E-1], M) is group E; a tile past the last gets 0, 0, 0).

    ALIGN > 1: a group's tiles start at its first row rounded down to a multiple of ALIGN (the
    first tile then also holds up to ALIGN - 1 rows of the group before, which the caller must
    not store: rows below the group's first row), ceil((end - aligned start) / BLOCK_M) tiles per
    non-empty group, none per empty one: at most min(cdiv(M + (E+1)·(ALIGN-1), BLOCK_M) + E, M)
    tiles in all (each holds a row of its own group).

    Walks the E + 1 groups CHUNK at a time, carrying the running max of the ends and the tiles
    before the chunk; inside a chunk the exclusive running max and the inclusive tile sum are
    (CHUNK, CHUNK) triangular reductions. For kernels where ``tt.scan`` cannot go (Triton 3.6's
    Hopper warp specialisation rejects it).
    """
    i = tl.arange(0, CHUNK)
    before = i[None, :] < i[:, None]  # [row i, column j]: j < i
    upto = i[None, :] <= i[:, None]
    prev_end = M * 0  # running max of the clamped ends before the chunk (int32)
    tiles_before = M * 0
    found = (M * 0).to(tl.int64)  # (first row << 32) | end row of the owning group, 0 if none
    group = M * 0
    group_start = M * 0
    for c in range(0, tl.cdiv(E + 1, CHUNK)):
        g = c * CHUNK + i
        raw = tl.load(offsets_ptr + g, mask=g < E, other=M)  # the tail (g == E) and past it end at M
        ends_in = tl.minimum(tl.maximum(raw, 0), M).to(tl.int32)
        starts = tl.maximum(tl.max(tl.where(before, ends_in[None, :], 0), axis=1), prev_end)
        ends = tl.maximum(starts, ends_in)
        tile_starts = starts // ALIGN * ALIGN
        tiles = tl.where(ends > starts, (ends - tile_starts + BLOCK_M - 1) // BLOCK_M, 0)
        last = tiles_before + tl.sum(tl.where(upto, tiles[None, :], 0), axis=1)
        first = last - tiles
        mine = (first <= tile_m) & (tile_m < last)  # true for at most one group overall
        row_start = tile_starts + (tile_m - first) * BLOCK_M
        found += tl.sum(tl.where(mine, (row_start.to(tl.int64) << 32) | ends.to(tl.int64), 0), 0)
        group_start += tl.sum(tl.where(mine, starts, 0), 0)
        group += tl.sum(tl.where(mine, g, 0), 0)
        prev_end = tl.max(ends, 0)
        tiles_before += tl.sum(tiles, 0)
    return group, (found >> 32).to(tl.int32), found.to(tl.int32), group_start


@triton.jit
def schedule_row(BLOCK_M: tl.constexpr):
    """The table row (``kernels.group_schedule``) of the tile counts of BLOCK_M-row tiles."""
    tl.static_assert((BLOCK_M == 16) or (BLOCK_M == 32) or (BLOCK_M == 64) or (BLOCK_M == 128)
                     or (BLOCK_M == 256), "the schedule table counts tiles of 16, 32, 64, 128 or 256 rows")
    ROW: tl.constexpr = 2 + (BLOCK_M >= 32) + (BLOCK_M >= 64) + (BLOCK_M >= 128) + (BLOCK_M >= 256)
    return ROW


@triton.jit
def scheduled_m_tile(table_ptr, tile_m, E, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr):
    """:func:`locate_m_tile` read from ``kernels.group_schedule``'s table: M-tile ``tile_m`` ->
    (group, first row, end row); group E is the tail; past the last tile: group E + 1, rows 0, 0.

    Loads and reductions only, CHUNK groups at a time (Triton 3.6's warp specialisation takes
    neither scans nor a reduction over 128 or more lanes whose result both partitions need).
    """
    tile_ends = table_ptr + schedule_row(BLOCK_M) * (E + 1)
    lane = tl.arange(0, CHUNK)
    group = 0
    for g0 in range(0, E + 1, CHUNK):
        ends = tl.load(tile_ends + g0 + lane, mask=g0 + lane <= E, other=2**31 - 1)
        group += tl.sum((ends <= tile_m).to(tl.int32), 0)
    valid = group <= E
    first = tl.load(tile_ends + group - 1, mask=valid & (group > 0), other=0)
    row_start = tl.load(table_ptr + group, mask=valid, other=0) + (tile_m - first) * BLOCK_M
    row_end = tl.load(table_ptr + (E + 1) + group, mask=valid, other=0)
    return group, tl.where(valid, row_start, 0), row_end


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch: TF32 tensor cores only where torch allows them for matmuls.

    Reads ``torch.backends.cuda.matmul.fp32_precision`` (torch >= 2.9): once a user sets TF32
    through that API (or ``torch.backends.fp32_precision``), reading the legacy ``allow_tf32``
    raises a RuntimeError ("mix of the legacy and new APIs"); the new getter also reflects
    settings made through the legacy API and ``set_float32_matmul_precision``.
    """
    if dtype != torch.float32:
        return "tf32"  # Triton's default; ignored for 16-bit inputs
    if _FP32_PRECISION is not None:  # what the property returns, without its Python __getattr__
        tf32 = _FP32_PRECISION("cuda", "matmul") == "tf32"
    else:  # torch < 2.9: only the legacy flag exists
        tf32 = torch.backends.cuda.matmul.allow_tf32
    return "tf32" if tf32 else "ieee"


#: The getter behind ``torch.backends.cuda.matmul.fp32_precision`` (torch >= 2.9), or None.
_FP32_PRECISION = getattr(torch._C, "_get_fp32_precision_getter", None)


#: The scale blocks the FP8 training GEMMs take (their reduction tile is the scale block).
FP8_TRAIN_BLOCKS = (32, 64, 128, 256)


def fp8_train_block(op: str, block: int) -> None:
    """The FP8 training GEMMs' domain: ``block`` in :data:`FP8_TRAIN_BLOCKS` (the reference takes any)."""
    if block not in FP8_TRAIN_BLOCKS:
        raise ValueError(f"block: the Triton {op} kernel takes one of {FP8_TRAIN_BLOCKS} (the reduction tile is "
                         f"the scale block), got {block!r} (moela.reference.{op} takes any)")
