"""moela.distributed: expert parallelism on torch.distributed (NCCL on GPUs, gloo on CPUs).

Rank r of an expert-parallel group of W ranks holds experts ``[r·E/W, (r+1)·E/W)``. Dispatchers
move tokens to their experts' ranks and the outputs back, all with one interface::

    xs, layout, handle = dispatcher.dispatch(x, topk_weights, topk_ids)
    y = dispatcher.combine(experts(xs, layout), handle)

- :class:`AllToAllDispatcher`: each rank brings its own tokens; counts, then rows, over
  ``all_to_all_single`` (one host read of the split sizes). Training and prefill.
- :class:`AllReduceDispatcher`: every rank brings the same tokens, runs its own experts and the
  outputs are all-reduced; no host sync (CUDA-graph capturable). Decode.
- :class:`DeepEPDispatcher`: DeepEP's kernels (``deep_ep`` installed, CUDA).

Layouts: :class:`ContiguousLayout` (rows grouped by expert, ``grouped_gemm``'s offsets) or
:class:`MaskedLayout` (``(E_l, max_m, D)`` blocks, DeepGEMM's masked form). ``moela.model.MoE``
takes an ``ep_group`` and one of these.
"""

from .all_reduce import AllReduceDispatcher, AllReduceHandle
from .all_to_all import AllToAllDispatcher, AllToAllHandle
from .collectives import all_to_all, copy_to_group, reduce_from_group
from .deepep import DeepEPDispatcher, deep_ep_available
from .dispatcher import Dispatcher, default_ops, local_experts
from .layout import LAYOUTS, ContiguousLayout, MaskedLayout, from_masked, to_masked

#: The dispatchers by name (``moela.model.MoE(..., dispatcher=name)``).
DISPATCHERS = {"all_to_all": AllToAllDispatcher, "all_reduce": AllReduceDispatcher, "deep_ep": DeepEPDispatcher}

__all__ = [
    "DISPATCHERS",
    "Dispatcher", "AllReduceDispatcher", "AllToAllDispatcher", "DeepEPDispatcher", "AllReduceHandle",
    "AllToAllHandle", "deep_ep_available", "local_experts", "default_ops",
    "ContiguousLayout", "MaskedLayout", "LAYOUTS", "to_masked", "from_masked",
    "all_to_all", "reduce_from_group", "copy_to_group",
]
