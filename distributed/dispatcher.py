"""The dispatcher interface shared by every expert-parallel backend, and how experts map to ranks.

Legend: T tokens on this rank, k experts per token, D hidden dim, E experts in all, W ranks in
the expert-parallel group, E_l = E / W experts per rank, M rows after dispatch.

Rank r holds the contiguous block of experts ``[r·E_l, (r+1)·E_l)`` (:func:`local_experts`). A
dispatcher moves tokens to the ranks of their experts and back::

    xs, layout, handle = dispatcher.dispatch(x, topk_weights, topk_ids)  # x (T, D) -> rows of local experts
    ys = experts(xs, layout)                                              # any per-expert function of the rows
    y = dispatcher.combine(ys, handle)                                    # (T, D): Σ_j w[t,j]·expert_j(x[t])

``layout`` is a :class:`ContiguousLayout` (``xs (M, D)``) or a :class:`MaskedLayout`
(``xs (E_l, max_m, D)``), as the dispatcher was built. Both calls are differentiable: x,
topk_weights and ys get their gradients. Ids outside ``[0, E)`` (e.g. -1) are skipped: those
slots contribute nothing. ``shards_tokens`` says what the ranks bring: their own tokens (True:
the layer's output on rank r is that of rank r's tokens) or the same tokens everywhere (False).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist

from moela.reference._checks import FLOAT_DTYPES, INT_DTYPES, check_positive_int, check_same_device, check_tensor

from .layout import LAYOUTS, ContiguousLayout, MaskedLayout

__all__ = ["Dispatcher", "local_experts", "default_ops"]


def local_experts(n_experts: int, world: int, rank: int) -> range:
    """The global ids of rank ``rank``'s experts: ``range(rank·E_l, (rank+1)·E_l)`` with E_l = E / W."""
    check_positive_int("n_experts", n_experts)
    check_positive_int("world", world)
    if n_experts % world:
        raise ValueError(f"n_experts: expected a multiple of the group size {world} (experts split evenly "
                         f"over the ranks), got {n_experts}")
    if not 0 <= rank < world:
        raise ValueError(f"rank: expected 0 <= rank < {world}, got {rank}")
    n_local = n_experts // world
    return range(rank * n_local, (rank + 1) * n_local)


def default_ops(device: torch.device) -> ModuleType:
    """The contract ops a dispatcher uses when given none: ``moela.kernels`` on CUDA, else ``moela.reference``."""
    if device.type == "cuda":
        import moela.kernels as ops
    else:
        import moela.reference as ops
    return ops


class Dispatcher:
    """Base of the dispatchers: the group, this rank's experts and the argument checks.

    Args:
        n_experts: E, the routed experts of the layer (a multiple of the group size).
        group: the expert-parallel process group (None: the default group).
        layout: "contiguous" or "masked", the form of the rows ``dispatch`` returns.
    """

    #: True when each rank dispatches its own tokens, False when all ranks bring the same tokens.
    shards_tokens: bool = True

    def __init__(self, n_experts: int, group: dist.ProcessGroup | None = None, *, layout: str = "contiguous"):
        if not dist.is_initialized():
            raise RuntimeError(f"{type(self).__name__}: torch.distributed is not initialised "
                               "(call torch.distributed.init_process_group first, or launch with torchrun)")
        if layout not in LAYOUTS:
            raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.experts = local_experts(n_experts, self.world, self.rank)
        self.n_experts = n_experts
        self.n_local = len(self.experts)
        self.layout = layout

    def dispatch(
        self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, *, ops: ModuleType | None = None
    ) -> tuple[torch.Tensor, ContiguousLayout | MaskedLayout, Any]:
        """x (T, D), topk_weights (T, k) float, topk_ids (T, k) int -> (xs, layout, handle).

        ``ops``: the namespace of the contract ops to build plans and move rows with
        (``moela.kernels`` or ``moela.reference``; None: :func:`default_ops`)."""
        raise NotImplementedError

    def combine(self, ys: torch.Tensor, handle: Any) -> torch.Tensor:
        """Expert outputs in the dispatched layout -> y (T, D) on the tokens' rank, in ys's dtype."""
        raise NotImplementedError

    def _check(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> None:
        check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
        check_tensor("topk_ids", topk_ids, ndim=2, dtypes=INT_DTYPES)
        check_tensor("topk_weights", topk_weights, dtypes=FLOAT_DTYPES, shape=topk_ids.shape)
        if x.shape[0] != topk_ids.shape[0]:
            raise ValueError(f"topk_ids: expected {x.shape[0]} rows (one per token of x), got shape "
                             f"{tuple(topk_ids.shape)}")
        check_same_device(x=x, topk_weights=topk_weights, topk_ids=topk_ids)

    def extra_repr(self) -> str:
        return (f"experts={self.n_experts}, local={self.experts.start}..{self.experts.stop - 1}, "
                f"rank={self.rank}/{self.world}, layout={self.layout}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"
