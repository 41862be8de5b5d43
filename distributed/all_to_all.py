"""AllToAllDispatcher: each rank sends every (token, slot) row to the rank of its expert and gets
the expert outputs back (torchtitan's and Megatron's all-to-all token dispatch).

Dispatch, on each rank with its own T tokens:
1. ``make_routing(topk_ids, E)`` orders the rows by global expert, hence by destination rank
   (rank r owns experts ``[r·E_l, (r+1)·E_l)``); ``permute`` gathers them (one row per valid slot).
2. The per-expert counts go out with ``all_to_all_single`` (counts of rank r's experts to rank r).
3. The one host read: the split sizes of step 4 (rows to each rank, rows from each rank and
   expert), ``W + W·E_l`` integers in one ``tolist()``. Everything after it has known shapes.
4. The rows go out with ``all_to_all_single``; they arrive ordered by (source rank, local expert).
5. A routing plan over the local experts (``make_routing`` of each received row's expert)
   regroups them by local expert: ``xs`` for the grouped GEMM.
Combine runs it backwards: ``unpermute`` to the received order, the reverse all-to-all, and
``unpermute`` with the routing weights into ``y[t] = Σ_j w[t,j]·ys[t,j]`` on the tokens' rank
(the same sum, in the same slot order, as on one process).

The exchanged rows are those of the valid slots (a token that picks two experts of one rank is
sent twice). Gradients flow back through the reverse all-to-alls; in grad mode both exchanges
are part of the graph on every rank (``tie``), so a rank without tokens still joins them.
"""

from __future__ import annotations

from types import ModuleType
from typing import NamedTuple

import torch
import torch.distributed as dist

from moela.reference import RoutingPlan

from .collectives import all_to_all, grad_anchor, tie
from .dispatcher import Dispatcher, default_ops
from .layout import ContiguousLayout, from_masked, to_masked

__all__ = ["AllToAllDispatcher", "AllToAllHandle"]


class AllToAllHandle(NamedTuple):
    """What combine needs: both plans, the weights and the split sizes read in dispatch."""

    ops: ModuleType
    plan: RoutingPlan  # the source plan over all E experts (this rank's tokens)
    local_plan: RoutingPlan  # the received rows over the local experts
    topk_weights: torch.Tensor  # (T, k)
    recv: torch.Tensor | None  # (R, D) the rows received, in grad mode (the backward's path to the first exchange)
    send_splits: list[int]  # rows sent to each rank
    recv_splits: list[int]  # rows received from each rank
    contiguous: ContiguousLayout
    masked: bool


class AllToAllDispatcher(Dispatcher):
    """Tokens sharded over the ranks, exchanged with two all-to-alls (the prefill and training default).

    In the masked layout ``max_m`` is the largest number of rows a local expert received (read
    with the split sizes, no extra sync).
    """

    shards_tokens = True

    def dispatch(self, x, topk_weights, topk_ids, *, ops=None):
        self._check(x, topk_weights, topk_ids)
        ops = default_ops(x.device) if ops is None else ops
        W, E_l = self.world, self.n_local
        plan = ops.make_routing(topk_ids, self.n_experts)
        # (T·k, D): valid rows first, by expert hence by destination rank (no tokens: no op on empty tensors)
        send = ops.permute(x, plan) if x.shape[0] else x
        recv_counts = torch.empty_like(plan.tokens_per_expert)  # [r·E_l + e]: rows from rank r for my expert e
        dist.all_to_all_single(recv_counts, plan.tokens_per_expert, group=self.group)
        # the one host read: split sizes (rows to each rank, then rows from each rank per local expert)
        sizes = torch.cat([plan.tokens_per_expert.view(W, E_l).sum(1, dtype=torch.int32), recv_counts]).tolist()
        send_splits, per_expert = sizes[:W], sizes[W:]
        recv_splits = [sum(per_expert[r * E_l:(r + 1) * E_l]) for r in range(W)]
        # in grad mode both exchanges are in the graph on every rank, whatever its tokens and ops give
        send = tie(send[:sum(send_splits)], grad_anchor(x.device))
        recv = all_to_all(send, recv_splits, send_splits, self.group)  # (R, D)

        R = sum(recv_splits)
        expert_of_row = torch.repeat_interleave(
            torch.arange(E_l, dtype=torch.int32, device=x.device).repeat(W), recv_counts, output_size=R)
        local_plan = ops.make_routing(expert_of_row.view(R, 1), E_l)
        xs = ops.permute(recv, local_plan) if R else recv  # (R, D) grouped by local expert
        layout = ContiguousLayout(local_plan.offsets, local_plan.tokens_per_expert)
        masked = self.layout == "masked"
        handle = AllToAllHandle(ops, plan, local_plan, topk_weights, recv if recv.requires_grad else None,
                                send_splits, recv_splits, layout, masked)
        if masked:
            max_m = max(max(sum(per_expert[r * E_l + e] for r in range(W)) for e in range(E_l)), 1)
            xs, masked_layout = to_masked(xs, layout, max_m)
            return xs, masked_layout, handle
        return xs, layout, handle

    def combine(self, ys: torch.Tensor, handle: AllToAllHandle) -> torch.Tensor:
        ops = handle.ops
        R = sum(handle.recv_splits)
        if handle.masked:
            ys = from_masked(ys, handle.contiguous, R)
        back = tie(ops.unpermute(ys, handle.local_plan) if R else ys, handle.recv)  # (R, D) in the received order
        back = all_to_all(back, handle.send_splits, handle.recv_splits, self.group)  # (S, D) in the source plan's order
        pad = handle.plan.max_rows - back.shape[0]  # the source plan's rows past its valid ones
        rows = torch.cat([back, back.new_zeros(pad, back.shape[1])]) if pad else back
        if not rows.shape[0]:  # no tokens here
            return tie(rows, handle.topk_weights)
        return tie(ops.unpermute(rows, handle.plan, handle.topk_weights), back)
