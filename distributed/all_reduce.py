"""AllReduceDispatcher: every rank runs its own experts on the whole (replicated) batch, and the
partial outputs are summed over the group.

For decode with replicated tokens (as under tensor-parallel attention): all ranks bring the same
x, ids and weights; ids of other ranks' experts become -1, which the routing plan skips. Nothing
is exchanged before the experts, and the one all-reduce after them moves T·D values per rank
whatever the routing. No host sync and no shape that depends on the routing: the step can be
captured in a CUDA graph. The partial sums are all-reduced in ys's dtype.

Gradients: the output is replicated, so its gradient arriving on each rank is the whole gradient;
x's and topk_weights' gradients (each rank has its experts' share) are summed over the group.
"""

from __future__ import annotations

from types import ModuleType
from typing import NamedTuple

import torch

from moela.reference import RoutingPlan

from .collectives import copy_to_group, reduce_from_group, tie
from .dispatcher import Dispatcher, default_ops
from .layout import ContiguousLayout, from_masked, to_masked

__all__ = ["AllReduceDispatcher", "AllReduceHandle"]


class AllReduceHandle(NamedTuple):
    """What combine needs: the local plan, the weights and the layout the rows were handed out in."""

    ops: ModuleType
    plan: RoutingPlan  # over the local experts, built from the ids shifted to local numbering
    topk_weights: torch.Tensor  # (T, k)
    x: torch.Tensor  # (T, D) the dispatched tokens (the backward's path to copy_to_group's all-reduce)
    contiguous: ContiguousLayout
    masked: bool


class AllReduceDispatcher(Dispatcher):
    """Replicated tokens, local experts, one all-reduce of the outputs (the decode default).

    In the masked layout every expert block has ``max_m = T`` rows: a token's k ids must be
    distinct (as DeepSeek's top-k makes them), so no expert gets more than T of them;
    ``validate=True`` checks it (a host sync).
    """

    shards_tokens = False

    def __init__(self, n_experts, group=None, *, layout="contiguous", validate: bool = False):
        super().__init__(n_experts, group, layout=layout)
        self.validate = validate

    def dispatch(self, x, topk_weights, topk_ids, *, ops=None):
        self._check(x, topk_weights, topk_ids)
        if self.validate and self.layout == "masked":
            ids = topk_ids.sort(-1).values
            repeated = (ids[:, 1:] == ids[:, :-1]) & (ids[:, 1:] >= 0) & (ids[:, 1:] < self.n_experts)
            if bool(repeated.any()):
                t = int(repeated.any(-1).nonzero()[0])
                raise ValueError(f"topk_ids: the masked layout needs distinct ids per token, token {t} has "
                                 f"{topk_ids[t].tolist()}")
        ops = default_ops(x.device) if ops is None else ops
        x, topk_weights = copy_to_group(x, topk_weights, group=self.group)
        local = topk_ids.to(torch.int32) - self.experts.start
        local = torch.where((local >= 0) & (local < self.n_local), local, -1)
        plan = ops.make_routing(local, self.n_local)
        xs = ops.permute(x, plan) if x.shape[0] else x  # (T·k, D): rows of the local experts first, then zeros
        layout = ContiguousLayout(plan.offsets, plan.tokens_per_expert)
        masked = self.layout == "masked"
        handle = AllReduceHandle(ops, plan, topk_weights, x, layout, masked)
        if masked:
            xs, masked_layout = to_masked(xs, layout, max(x.shape[0], 1))
            return xs, masked_layout, handle
        return xs, layout, handle

    def combine(self, ys: torch.Tensor, handle: AllReduceHandle) -> torch.Tensor:
        if handle.masked:
            ys = from_masked(ys, handle.contiguous, handle.plan.max_rows)
        if not handle.plan.max_rows:  # no tokens
            return tie(ys, handle.x, handle.topk_weights)
        y = handle.ops.unpermute(ys, handle.plan, handle.topk_weights)  # this rank's experts' share
        return reduce_from_group(tie(y, handle.x, handle.topk_weights), self.group)

