"""Differentiable collectives for expert parallelism (torch.distributed: NCCL on GPUs, gloo on CPUs).

- :func:`all_to_all`: rows exchanged by ``all_to_all_single`` with host-known split sizes; its
  gradient is the reverse exchange.
- :func:`reduce_from_group`: sum over the group (all-reduce). Its gradient is the identity: the
  result is replicated on every rank and so is whatever consumes it, so each rank's incoming
  gradient already is the whole gradient (Megatron's "reduce from the tensor-parallel region").
- :func:`copy_to_group`: the identity whose gradient is summed over the group: a replicated
  input that each rank uses for its share of the work (its own experts) gets the sum of the
  shares' gradients.
- :func:`tie`: the identity on its first input with (zero) gradient edges to the others, so that
  a collective's backward runs even on a rank whose own path to it carries nothing (no tokens,
  an op that returns a fresh tensor for empty input).

Every rank must run the same collectives in the same order, forward and backward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_to_all", "reduce_from_group", "copy_to_group", "tie", "grad_anchor"]


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


class _Tie(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, *deps):
        ctx.deps = [(d.shape, d.dtype, d.device) for d in deps]
        return t.view_as(t)

    @staticmethod
    def backward(ctx, dt):
        zeros = [torch.zeros((), dtype=dtype, device=device).expand(shape) if needed else None  # stride 0: no memory
                 for needed, (shape, dtype, device) in zip(ctx.needs_input_grad[1:], ctx.deps, strict=True)]
        return (dt, *zeros)


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


def tie(t: torch.Tensor, *deps: torch.Tensor | None) -> torch.Tensor:
    """``t`` unchanged; in backward, ``deps`` (those that require grad) get a zero gradient, so their
    producers (collectives) run on this rank whatever ``t``'s own history. Outside grad mode: ``t``."""
    deps = tuple(d for d in deps if d is not None and d.requires_grad)
    if not torch.is_grad_enabled() or not deps:
        return t
    return _Tie.apply(t, *deps)


def grad_anchor(device: torch.device) -> torch.Tensor | None:
    """In grad mode, a fresh 0-dim leaf that requires grad (None otherwise): tied into a dispatch so
    that its collectives enter the graph on every rank alike, whatever each rank's inputs need."""
    return torch.zeros((), device=device, requires_grad=True) if torch.is_grad_enabled() else None
