"""Token dispatch: the routing plan, permute (tokens -> expert-sorted rows) and unpermute.

Legend: T tokens, k slots per token, E experts, D hidden dim, M rows after dispatch
(``plan.max_rows``, known from T, k, E and ``align`` alone: no device sync needed).

Layout of the rows: expert e owns rows ``[offsets[e-1], offsets[e])`` (``offsets[-1]`` of
e = -1 is 0). Within an expert, rows are ordered by flat slot ``s = t·k + j``, i.e. by
(token, slot): stable and deterministic. With ``align > 1`` each expert's segment is padded
up to a multiple of ``align`` (for block-aligned GEMMs); padding rows, and rows past
``offsets[E-1]``, have ``row_to_token == -1`` and are zeros after :func:`permute`.

Expert ids outside ``[0, E)`` (e.g. -1 for experts that live on another rank) are skipped:
that slot gets no row (``slot_to_row == -1``) and contributes zero to :func:`unpermute`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._checks import FLOAT_DTYPES, INT_DTYPES, accumulate_dtype, check_positive_int, check_tensor

__all__ = ["RoutingPlan", "max_rows", "make_routing", "permute", "unpermute"]


class RoutingPlan(NamedTuple):
    """Where every (token, slot) goes. All int32, all on the ids' device."""

    tokens_per_expert: torch.Tensor  # (E,) valid slots routed to each expert (before padding)
    offsets: torch.Tensor  # (E,) cumulative row ends of the (padded) expert segments
    slot_to_row: torch.Tensor  # (T, k) row of each (token, slot); -1 if the id was skipped
    row_to_token: torch.Tensor  # (M,) source token of each row; -1 for padding rows
    row_to_slot: torch.Tensor  # (M,) flat slot t·k + j of each row; -1 for padding rows

    @property
    def num_experts(self) -> int:
        return self.offsets.shape[0]

    @property
    def max_rows(self) -> int:
        return self.row_to_token.shape[0]


def max_rows(num_tokens: int, k: int, n_experts: int, align: int = 1) -> int:
    """Upper bound on the rows of a plan: T·k plus the worst-case padding of the non-empty experts."""
    slots = num_tokens * k
    return slots + min(n_experts, slots) * (align - 1)


def make_routing(topk_ids: torch.Tensor, n_experts: int, align: int = 1) -> RoutingPlan:
    """Build the routing plan of ``topk_ids (T, k)`` (int32/int64) for ``n_experts`` experts.

    Example::

        ids = torch.tensor([[1, 0], [1, -1]])      # token 1's second slot is remote
        plan = make_routing(ids, n_experts=3)
        plan.offsets      -> [1, 3, 3]             # expert 0: row 0, expert 1: rows 1-2
        plan.slot_to_row  -> [[1, 0], [2, -1]]
        plan.row_to_token -> [0, 0, 1, -1]
    """
    check_tensor("topk_ids", topk_ids, ndim=2, dtypes=INT_DTYPES)
    check_positive_int("n_experts", n_experts)
    check_positive_int("align", align)
    T, k = topk_ids.shape
    device = topk_ids.device
    ids = topk_ids.reshape(-1).long()  # (T·k,) flat slots s = t·k + j
    valid = (ids >= 0) & (ids < n_experts)
    key = torch.where(valid, ids, n_experts)  # skipped slots sort after every expert

    counts = torch.bincount(key, minlength=n_experts + 1)[:n_experts]  # (E,)
    padded = (counts + align - 1) // align * align
    offsets = torch.cumsum(padded, 0)
    starts = offsets - padded  # first row of each expert
    first_sorted = torch.cumsum(counts, 0) - counts  # first sorted position of each expert

    # Stable sort by expert keeps the (token, slot) order inside each expert.
    order = torch.sort(key, stable=True).indices  # sorted position p -> slot s
    position = torch.empty_like(order)
    position[order] = torch.arange(ids.numel(), device=device)  # slot s -> sorted position p
    e = key.clamp(max=n_experts - 1)
    row = starts[e] + position - first_sorted[e]
    slot_to_row = torch.where(valid, row, -1)

    M = max_rows(T, k, n_experts, align)
    row_to_slot = torch.full((M,), -1, dtype=torch.long, device=device)
    slots = torch.arange(ids.numel(), device=device)
    row_to_slot[slot_to_row[valid]] = slots[valid]
    row_to_token = torch.where(row_to_slot >= 0, row_to_slot // k, -1)
    i32 = torch.int32
    return RoutingPlan(
        tokens_per_expert=counts.to(i32),
        offsets=offsets.to(i32),
        slot_to_row=slot_to_row.view(T, k).to(i32),
        row_to_token=row_to_token.to(i32),
        row_to_slot=row_to_slot.to(i32),
    )


def permute(
    x: torch.Tensor, plan: RoutingPlan, *, fp8: bool = False, block: int = 128, scale_fmt: str | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Gather tokens into expert-sorted rows: ``x (T, D) -> xs (M, D)``; padding rows are 0.

    With ``fp8=True`` the rows come out quantized for the FP8 grouped GEMM:
    ``quant_act(permute(x, plan), block, scale_fmt)`` -> (e4m3 (M, D), scale (M, ceil(D/block))).
    """
    check_tensor("x", x, ndim=2)
    T = plan.slot_to_row.shape[0]
    if x.shape[0] != T:
        raise ValueError(f"x: expected {T} rows (the plan's tokens), got shape {tuple(x.shape)}")
    xs = torch.zeros(plan.max_rows, x.shape[1], dtype=x.dtype, device=x.device)
    rows = plan.row_to_token >= 0
    xs[rows] = x[plan.row_to_token[rows].long()]
    if fp8:
        from .fp8 import quant_act

        return quant_act(xs, block, scale_fmt)
    return xs


def unpermute(ys: torch.Tensor, plan: RoutingPlan, topk_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted combine: ``y[t] = Σ_j w[t, j] · ys[slot_to_row[t, j]]`` over valid slots.

    Args:
        ys: (M, D) expert outputs in row order.
        topk_weights: (T, k) or None (unit weights).
    Returns:
        (T, D) in ys.dtype, accumulated in float32 (float64 for float64), slots in order j = 0..k-1.
    """
    check_tensor("ys", ys, ndim=2, dtypes=FLOAT_DTYPES)
    T, k = plan.slot_to_row.shape
    if ys.shape[0] != plan.max_rows:
        raise ValueError(f"ys: expected {plan.max_rows} rows (plan.max_rows), got shape {tuple(ys.shape)}")
    if topk_weights is not None:
        check_tensor("topk_weights", topk_weights, dtypes=FLOAT_DTYPES, shape=(T, k))
    acc = accumulate_dtype(ys.dtype)
    y = torch.zeros(T, ys.shape[1], dtype=acc, device=ys.device)
    for j in range(k):
        rows = plan.slot_to_row[:, j].long()  # (T,)
        valid = rows >= 0
        contrib = ys[rows.clamp(min=0)].to(acc)
        if topk_weights is not None:
            contrib = contrib * topk_weights[:, j, None].to(acc)
        y += torch.where(valid[:, None], contrib, 0)
    return y.to(ys.dtype)
