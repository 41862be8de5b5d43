"""DeepSeek-V3 Mixture-of-Experts: gate, SwiGLU experts, shared experts, the MoE layer.

Legend: T tokens, D model dim (``dim``), E routed experts, k experts per token
(``n_activated_experts``), G expert groups, I expert hidden dim (``moe_inter_dim``).

Parameter names follow DeepSeek's checkpoints: ``gate.weight``, ``gate.bias``,
``experts.{i}.w1/w2/w3.weight``, ``shared_experts.w1/w2/w3.weight``.

Routing (DeepSeek-V3 ``Gate``):

1. ``scores = softmax(x·Wᵀ)`` or ``sigmoid(x·Wᵀ)``, in float32 (float64 for float64 input).
2. A per-expert ``bias`` (aux-loss-free balancing) is added for *selection only*.
3. With ``G > 1`` groups: a group's score is its max (no bias) or the sum of its top-2
   biased scores (with bias); the best ``n_limited_groups`` groups are kept, the others
   masked to -inf.
4. top-k of the (biased, masked) scores. **Ties go to the lower expert index** (and, for the
   group choice, to the lower group index): the selection is a stable descending sort.
5. The weights are the *unbiased* scores of the chosen experts, normalised to sum 1 for
   sigmoid (softmax scores are used as they are), times ``route_scale``.

``check_route``, ``check_gate`` and ``check_swiglu`` are the ops' contracts (arguments in, output
specs out, no values read), run by these references and by the Triton kernels alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import (
    FLOAT_DTYPES,
    TensorSpec,
    accumulate_dtype,
    check_bool,
    check_choice,
    check_float,
    check_positive_int,
    check_same_device,
    check_tensor,
)
from .config import ModelArgs
from .fp8 import check_quant_act, quant_act

__all__ = ["route", "gate", "gate_with", "Gate", "MLP", "MoE", "swiglu", "check_route", "check_gate", "check_swiglu",
           "SCORE_FUNCS"]

SCORE_FUNCS = ("softmax", "sigmoid")


def check_route(logits: object, bias: object, *, topk: object, n_groups: object = 1, topk_groups: object = 1,
                score_func: object = "softmax", route_scale: object = 1.0) -> tuple[TensorSpec, TensorSpec]:
    """The contract of ``route``: logits (T, E) float, bias (E,) float or None, the routing
    fields consistent with E; returns the specs of (weights (T, k) float32/64, ids (T, k) int32)."""
    check_tensor("logits", logits, ndim=2, dtypes=FLOAT_DTYPES)
    T, E = logits.shape
    check_positive_int("topk", topk)
    check_positive_int("n_groups", n_groups)
    check_positive_int("topk_groups", topk_groups)
    check_choice("score_func", score_func, SCORE_FUNCS)
    check_float("route_scale", route_scale)
    if E % n_groups:
        raise ValueError(f"n_groups: {E} experts cannot be split into {n_groups} equal groups")
    if topk_groups > n_groups:
        raise ValueError(f"topk_groups: expected at most n_groups={n_groups}, got {topk_groups}")
    if topk > topk_groups * (E // n_groups):
        raise ValueError(f"topk: expected at most the {topk_groups * (E // n_groups)} experts in the kept groups, "
                         f"got {topk}")
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES, shape=(E,))
        check_same_device(logits=logits, bias=bias)
        if n_groups > 1 and E // n_groups < 2:
            raise ValueError(f"n_groups: with a bias every group needs >= 2 experts (top-2 group score), "
                             f"got {E // n_groups} per group")
    return TensorSpec((T, topk), accumulate_dtype(logits.dtype)), TensorSpec((T, topk), torch.int32)


def check_gate(x: object, weight: object, bias: object, args: object) -> tuple[TensorSpec, TensorSpec]:
    """The contract of ``gate``: x (T, D) float, weight (E, D) float, bias (E,) or None, args a
    ``ModelArgs`` (its routing fields)."""
    if not isinstance(args, ModelArgs):
        raise TypeError(f"args: expected a moela.reference.ModelArgs, got {type(args).__name__}")
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, shape=(args.n_routed_experts, x.shape[1]))
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES, shape=(args.n_routed_experts,))
    check_same_device(x=x, weight=weight, bias=bias)
    logits = TensorSpec((x.shape[0], args.n_routed_experts), accumulate_dtype(x.dtype, weight.dtype))
    T, k = logits.shape[0], args.n_activated_experts
    check_route(torch.empty(logits.shape, dtype=logits.dtype, device="meta"), None if bias is None else
                bias.to("meta"), topk=k, n_groups=args.n_expert_groups, topk_groups=args.n_limited_groups,
                score_func=args.score_func, route_scale=args.route_scale)
    return TensorSpec((T, k), logits.dtype), TensorSpec((T, k), torch.int32)


def check_swiglu(gate: object, up: object, *, fp8: object = False, block: object = 128,
                 scale_fmt: object = None) -> TensorSpec | tuple[TensorSpec, TensorSpec]:
    """The contract of ``swiglu``: gate and up (..., N) of one shape, float dtype and device; fp8:
    the spec of ``quant_act``'s output instead."""
    check_tensor("gate", gate, dtypes=FLOAT_DTYPES)
    if gate.ndim == 0:
        raise ValueError("gate: expected at least 1 dimension (..., N), got a scalar")
    check_tensor("up", up, dtypes=(gate.dtype,), shape=tuple(gate.shape))
    check_same_device(gate=gate, up=up)
    if check_bool("fp8", fp8):
        return check_quant_act(gate, block, scale_fmt)
    return TensorSpec(tuple(gate.shape), gate.dtype)


