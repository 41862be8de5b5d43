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

A plan is trusted only as far as it is consistent, so a corrupt one gives a documented result
(kernels and references alike), never an out-of-bounds access: row r of :func:`permute` holds
``x[s // k]`` when ``s = row_to_slot[r]`` is a slot in ``[0, T·k)`` whose ``slot_to_row[s]`` is r,
and zeros otherwise; :func:`unpermute` adds slot s's row only when ``slot_to_row[s]`` lies in
``[0, M)``. ``validate=True`` raises on such a plan instead (a host sync): ``validate_plan``.
``check_plan``, ``check_make_routing``, ``check_permute``, ``check_permute_fp8`` and
``check_unpermute`` are the contracts (no values read) the kernels run too.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._checks import (
    FLOAT_DTYPES,
    INT_DTYPES,
    TensorSpec,
    accumulate_dtype,
    check_bool,
    check_has_values,
    check_positive_int,
    check_same_device,
    check_tensor,
)

__all__ = [
    "RoutingPlan", "max_rows", "make_routing", "permute", "unpermute", "check_plan", "validate_plan",
    "validate_ids", "check_make_routing", "check_permute", "check_permute_fp8", "check_unpermute",
]


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


def check_make_routing(topk_ids: object, n_experts: object, align: object = 1, *, validate: object = False
                       ) -> tuple[TensorSpec, ...]:
    """The contract of ``make_routing``: topk_ids (T, k) int32/int64; the specs of the plan's five
    int32 tensors (``RoutingPlan`` order)."""
    check_tensor("topk_ids", topk_ids, ndim=2, dtypes=INT_DTYPES)
    check_positive_int("n_experts", n_experts)
    check_positive_int("align", align)
    check_bool("validate", validate)
    T, k = topk_ids.shape
    M = max_rows(T, k, n_experts, align)
    i32 = torch.int32
    return (TensorSpec((n_experts,), i32), TensorSpec((n_experts,), i32), TensorSpec((T, k), i32),
            TensorSpec((M,), i32), TensorSpec((M,), i32))


def validate_ids(topk_ids: torch.Tensor, n_experts: int) -> None:
    """Raise ValueError unless every id is -1 or in ``[0, n_experts)`` (reads the ids: a sync)."""
    check_has_values("topk_ids", topk_ids, "validate=True")
    bad = (topk_ids < -1) | (topk_ids >= n_experts)
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"topk_ids: expected ids in [0, {n_experts}) or -1, got {int(topk_ids[first])} at {first} "
            f"({int(bad.sum())} such ids)"
        )


def _plan_ok(plan: RoutingPlan, num_tokens: int | None, device: torch.device | None) -> bool:
    """Does ``plan`` pass every check of :func:`check_plan` (which then names what fails)?"""
    counts, offsets, s2r, r2t, r2s = plan
    i32, T = torch.int32, torch.Tensor
    try:
        return (isinstance(counts, T) and isinstance(offsets, T) and isinstance(s2r, T) and isinstance(r2t, T)
                and isinstance(r2s, T) and counts.dtype is i32 and offsets.dtype is i32 and s2r.dtype is i32
                and r2t.dtype is i32 and r2s.dtype is i32 and offsets.ndim == 1 and counts.shape == offsets.shape
                and s2r.ndim == 2 and r2t.ndim == 1 and r2s.shape == r2t.shape
                and (num_tokens is None or s2r.shape[0] == num_tokens)
                and (device is None or counts.device == offsets.device == s2r.device == r2t.device == r2s.device
                     == device))
    except TypeError:  # a Tensor subclass whose comparisons misbehave: let the named checks decide
        return False


def check_plan(plan: object, num_tokens: int | None = None, device: torch.device | None = None) -> RoutingPlan:
    """Check a plan's types, dtypes, shapes and device (no values read: no sync)."""
    if not isinstance(plan, tuple) or len(plan) != 5:
        raise TypeError(f"plan: expected a RoutingPlan, got {type(plan).__name__}")
    if type(plan) is not RoutingPlan:
        plan = RoutingPlan(*plan)
    if _plan_ok(plan, num_tokens, device):  # the common case in one expression; else the named errors
        return plan
    i32 = (torch.int32,)
    E = check_tensor("plan.offsets", plan.offsets, ndim=1, dtypes=i32).shape[0]
    check_tensor("plan.tokens_per_expert", plan.tokens_per_expert, dtypes=i32, shape=(E,))
    check_tensor("plan.slot_to_row", plan.slot_to_row, ndim=2, dtypes=i32)
    M = check_tensor("plan.row_to_token", plan.row_to_token, ndim=1, dtypes=i32).shape[0]
    check_tensor("plan.row_to_slot", plan.row_to_slot, dtypes=i32, shape=(M,))
    T = plan.slot_to_row.shape[0]
    if num_tokens is not None and T != num_tokens:
        raise ValueError(f"plan.slot_to_row: expected {num_tokens} tokens, got shape {tuple(plan.slot_to_row.shape)}")
    for name, t in zip(RoutingPlan._fields, plan, strict=True):
        if device is not None and t.device != device:
            raise ValueError(f"plan.{name}: expected device {device}, got {t.device}")
    return plan


