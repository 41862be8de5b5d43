"""DeepEPDispatcher: DeepEP's NVLink/RDMA all-to-all kernels behind the dispatcher interface.

Needs the ``deep_ep`` package (github.com/deepseek-ai/DeepEP, its ``Buffer`` API), CUDA GPUs and
bf16 tokens; constructing it without ``deep_ep`` raises ``ImportError``. Two modes:

- ``"normal"`` (training, prefill): ``Buffer.get_dispatch_layout`` then ``Buffer.dispatch`` send
  each token once to every rank that holds one of its experts, with its ids (renumbered to the
  local experts, -1 elsewhere) and weights. A routing plan over the local experts groups the
  received rows (contiguous layout); combine weights them with the received weights (``unpermute``)
  and ``Buffer.combine`` adds the ranks' partial sums on the tokens' rank. Differentiable: the
  gradient of a dispatch is a combine and the other way round, as DeepEP documents. DeepEP reads
  the received counts on the host inside ``dispatch``.
- ``"low_latency"`` (decode, inference only): ``Buffer.low_latency_dispatch`` hands the rows out
  in the masked layout ``(E_l, max_tokens_per_rank·W, D)`` with the counts on the device (no
  host sync, CUDA-graph capturable); ``Buffer.low_latency_combine`` weights and adds them.

Buffers are sized from DeepEP's own hints on the first dispatch (a collective: every rank calls
it) and reused while the hidden size fits.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from moela.reference import RoutingPlan

from .dispatcher import Dispatcher, default_ops
from .layout import ContiguousLayout, MaskedLayout

__all__ = ["DeepEPDispatcher", "deep_ep_available"]

MODES = ("normal", "low_latency")


def deep_ep_available() -> bool:
    """True when the ``deep_ep`` package can be imported."""
    try:
        import deep_ep  # noqa: F401
    except ImportError:
        return False
    return True


class _NormalHandle(NamedTuple):
    ops: ModuleType
    local_plan: RoutingPlan  # the received tokens' slots over the local experts
    recv_topk_weights: torch.Tensor  # (R, k)
    comm: Any  # DeepEP's handle


class _LowLatencyHandle(NamedTuple):
    topk_ids: torch.Tensor  # (T, k) int64
    topk_weights: torch.Tensor  # (T, k) float32
    comm: Any


class _Dispatch(torch.autograd.Function):
    """x (T, D), w (T, k) -> received tokens (R, D), their ids (R, k) and weights (R, k)."""

    @staticmethod
    def forward(ctx, x, topk_weights, topk_ids, buffer, n_experts, out):
        per_rank, per_rdma_rank, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_ids, n_experts)
        recv_x, recv_ids, recv_w, _, comm, _ = buffer.dispatch(
            x, topk_idx=topk_ids, topk_weights=topk_weights, num_tokens_per_rank=per_rank,
            num_tokens_per_rdma_rank=per_rdma_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
        ctx.buffer, ctx.comm = buffer, comm
        ctx.mark_non_differentiable(recv_ids)
        out["comm"] = comm  # combine's handle, with or without autograd
        return recv_x, recv_w, recv_ids

    @staticmethod
    def backward(ctx, d_recv_x, d_recv_w, _):
        dx, dw, _ = ctx.buffer.combine(d_recv_x.contiguous(), ctx.comm, topk_weights=d_recv_w.contiguous())
        return dx, dw, None, None, None, None


class _Combine(torch.autograd.Function):
    """Partial sums of the received tokens (R, D) -> their sum on the tokens' rank (T, D)."""

    @staticmethod
    def forward(ctx, y_recv, buffer, comm):
        y, _, _ = buffer.combine(y_recv, comm)
        ctx.buffer, ctx.comm = buffer, comm
        return y

    @staticmethod
    def backward(ctx, dy):
        d_recv, _, _, _, _, _ = ctx.buffer.dispatch(dy.contiguous(), handle=ctx.comm)
        return d_recv, None, None