def _topk_lowest_index_first(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k along the last dim; equal values keep their index order (lower index wins)."""
    values, indices = torch.sort(scores, dim=-1, descending=True, stable=True)
    return values[..., :k], indices[..., :k]


def route(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    topk: int,
    n_groups: int = 1,
    topk_groups: int = 1,
    score_func: str = "softmax",
    route_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek routing from router logits.

    Args:
        logits: (T, E) router logits ``x·Wᵀ`` (any float dtype).
        bias: (E,) selection bias or None.
    Returns:
        topk_weights: (T, k) float32 (float64 for float64 logits), unbiased scores.
        topk_ids: (T, k) int32 expert ids.
    """
    check_route(logits, bias, topk=topk, n_groups=n_groups, topk_groups=topk_groups, score_func=score_func,
                route_scale=route_scale)
    T, E = logits.shape
    acc = accumulate_dtype(logits.dtype)
    logits = logits.to(acc)
    scores = logits.softmax(dim=-1) if score_func == "softmax" else logits.sigmoid()  # (T, E)
    select = scores if bias is None else scores + bias.to(acc)
    if n_groups > 1:
        grouped = select.view(T, n_groups, E // n_groups)  # (T, G, E/G)
        if bias is None:
            group_scores = grouped.amax(dim=-1)
        else:
            group_scores = _topk_lowest_index_first(grouped, 2)[0].sum(dim=-1)  # (T, G)
        _, keep = _topk_lowest_index_first(group_scores, topk_groups)  # (T, topk_groups)
        masked = torch.ones(T, n_groups, dtype=torch.bool, device=logits.device)
        masked.scatter_(1, keep, False)
        select = grouped.masked_fill(masked.unsqueeze(-1), float("-inf")).view(T, E)
    _, ids = _topk_lowest_index_first(select, topk)  # (T, k)
    weights = scores.gather(1, ids)
    if score_func == "sigmoid":
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * route_scale, ids.to(torch.int32)


def gate(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, args: ModelArgs
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek gate: ``x (T, D)``, ``weight (E, D)``, ``bias (E,)|None`` -> (weights, ids).

    The logits are computed in float32 (float64 for float64 input); see :func:`route`.
    """
    return gate_with(route, x, weight, bias, args)


def gate_with(route_fn, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, args: ModelArgs
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``gate`` over a given ``route`` (the reference's or the kernel's): the contract check, the
    logits ``F.linear`` of x and weight upcast to float32 (float64 for float64 input), then
    ``route_fn`` with the config's routing fields."""
    check_gate(x, weight, bias, args)
    acc = accumulate_dtype(x.dtype, weight.dtype)
    logits = F.linear(x.to(acc), weight.to(acc))
    return route_fn(
        logits, bias, topk=args.n_activated_experts, n_groups=args.n_expert_groups,
        topk_groups=args.n_limited_groups, score_func=args.score_func, route_scale=args.route_scale,
    )


class Gate(nn.Module):
    """The router: ``weight (E, D)`` and, when ``args.has_gate_bias``, a float32 ``bias (E,)``."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.dim))
        nn.init.normal_(self.weight, std=args.dim**-0.5)
        if args.has_gate_bias:
            self.bias = nn.Parameter(torch.zeros(args.n_routed_experts, dtype=torch.float32))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (T, D) -> topk_weights (T, k) float32, topk_ids (T, k) int32."""
        return gate(x, self.weight, self.bias, self.args)


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, fp8: bool = False, block: int = 128,
           scale_fmt: str | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``silu(gate) * up``: the SwiGLU activation between w1/w3 and w2.

    fp8: return ``quant_act(silu(gate) * up, block, scale_fmt)`` instead, the FP8 input of an
    FP8 down projection: ``(q e4m3, scale float32)`` (no gradient).
    """
    check_swiglu(gate, up, fp8=fp8, block=block, scale_fmt=scale_fmt)
    out = F.silu(gate) * up
    if fp8:
        return quant_act(out, block, scale_fmt)
    return out


class MLP(nn.Module):
    """SwiGLU feed-forward ``w2(silu(w1 x) * w3 x)``: a routed expert, or the shared experts."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)  # gate projection
        self.w2 = nn.Linear(inter_dim, dim, bias=False)  # down projection
        self.w3 = nn.Linear(dim, inter_dim, bias=False)  # up projection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(swiglu(self.w1(x), self.w3(x)))


class MoE(nn.Module):
    """DeepSeek MoE layer as a plain loop over the experts (the readable definition).

    ``y = Σ_j w[t, j] · expert_{id[t, j]}(x[t]) + shared_experts(x[t])``, accumulated in
    float32 (float64 for float64 input) and returned in the input dtype.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.dim = args.dim
        self.gate = Gate(args)
        self.experts = nn.ModuleList(MLP(args.dim, args.moe_inter_dim) for _ in range(args.n_routed_experts))
        if args.n_shared_experts > 0:
            self.shared_experts = MLP(args.dim, args.n_shared_experts * args.moe_inter_dim)
        else:
            self.register_module("shared_experts", None)

    def routed(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The routed part: x (T, D), weights/ids (T, k) -> (T, D) in the accumulator dtype."""
        acc = accumulate_dtype(x.dtype)
        y = torch.zeros(x.shape, dtype=acc, device=x.device)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(ids == e)  # tokens routed to e, and at which of their k slots
            if token.numel() == 0:
                continue
            out = expert(x[token]).to(acc) * weights[token, slot, None].to(acc)
            y.index_add_(0, token, out)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., D) -> (..., D)."""
        check_tensor("x", x, dtypes=FLOAT_DTYPES)
        if x.ndim == 0 or x.shape[-1] != self.dim:
            raise ValueError(f"x: expected a last dim of {self.dim}, got shape {tuple(x.shape)}")
        w = self.experts[0].w1.weight
        if x.device != w.device:
            raise ValueError(f"x: expected device {w.device} (the layer's), got {x.device}")
        if x.dtype != w.dtype:
            raise TypeError(f"x: expected dtype {w.dtype} (the layer's), got {x.dtype}")
        shape = x.shape
        x = x.reshape(-1, self.dim)
        weights, ids = self.gate(x)
        y = self.routed(x, weights, ids)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x).to(y.dtype)
        return y.to(x.dtype).view(shape)
