"""The layouts a dispatcher hands to the expert GEMMs: contiguous rows or DeepGEMM's masked form.

Legend: E_l experts on this rank, M rows, D hidden dim, max_m rows per expert in the masked form.

- :class:`ContiguousLayout`: ``xs (M, D)``, expert e owns rows ``[offsets[e-1], offsets[e])``
  (``offsets[-1]`` of e = -1 is 0), as moela's ``grouped_gemm`` reads them; rows past
  ``offsets[E_l-1]`` are padding.
- :class:`MaskedLayout`: ``xs (E_l, max_m, D)``, expert e owns rows ``xs[e, :tokens_per_expert[e]]``;
  the rest of each expert's block is zeros (DeepGEMM's ``m_grouped_*_masked`` and DeepEP's
  low-latency mode). ``max_m`` is known on the host, so nothing reads the counts.

:func:`to_masked` / :func:`from_masked` convert between the two (differentiable, no host sync).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from moela.reference._checks import FLOAT_DTYPES, check_positive_int, check_tensor

__all__ = ["ContiguousLayout", "MaskedLayout", "LAYOUTS", "to_masked", "from_masked"]

LAYOUTS = ("contiguous", "masked")


class ContiguousLayout(NamedTuple):
    """Rows grouped by local expert, one segment each (int32, on the rows' device)."""

    offsets: torch.Tensor  # (E_l,) cumulative row ends, as grouped_gemm takes them
    tokens_per_expert: torch.Tensor  # (E_l,) valid rows of each expert


class MaskedLayout(NamedTuple):
    """One fixed-size block per local expert; only the first ``tokens_per_expert[e]`` rows are valid."""

    tokens_per_expert: torch.Tensor  # (E_l,) int32, DeepGEMM's ``masked_m``


def _pad_row(t: torch.Tensor) -> torch.Tensor:
    """``t (N, D)`` with one zero row appended at index N: where invalid slots read from."""
    return torch.cat([t, t.new_zeros(1, t.shape[1])])


def to_masked(xs: torch.Tensor, layout: ContiguousLayout, max_m: int) -> tuple[torch.Tensor, MaskedLayout]:
    """Contiguous rows ``xs (M, D)`` -> ``(E_l, max_m, D)`` blocks, zeros past each expert's count.

    ``max_m`` must be at least the largest count: rows of an expert beyond ``max_m`` would be
    dropped (dispatchers pass a bound that holds by construction). Segments must be unpadded
    (``align=1`` plans): expert e starts at ``offsets[e] - tokens_per_expert[e]``.
    """
    check_tensor("xs", xs, ndim=2, dtypes=FLOAT_DTYPES)
    check_positive_int("max_m", max_m)
    counts = layout.tokens_per_expert.long()
    starts = layout.offsets.long() - counts
    i = torch.arange(max_m, device=xs.device)
    valid = (i[None, :] < counts[:, None]) & (starts[:, None] + i[None, :] < xs.shape[0])
    rows = torch.where(valid, starts[:, None] + i[None, :], xs.shape[0])  # (E_l, max_m); M: the zero row
    return _pad_row(xs)[rows], MaskedLayout(layout.tokens_per_expert)


def from_masked(ys: torch.Tensor, layout: ContiguousLayout, num_rows: int) -> torch.Tensor:
    """``(E_l, max_m, D)`` blocks -> contiguous rows ``(num_rows, D)``: row r of expert e's segment
    is ``ys[e, r - start_e]``; rows of no expert are zeros, and nothing past an expert's count is
    read (a NaN there never leaks)."""
    check_tensor("ys", ys, ndim=3, dtypes=FLOAT_DTYPES)
    E_l, max_m, D = ys.shape
    if layout.offsets.shape[0] != E_l:
        raise ValueError(f"ys: expected {layout.offsets.shape[0]} expert blocks (one per local expert), "
                         f"got shape {tuple(ys.shape)}")
    offsets = layout.offsets.long()
    r = torch.arange(num_rows, device=ys.device)
    e = torch.searchsorted(offsets, r, right=True).clamp(max=E_l - 1)  # expert whose segment holds r
    i = r - (offsets[e] - layout.tokens_per_expert.long()[e])  # position inside that segment
    valid = (r < offsets[-1]) & (i >= 0) & (i < max_m)
    src = torch.where(valid, e * max_m + i, E_l * max_m)  # E_l·max_m: the zero row
    return _pad_row(ys.reshape(E_l * max_m, D))[src]