def validate_plan(plan: RoutingPlan) -> None:
    """Check a plan's values (synchronises): ranges, offsets, and that the maps invert each other.

    Raises ValueError naming the first inconsistency found.
    """
    plan = check_plan(plan)
    for name, t in zip(RoutingPlan._fields, plan, strict=True):
        check_has_values(f"plan.{name}", t, "validate=True")
    T, k = plan.slot_to_row.shape
    M, E = plan.max_rows, plan.num_experts
    s2r = plan.slot_to_row.reshape(-1).long()
    r2t, r2s = plan.row_to_token.long(), plan.row_to_slot.long()
    counts, offsets = plan.tokens_per_expert.long(), plan.offsets.long()

    def fail(what: str) -> None:
        raise ValueError(f"plan: {what}")

    if bool(((s2r < -1) | (s2r >= M)).any()):
        fail(f"slot_to_row has values outside [-1, {M})")
    if bool(((r2s < -1) | (r2s >= T * k)).any()) or bool(((r2t < -1) | (r2t >= T)).any()):
        fail(f"row_to_slot / row_to_token have values outside [-1, {T * k}) / [-1, {T})")
    if bool(((r2s >= 0) != (r2t >= 0)).any()) or bool((r2t != torch.where(r2s >= 0, r2s // max(k, 1), -1)).any()):
        fail("row_to_token is not row_to_slot // k on every row")
    valid = s2r >= 0
    slots = torch.arange(T * k, device=s2r.device)
    if bool((r2s[s2r[valid]] != slots[valid]).any()):
        fail("row_to_slot[slot_to_row[s]] != s for some valid slot s")
    if int(valid.sum()) != int((r2s >= 0).sum()):
        fail("the number of rows with a slot differs from the number of valid slots")
    if E and (bool((counts < 0).any()) or bool((offsets.diff() < counts[1:]).any()) or int(offsets[0]) < counts[0]
              or int(offsets[-1]) > M):
        fail(f"offsets are not non-decreasing segment ends of at least tokens_per_expert rows within {M} rows")
    if int(counts.sum()) != int(valid.sum()):
        fail("tokens_per_expert does not sum to the number of valid slots")


def _check_maps(slot_to_row: object, row_to_slot: object, t: torch.Tensor, name: str, rows_are: str
                ) -> tuple[int, int]:
    """The plan's two maps, and ``t``'s rows: the plan's tokens (``rows_are="tokens"``) or rows."""
    check_tensor("slot_to_row", slot_to_row, ndim=2, dtypes=(torch.int32,))
    check_tensor("row_to_slot", row_to_slot, ndim=1, dtypes=(torch.int32,))
    if rows_are == "tokens" and t.shape[0] != slot_to_row.shape[0]:
        raise ValueError(f"{name}: expected {slot_to_row.shape[0]} rows (the plan's tokens), "
                         f"got shape {tuple(t.shape)}")
    if rows_are == "rows" and t.shape[0] != row_to_slot.shape[0]:
        raise ValueError(f"{name}: expected {row_to_slot.shape[0]} rows (plan.max_rows), got shape {tuple(t.shape)}")
    return slot_to_row.shape[1], row_to_slot.shape[0]


def check_permute(x: object, slot_to_row: object, row_to_slot: object) -> TensorSpec:
    """The contract of the ``permute`` op: x (T, D) float, the plan's slot_to_row (T, k) and
    row_to_slot (M,) int32, one device; returns the (M, D) rows' spec."""
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    _, M = _check_maps(slot_to_row, row_to_slot, x, "x", "tokens")
    check_same_device(x=x, slot_to_row=slot_to_row, row_to_slot=row_to_slot)
    return TensorSpec((M, x.shape[1]), x.dtype)


def check_permute_fp8(x: object, slot_to_row: object, row_to_slot: object, block: object = 128,
                      scale_fmt: object = None) -> tuple[TensorSpec, TensorSpec]:
    """The contract of ``permute(..., fp8=True)``: ``check_permute``, then e4m3 rows (M, D) and
    their float32 scales (M, ceil(D/block))."""
    from .fp8 import check_quant_act

    rows = check_permute(x, slot_to_row, row_to_slot)
    return check_quant_act(torch.empty(rows.shape, dtype=x.dtype, device="meta"), block, scale_fmt)


def check_unpermute(ys: object, slot_to_row: object, row_to_slot: object, topk_weights: object = None
                    ) -> TensorSpec:
    """The contract of the ``unpermute`` op: ys (M, D) float with M the plan's rows, the maps, and
    topk_weights (T, k) float or None; returns the (T, D) output's spec."""
    check_tensor("ys", ys, ndim=2, dtypes=FLOAT_DTYPES)
    k, _ = _check_maps(slot_to_row, row_to_slot, ys, "ys", "rows")
    T = slot_to_row.shape[0]
    if topk_weights is not None:
        check_tensor("topk_weights", topk_weights, dtypes=FLOAT_DTYPES, shape=(T, k))
    check_same_device(ys=ys, slot_to_row=slot_to_row, row_to_slot=row_to_slot, topk_weights=topk_weights)
    return TensorSpec((T, ys.shape[1]), ys.dtype)


def make_routing(topk_ids: torch.Tensor, n_experts: int, align: int = 1, *, validate: bool = False) -> RoutingPlan:
    """Build the routing plan of ``topk_ids (T, k)`` (int32/int64) for ``n_experts`` experts.

    Example::

        ids = torch.tensor([[1, 0], [1, -1]])      # token 1's second slot is remote
        plan = make_routing(ids, n_experts=3)
        plan.offsets      -> [1, 3, 3]             # expert 0: row 0, expert 1: rows 1-2
        plan.slot_to_row  -> [[1, 0], [2, -1]]
        plan.row_to_token -> [0, 0, 1, -1]

    ``validate=True`` raises ValueError on ids that are neither -1 nor in ``[0, n_experts)``.
    """
    check_make_routing(topk_ids, n_experts, align, validate=validate)
    check_has_values("topk_ids", topk_ids, "moela.reference.make_routing")
    if validate:
        validate_ids(topk_ids, n_experts)
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


def _consistent_rows(plan: RoutingPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows whose maps agree (the module docstring's rule) and the source token of each."""
    T, k = plan.slot_to_row.shape
    r2s = plan.row_to_slot.long()
    in_range = (r2s >= 0) & (r2s < T * k)
    s = torch.where(in_range, r2s, 0)
    rows = torch.arange(plan.max_rows, device=r2s.device)
    ok = in_range & (plan.slot_to_row.reshape(-1).long()[s] == rows) if T * k else in_range
    return ok, torch.where(ok, s // max(k, 1), 0)


def permute(
    x: torch.Tensor, plan: RoutingPlan, *, validate: bool = False, fp8: bool = False, block: int = 128,
    scale_fmt: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Gather tokens into expert-sorted rows: ``x (T, D) -> xs (M, D)``; padding rows are 0.

    With ``fp8=True`` the rows come out quantized for the FP8 grouped GEMM:
    ``quant_act(permute(x, plan), block, scale_fmt)`` -> (e4m3 (M, D), scale (M, ceil(D/block))).
    ``validate=True`` checks the plan's values first (``validate_plan``).
    """
    check_tensor("x", x, ndim=2)
    plan = check_plan(plan, x.shape[0], x.device)
    if check_bool("fp8", fp8):
        check_permute_fp8(x, plan.slot_to_row, plan.row_to_slot, block, scale_fmt)
    else:
        check_permute(x, plan.slot_to_row, plan.row_to_slot)
    if check_bool("validate", validate):
        validate_plan(plan)
    ok, token = _consistent_rows(plan)
    # no tokens: every row is unowned; x[:0]'s expand keeps the result in x's autograd graph
    src = x[token] if x.shape[0] else x[:0].sum(0, keepdim=True).expand(plan.max_rows, -1)
    xs = torch.where(ok[:, None], src, 0)
    if fp8:
        from .fp8 import quant_act

        return quant_act(xs, block, scale_fmt)
    return xs


def unpermute(ys: torch.Tensor, plan: RoutingPlan, topk_weights: torch.Tensor | None = None, *,
              validate: bool = False) -> torch.Tensor:
    """Weighted combine: ``y[t] = Σ_j w[t, j] · ys[slot_to_row[t, j]]`` over valid slots.

    Args:
        ys: (M, D) expert outputs in row order.
        topk_weights: (T, k) or None (unit weights).
        validate: check the plan's values first (``validate_plan``).
    Returns:
        (T, D) in ys.dtype, accumulated in float32 (float64 for float64), slots in order j = 0..k-1.
    """
    check_tensor("ys", ys, ndim=2)
    plan = check_plan(plan, device=ys.device)
    check_unpermute(ys, plan.slot_to_row, plan.row_to_slot, topk_weights)
    if check_bool("validate", validate):
        validate_plan(plan)
    T, k = plan.slot_to_row.shape
    M = plan.max_rows
    acc = accumulate_dtype(ys.dtype)
    y = torch.zeros(T, ys.shape[1], dtype=acc, device=ys.device)
    for j in range(k):
        rows = plan.slot_to_row[:, j].long()  # (T,)
        valid = (rows >= 0) & (rows < M)
        # no rows: every slot is skipped; ys's empty sum keeps the result in ys's autograd graph
        contrib = ys[torch.where(valid, rows, 0)].to(acc) if M else ys.to(acc).sum(0, keepdim=True).expand(T, -1)
        if topk_weights is not None:
            contrib = contrib * topk_weights[:, j, None].to(acc)
        y += torch.where(valid[:, None], contrib, 0)
    return y.to(ys.dtype)
