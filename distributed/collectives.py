"""Differentiable collectives for expert parallelism (torch.distributed: NCCL on GPUs, gloo on CPUs).

- :func:`all_to_all`: rows exchanged by ``all_to_all_single`` with host-known split sizes; its
  gradient is the reverse exchange.
- :func:`reduce_from_group`: sum over the group (all-reduce). Its gradient is the identity: the
  result is replicated on every rank and so is whatever consumes it, so each rank's incoming
  gradient already is the whole gradient (Megatron's "reduce from the tensor-parallel region").
- :func:`copy_to_group`: the identity whose gradient is summed over the group: a replicated
  input that each rank uses for its share of the work (its own experts) gets the sum of the
  shares' gradients.

Every rank must run the same collectives in the same order, forward and backward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_to_all", "reduce_from_group", "copy_to_group"]


def _exchange(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    out = x.new_empty(sum(out_splits), *x.shape[1:])
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _exchange(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, dy):
        out_splits, in_splits = ctx.splits
        return _exchange(dy, in_splits, out_splits, ctx.group), None, None, None


class _ReduceFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        y = x.clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, dy):
        return dy, None


class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group, *xs):
        ctx.group = group
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def backward(ctx, *dys):
        out = []
        for needed, dy in zip(ctx.needs_input_grad[1:], dys, strict=True):
            if needed:  # the same inputs need gradients on every rank: the all-reduces match up
                dy = dy.clone()
                dist.all_reduce(dy, group=ctx.group)
            out.append(dy if needed else None)
        return (None, *out)


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group=None) -> torch.Tensor:
    """Send rows ``x[sum(in_splits[:r]) : sum(in_splits[:r+1])]`` to rank r; returns the
    ``sum(out_splits)`` rows received, ordered by source rank. x: (N, ...) -> (sum(out_splits), ...)."""
    return _AllToAll.apply(x, list(out_splits), list(in_splits), group)


def reduce_from_group(x: torch.Tensor, group=None) -> torch.Tensor:
    """The sum of ``x`` over the group's ranks (a new tensor; gradient: identity)."""
    return _ReduceFromGroup.apply(x, group)


def copy_to_group(*xs: torch.Tensor, group=None) -> tuple[torch.Tensor, ...]:
    """The inputs unchanged; their gradients are summed over the group (one all-reduce each, in order)."""
    return _CopyToGroup.apply(group, *xs)
