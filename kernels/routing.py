"""The routing plan in Triton: per-expert counts, padded offsets and the slot <-> row maps.

Legend: T tokens, k slots per token, N = T·k flat slots ``s = t·k + j``, E experts,
M = ``max_rows(T, k, E, align)`` rows (known from the shapes: no host sync).

Same plan as ``moela.reference.make_routing``, tensor for tensor: expert e owns rows
``[offsets[e] - padded[e], offsets[e])``; inside it the rows follow the flat slot order
(token, then slot), then ``padded[e] - counts[e]`` padding rows; rows past ``offsets[E-1]``
are padding too (``row_to_token = row_to_slot = -1``). Ids outside ``[0, E)`` are skipped
(``slot_to_row = -1``). Every output element is written exactly once by exactly one program:
no atomics, no fill pass, bitwise deterministic.

Two schedules, picked from the shapes (N <= ``SMALL_MAX_SLOTS``, i.e. decode):

- **one launch** (``_routing_small_kernel``, grid ``(E,)``): program e reads all N ids
  (a few KB, from L2), takes the histogram (``tl.histogram``) and its cumulative sum to find
  its segment, ranks its own slots with ``tl.cumsum`` of ``id == e`` (that cumsum is the
  stable order), writes their rows, its padding rows and a share of the tail rows.
- **three launches** for prefill (grid ``(NB,)`` blocks of ``BLOCK_N`` slots):
  ``_routing_sort_kernel`` sorts each block's keys ``expert · BLOCK_N + local slot``
  (``tl.sort``; keys are unique, so stable) and stores its histogram;
  ``_routing_scan_kernel`` (one program) scans the ``(NB, E)`` counts: offsets, and for every
  (block, expert) the row of its first key minus that key's sorted position;
  ``_routing_scatter_kernel`` turns sorted position p of block b, expert e into row
  ``adj[b, e] + p`` (consecutive rows: coalesced stores) and writes padding and tail rows.

Decode (T <= 256, k = 8, E = 256) is one launch of E programs each reading <= 16 KB of ids
from L2; prefill (T = 16384) sorts 128 blocks of 1024 keys in parallel, scans 128 × 256 counts
in one program and stores rows coalesced: ~1.5 MB of traffic, so the launches dominate. The
kernels take at most ``MAX_EXPERTS`` experts, ``align`` up to ``MAX_ALIGN`` (an expert's padding
rows are one vector of ``align - 1``) and plans of fewer than 2**31 rows (int32).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from moela.reference.dispatch import RoutingPlan, check_make_routing, max_rows, validate_ids

from ._common import autotune, cdiv, kernel_rows, next_power_of_2
from .factory import kernel_op

__all__ = ["make_routing", "launch_make_routing", "SMALL_MAX_SLOTS", "SORT_BLOCK", "MAX_EXPERTS", "MAX_ALIGN"]

#: Plans of at most this many slots (T·k) take the one-launch schedule.
SMALL_MAX_SLOTS = 4096
#: Slots per block of the three-launch schedule (keys sorted by one program).
SORT_BLOCK = 1024
#: Largest expert count the kernels take (histograms of E bins live in registers).
MAX_EXPERTS = 4096
#: Largest ``align`` the kernels take (a program writes an expert's padding rows as one vector).
MAX_ALIGN = 1024
#: Tail rows (past offsets[E-1]) one store covers.
_TAIL_BLOCK = 1024


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------


@triton.jit
def _fill_rows(row_to_token_ptr, row_to_slot_ptr, lo, hi, n, BLOCK: tl.constexpr):
    """Write -1 to rows ``[lo, lo + n) ∩ [lo, hi)`` of both row maps."""
    for r0 in range(0, n, BLOCK):
        r = lo + r0 + tl.arange(0, BLOCK)
        m = (r0 + tl.arange(0, BLOCK) < n) & (r < hi)
        tl.store(row_to_token_ptr + r, tl.full([BLOCK], -1, tl.int32), mask=m)
        tl.store(row_to_slot_ptr + r, tl.full([BLOCK], -1, tl.int32), mask=m)


@triton.jit
def _pad_rows(row_to_token_ptr, row_to_slot_ptr, cnt, end, align, PAD_P: tl.constexpr):
    """Padding rows of one expert: ``[end - padded + cnt, end)``, fewer than ``align``."""
    start = end - (cnt + align - 1) // align * align
    r = start + cnt + tl.arange(0, PAD_P)
    m = r < end
    tl.store(row_to_token_ptr + r, tl.full([PAD_P], -1, tl.int32), mask=m)
    tl.store(row_to_slot_ptr + r, tl.full([PAD_P], -1, tl.int32), mask=m)


@triton.jit
def _routing_small_kernel(
    ids_ptr, counts_ptr, offsets_ptr, slot_to_row_ptr, row_to_token_ptr, row_to_slot_ptr,
    N, K, E, M, align, TAIL,
    BLOCK_N: tl.constexpr, E_P: tl.constexpr, PAD_P: tl.constexpr, HAS_PAD: tl.constexpr,
    BLOCK_TAIL: tl.constexpr,
):
    """The whole plan in one launch. grid: (E,); program e owns expert e.

    Every program histograms all N ids (BLOCK_N >= N) to find its segment; it writes the rows
    of its own slots (ranked by a cumsum of ``id == e``: the (token, slot) order), its count
    and offset, its padding rows and rows ``[total + e·TAIL, total + (e+1)·TAIL)`` of the
    tail. Program 0 also writes ``slot_to_row = -1`` of the skipped slots.
    """
    e = tl.program_id(0)
    s = tl.arange(0, BLOCK_N)
    in_range = s < N
    raw = tl.load(ids_ptr + s, mask=in_range, other=-1)
    valid = in_range & (raw >= 0) & (raw < E)
    eid = tl.where(valid, raw, 0).to(tl.int32)

    counts = tl.histogram(eid, E_P, mask=valid)  # (E_P,) int32, zero past E
    padded = (counts + align - 1) // align * align
    ends = tl.cumsum(padded, 0)
    ex = tl.arange(0, E_P)
    cnt = tl.sum(tl.where(ex == e, counts, 0), 0)
    end = tl.sum(tl.where(ex == e, ends, 0), 0)
    start = end - (cnt + align - 1) // align * align
    total = tl.max(ends, 0)
    tl.store(counts_ptr + e, cnt)
    tl.store(offsets_ptr + e, end)

    mine = valid & (eid == e)
    row = start + tl.cumsum(mine.to(tl.int32), 0) - 1
    tl.store(slot_to_row_ptr + s, row, mask=mine)
    tl.store(row_to_slot_ptr + row, s, mask=mine)
    tl.store(row_to_token_ptr + row, s // K, mask=mine)
    tl.store(slot_to_row_ptr + s, tl.full([BLOCK_N], -1, tl.int32), mask=in_range & ~valid & (e == 0))

    if HAS_PAD:
        _pad_rows(row_to_token_ptr, row_to_slot_ptr, cnt, end, align, PAD_P)
    _fill_rows(row_to_token_ptr, row_to_slot_ptr, total + e * TAIL, M, TAIL, BLOCK_TAIL)


@triton.jit
def _routing_sort_kernel(ids_ptr, keys_ptr, blk_counts_ptr, N, E, BLOCK_N: tl.constexpr, E_P: tl.constexpr):
    """Sort each block's keys ``expert · BLOCK_N + local slot``. grid: (cdiv(N, BLOCK_N),).

    Skipped ids and positions past N take expert E: they sort after every expert. Stores the
    sorted keys (``keys[b·BLOCK_N:]``) and the block's histogram (``blk_counts[b, :E_P]``).
    """
    b = tl.program_id(0)
    p = tl.arange(0, BLOCK_N)
    s = b * BLOCK_N + p
    in_range = s < N
    raw = tl.load(ids_ptr + s, mask=in_range, other=-1)
    valid = in_range & (raw >= 0) & (raw < E)
    eid = tl.where(valid, raw, E).to(tl.int32)
    tl.store(keys_ptr + s, tl.sort(eid * BLOCK_N + p))
    counts = tl.histogram(tl.where(valid, eid, 0), E_P, mask=valid)
    tl.store(blk_counts_ptr + b * E_P + tl.arange(0, E_P), counts)


@triton.jit
def _routing_scan_kernel(
    blk_counts_ptr, adj_ptr, counts_ptr, offsets_ptr, NB, E, align,
    BLOCK_B: tl.constexpr, E_P: tl.constexpr,
):
    """Scan the (NB, E) block counts. grid: (1,).

    Pass 1 sums the blocks (counts, padded offsets); pass 2 walks the blocks in order with a
    running start per expert and stores ``adj[b, e] = start[e] + Σ_{b'<b} c[b', e] -
    Σ_{e'<e} c[b, e']``: the row of block b's first key of expert e minus its sorted position.
    """
    ex = tl.arange(0, E_P)
    bb = tl.arange(0, BLOCK_B)
    totals = tl.zeros([E_P], tl.int32)
    for b0 in range(0, NB, BLOCK_B):
        rows = b0 + bb
        c = tl.load(blk_counts_ptr + rows[:, None] * E_P + ex[None, :], mask=rows[:, None] < NB, other=0)
        totals += tl.sum(c, 0)
    padded = (totals + align - 1) // align * align
    ends = tl.cumsum(padded, 0)
    tl.store(counts_ptr + ex, totals, mask=ex < E)
    tl.store(offsets_ptr + ex, ends, mask=ex < E)
    running = ends - padded
    for b0 in range(0, NB, BLOCK_B):
        rows = b0 + bb
        m = rows[:, None] < NB
        c = tl.load(blk_counts_ptr + rows[:, None] * E_P + ex[None, :], mask=m, other=0)
        before_b = tl.cumsum(c, 0) - c + running[None, :]
        before_e = tl.cumsum(c, 1) - c
        tl.store(adj_ptr + rows[:, None] * E_P + ex[None, :], before_b - before_e, mask=m)
        running += tl.sum(c, 0)


@triton.jit
def _routing_scatter_kernel(
    keys_ptr, adj_ptr, counts_ptr, offsets_ptr, slot_to_row_ptr, row_to_token_ptr, row_to_slot_ptr,
    N, K, E, M, align, NB, TAIL,
    BLOCK_N: tl.constexpr, E_P: tl.constexpr, PAD_P: tl.constexpr, HAS_PAD: tl.constexpr,
    BLOCK_TAIL: tl.constexpr,
):
    """Rows of block b's sorted keys, plus padding and tail rows. grid: (NB,).

    Program b also writes the padding rows of experts b, b + NB, ... and rows
    ``[total + b·TAIL, total + (b+1)·TAIL)`` of the tail.
    """
    b = tl.program_id(0)
    p = tl.arange(0, BLOCK_N)
    key = tl.load(keys_ptr + b * BLOCK_N + p)
    e = key // BLOCK_N
    s = b * BLOCK_N + (key - e * BLOCK_N)
    valid = e < E
    row = tl.load(adj_ptr + b * E_P + e, mask=valid, other=0) + p
    tl.store(slot_to_row_ptr + s, tl.where(valid, row, -1), mask=s < N)
    tl.store(row_to_slot_ptr + row, s, mask=valid)
    tl.store(row_to_token_ptr + row, s // K, mask=valid)

    if HAS_PAD:
        for e0 in range(b, E, NB):
            _pad_rows(row_to_token_ptr, row_to_slot_ptr, tl.load(counts_ptr + e0), tl.load(offsets_ptr + e0),
                      align, PAD_P)
    total = tl.load(offsets_ptr + E - 1)
    _fill_rows(row_to_token_ptr, row_to_slot_ptr, total + b * TAIL, M, TAIL, BLOCK_TAIL)


def _warps(*ws: int) -> list[triton.Config]:
    return [triton.Config({}, num_warps=w) for w in ws]


# Latency-bound kernels: only the warp count is tuned, keyed on the block sizes (never on T).
_small_tuned = autotune("routing_small", _warps(4, 8, 2), key=["BLOCK_N", "E_P"])(
    _routing_small_kernel)
_sort_tuned = autotune("routing_sort", _warps(4, 8), key=["BLOCK_N", "E_P"])(
    _routing_sort_kernel)
_scan_tuned = autotune("routing_scan", _warps(8, 4, 16), key=["BLOCK_B", "E_P"])(
    _routing_scan_kernel)
_scatter_tuned = autotune("routing_scatter", _warps(4, 8), key=["BLOCK_N", "E_P"])(
    _routing_scatter_kernel)


# ----------------------------------------------------------------------------------------
# The op
# ----------------------------------------------------------------------------------------


def _domain(topk_ids, n_experts, align=1, *, validate=False) -> None:
    if n_experts > MAX_EXPERTS:
        raise ValueError(f"n_experts: the Triton make_routing kernels take at most {MAX_EXPERTS} experts "
                         f"(histograms in registers), got {n_experts} (moela.reference.make_routing takes any)")
    if align > MAX_ALIGN:
        raise ValueError(f"align: the Triton make_routing kernels take align up to {MAX_ALIGN} (an expert's padding "
                         f"rows are one vector), got {align} (moela.reference.make_routing takes any)")
    T, k = topk_ids.shape
    kernel_rows("make_routing", "topk_ids", max_rows(T, k, n_experts, align))


@functools.cache
def _pad_consts(align: int) -> dict:
    """The padding constexprs of the plan kernels for ``align`` (the same dict every call)."""
    return dict(PAD_P=next_power_of_2(max(align - 1, 1)), HAS_PAD=align > 1, BLOCK_TAIL=_TAIL_BLOCK)


def launch_make_routing(out, topk_ids: torch.Tensor, n_experts: int, align: int = 1, *,
                        small_max_slots: int = SMALL_MAX_SLOTS, sort_block: int = SORT_BLOCK) -> None:
    """The plan kernels into ``out`` (the five tensors, ``RoutingPlan`` order, contiguous).

    ``small_max_slots`` and ``sort_block`` choose the schedule (tests use them to run the
    three-launch schedule on small inputs); the plan is the same either way.
    """
    if sort_block != SORT_BLOCK and (sort_block != next_power_of_2(sort_block) or not 16 <= sort_block <= SORT_BLOCK):
        raise ValueError(f"sort_block: expected a power of two in [16, {SORT_BLOCK}], got {sort_block}")
    counts, offsets, slot_to_row, row_to_token, row_to_slot = out
    if not (counts.is_contiguous() and offsets.is_contiguous() and slot_to_row.is_contiguous()
            and row_to_token.is_contiguous() and row_to_slot.is_contiguous()):
        raise ValueError("out: expected contiguous plan buffers")
    T, k = topk_ids.shape
    E, N = n_experts, T * k
    M = max_rows(T, k, E, align)
    K = max(k, 1)  # the kernels' token of a slot, s // K (k = 0 has no slot: no division by zero)
    ids = topk_ids.contiguous()
    E_P = next_power_of_2(E)
    pad = _pad_consts(align)

    if N <= small_max_slots:
        _small_tuned[(E,)](
            ids, counts, offsets, slot_to_row, row_to_token, row_to_slot, N, K, E, M, align, cdiv(M, E),
            BLOCK_N=next_power_of_2(N), E_P=E_P, **pad,
        )
    else:
        NB = cdiv(N, sort_block)
        i32 = dict(dtype=torch.int32, device=topk_ids.device)
        keys = torch.empty(NB * sort_block, **i32)
        blk_counts = torch.empty(NB, E_P, **i32)
        adj = torch.empty(NB, E_P, **i32)
        _sort_tuned[(NB,)](ids, keys, blk_counts, N, E, BLOCK_N=sort_block, E_P=E_P)
        block_b = max(1, min(next_power_of_2(NB), 8192 // E_P))
        _scan_tuned[(1,)](blk_counts, adj, counts, offsets, NB, E, align, BLOCK_B=block_b, E_P=E_P)
        _scatter_tuned[(NB,)](
            keys, adj, counts, offsets, slot_to_row, row_to_token, row_to_slot, N, K, E, M, align, NB,
            cdiv(M, NB), BLOCK_N=sort_block, E_P=E_P, **pad,
        )


@kernel_op("make_routing", contract=check_make_routing, domain=_domain, result=RoutingPlan._make)
def make_routing(out, topk_ids: Tensor, n_experts: int, align: int = 1, *, validate: bool = False,
                 config=None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Build the routing plan of ``topk_ids (T, k)`` with Triton kernels, without a host sync.

    Same contract and the same tensors as ``moela.reference.make_routing``.

    Args:
        topk_ids: (T, k) int32/int64 expert ids, on CUDA (or CPU under the interpreter). Ids
            outside ``[0, n_experts)`` (e.g. -1 for remote experts) are skipped.
        n_experts: E, at most ``MAX_EXPERTS``.
        align: pad every expert's segment to a multiple of this many rows (block-aligned GEMMs), at
            most ``MAX_ALIGN``.
        validate: raise ValueError if an id is neither -1 nor in ``[0, n_experts)`` (reads the
            ids: synchronises with the device; off in the fast path).
    Returns:
        ``RoutingPlan`` of int32 tensors: ``tokens_per_expert (E,)``, ``offsets (E,)``,
        ``slot_to_row (T, k)``, ``row_to_token (M,)``, ``row_to_slot (M,)`` with
        ``M = max_rows(T, k, E, align)``.

    Example::

        plan = make_routing(torch.tensor([[1, 0], [1, -1]], device="cuda"), n_experts=3)
        plan.offsets      -> [1, 3, 3]
        plan.slot_to_row  -> [[1, 0], [2, -1]]
        plan.row_to_token -> [0, 0, 1, -1]
    """
    if validate:
        validate_ids(topk_ids, n_experts)
    launch_make_routing(out, topk_ids, n_experts, align, **(config or {}))
