"""The tile schedule of the grouped GEMMs, computed on the device from ``offsets`` (no host sync).

Legend: M rows grouped by expert, E experts, ``offsets (E,)`` cumulative row ends. Group g < E
owns rows ``[starts[g], ends[g])``; group E is the tail ``[ends[E-1], M)`` of rows of no group.
The ends follow the grouped GEMMs' bounds-safe rule (``tl_helpers.group_bounds``: offsets clamped
into [0, M] in their own width, then a running max).

``group_schedule(offsets, M)`` writes one small int32 table, ``(2 + len(SCHEDULE_BLOCK_M), E + 1)``:

    row 0       starts[g]                                  g = 0..E
    row 1       ends[g]
    row 2 + i   Σ_{h <= g} cdiv(ends[h] - starts[h], BLOCK_M)   BLOCK_M = SCHEDULE_BLOCK_M[i]

so a kernel finds the group and rows of its t-th M-tile with loads and reductions only
(``tl_helpers.scheduled_m_tile``), and its number of M-tiles is ``table[2 + i, E]``. The
warp-specialised kernels read it: Triton 3.6's warp specialisation rejects scans (``tl.cumsum``)
anywhere in a kernel, so the prefix sums are made here, by one program, before them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import next_power_of_2
from .tl_helpers import SCHEDULE_BLOCK_M, group_bounds

__all__ = ["group_schedule", "SCHEDULE_BLOCK_M"]


@triton.jit(do_not_specialize=["M", "E"])
def _group_schedule_kernel(offsets_ptr, table_ptr, M, E, BLOCK_E: tl.constexpr):
    """grid: (1,). One program reads the E offsets and writes the whole table (BLOCK_E > E)."""
    g = tl.arange(0, BLOCK_E)
    starts, ends = group_bounds(offsets_ptr, E, M, BLOCK_E)
    keep = g <= E
    tl.store(table_ptr + g, starts, mask=keep)
    tl.store(table_ptr + (E + 1) + g, ends, mask=keep)
    for i in tl.static_range(5):  # SCHEDULE_BLOCK_M = 16 << i
        tiles = (ends - starts + ((16 << i) - 1)) >> (4 + i)
        tl.store(table_ptr + (2 + i) * (E + 1) + g, tl.cumsum(tiles, 0), mask=keep)


def group_schedule(offsets: Tensor, num_rows: int) -> Tensor:
    """The schedule table of ``offsets`` (E,) int32/int64 over ``num_rows`` rows (module docstring).

    Returns a new ``(2 + len(SCHEDULE_BLOCK_M), E + 1)`` int32 tensor on offsets' device, filled by
    one single-program launch. Offsets are not checked here (their values are made safe on the
    device); callers check shapes and devices.
    """
    E = offsets.shape[0]
    table = torch.empty(2 + len(SCHEDULE_BLOCK_M), E + 1, dtype=torch.int32, device=offsets.device)
    _group_schedule_kernel[(1,)](offsets.contiguous(), table, num_rows, E, BLOCK_E=next_power_of_2(E + 1))
    return table