class DeepEPDispatcher(Dispatcher):
    """DeepEP's dispatch/combine (``mode="normal"``) or low-latency kernels (``mode="low_latency"``).

    Args:
        n_experts, group: as every dispatcher.
        mode: "normal" (contiguous layout, differentiable) or "low_latency" (masked layout, no grad).
        max_tokens_per_rank: low-latency mode: the most tokens any rank dispatches in one call
            (DeepEP's ``num_max_dispatch_tokens_per_rank``, the same on every rank).
    """

    shards_tokens = True

    def __init__(self, n_experts: int, group: dist.ProcessGroup | None = None, *, mode: str = "normal",
                 max_tokens_per_rank: int = 128):
        try:
            import deep_ep
        except ImportError as e:
            raise ImportError("DeepEPDispatcher needs the deep_ep package (DeepEP, github.com/deepseek-ai/DeepEP), "
                              "which is not importable here; AllToAllDispatcher does the same job on "
                              "torch.distributed alone") from e
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        super().__init__(n_experts, group, layout="contiguous" if mode == "normal" else "masked")
        self._deep_ep = deep_ep
        self.mode = mode
        self.max_tokens_per_rank = max_tokens_per_rank
        self._buffer = None
        self._hidden = 0

    def _group(self) -> dist.ProcessGroup:
        return self.group if self.group is not None else dist.group.WORLD

    def _get_buffer(self, hidden: int):
        """DeepEP's Buffer, sized from its hints for bf16 rows of ``hidden`` values (built once, a collective)."""
        if self._buffer is not None and hidden <= self._hidden:
            return self._buffer
        Buffer, group = self._deep_ep.Buffer, self._group()
        if self.mode == "normal":
            nvl = rdma = 0
            for config in (Buffer.get_dispatch_config(self.world), Buffer.get_combine_config(self.world)):
                nvl = max(nvl, config.get_nvl_buffer_size_hint(hidden * 2, self.world))
                rdma = max(rdma, config.get_rdma_buffer_size_hint(hidden * 2, self.world))
            self._buffer = Buffer(group, nvl, rdma)
        else:
            rdma = Buffer.get_low_latency_rdma_size_hint(self.max_tokens_per_rank, hidden, self.world, self.n_experts)
            self._buffer = Buffer(group, 0, rdma, low_latency_mode=True, num_qps_per_rank=self.n_local)
        self._hidden = hidden
        return self._buffer

    def dispatch(self, x, topk_weights, topk_ids, *, ops=None):
        self._check(x, topk_weights, topk_ids)
        if x.dtype != torch.bfloat16 or x.device.type != "cuda":
            raise TypeError(f"x: DeepEP dispatches bf16 CUDA tensors, got {x.dtype} on {x.device}")
        buffer = self._get_buffer(x.shape[1])
        ids = topk_ids.to(torch.int64)
        if self.mode == "low_latency":
            if torch.is_grad_enabled() and (x.requires_grad or topk_weights.requires_grad):
                raise RuntimeError("DeepEPDispatcher(mode='low_latency') is for inference: run it under "
                                   "torch.no_grad(), or use mode='normal' to train")
            if x.shape[0] > self.max_tokens_per_rank:
                raise ValueError(f"x: at most max_tokens_per_rank={self.max_tokens_per_rank} tokens per call in "
                                 f"low-latency mode, got {x.shape[0]}")
            xs, counts, comm, _, _ = buffer.low_latency_dispatch(x.contiguous(), ids, self.max_tokens_per_rank,
                                                                 self.n_experts, use_fp8=False)
            handle = _LowLatencyHandle(ids, topk_weights.float().contiguous(), comm)
            return xs, MaskedLayout(counts.to(torch.int32)), handle
        ops = default_ops(x.device) if ops is None else ops
        out: dict[str, Any] = {}
        recv_x, recv_w, recv_ids = _Dispatch.apply(x.contiguous(), topk_weights.float().contiguous(), ids, buffer,
                                                   self.n_experts, out)
        local_plan = ops.make_routing(recv_ids, self.n_local)  # DeepEP gives local ids, -1 for other ranks'
        xs = ops.permute(recv_x, local_plan) if recv_x.shape[0] else recv_x
        layout = ContiguousLayout(local_plan.offsets, local_plan.tokens_per_expert)
        return xs, layout, _NormalHandle(ops, local_plan, recv_w, out["comm"])

    def combine(self, ys, handle):
        buffer = self._buffer
        if isinstance(handle, _LowLatencyHandle):
            y, _, _ = buffer.low_latency_combine(ys.contiguous(), handle.topk_ids, handle.topk_weights, handle.comm)
            return y
        y_recv = ys  # (R, D) this rank's share of each received token (none received: no op on empty tensors)
        if handle.local_plan.max_rows:
            y_recv = handle.ops.unpermute(ys, handle.local_plan, handle.recv_topk_weights)
        return _Combine.apply(y_recv.contiguous(), buffer, handle.comm)
