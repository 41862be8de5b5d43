"""Drop-in DeepSeek MoE layer on the fast path: gate -> plan -> permute -> grouped GEMMs -> combine.

Legend: T tokens, D model dim, E routed experts, k experts per token, I expert hidden dim,
M rows after dispatch.

The routed experts are stored stacked for the grouped GEMM: ``w13 (E, 2I, D)`` holds each
expert's gate projection w1 (rows ``[0, I)``) over its up projection w3 (rows ``[I, 2I)``),
and ``w2 (E, D, I)`` the down projections. ``state_dict()`` still speaks DeepSeek's names
(``experts.{i}.w1.weight`` ...) through state-dict hooks, so checkpoints load unchanged. With
``args.dtype == "fp8"`` the stacked weights are e4m3 with 128×128 ``*_scale_inv`` blocks
(``experts.{i}.w1.weight_scale_inv`` in the checkpoint), activations are quantized on the fly.

The forward never synchronises with the host: every shape is known from T, k and E.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from moela.reference import ModelArgs
from moela.reference._checks import FLOAT_DTYPES, accumulate_dtype, check_tensor
from moela.reference.dispatch import RoutingPlan
from moela.reference.moe import MLP

from .backend import ops_for
from .quantize import keep_dtype, quantize_linears_

__all__ = ["Gate", "MoE", "routed_experts", "sequence_balance_loss"]

_BLOCK = 128
_FP8_ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class Gate(nn.Module):
    """Router weights with DeepSeek's names: ``weight (E, D)``, ``bias (E,)`` float32 or None.

    The bias stays float32 whatever the module is cast to (DeepSeek builds it in float32, Hugging
    Face keeps ``e_score_correction_bias`` in float32): a bf16 bias would round checkpoint values
    and swallow ``update_gate_bias`` steps smaller than its ulp.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.dim))
        nn.init.normal_(self.weight, std=args.dim**-0.5)
        if args.has_gate_bias:
            self.bias = nn.Parameter(torch.zeros(args.n_routed_experts, dtype=torch.float32), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def _apply(self, fn, recurse=True):
        if self.bias is not None:  # .bfloat16() / .to(dtype) move the float32 selection bias, never cast it
            fn = keep_dtype(fn, (self.bias,))
        return super()._apply(fn, recurse)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(T, D) -> (T, E) router logits in float32 (float64 for float64 input), as the reference."""
        acc = accumulate_dtype(x.dtype)
        return F.linear(x.to(acc), self.weight.to(acc))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (T, D) -> topk_weights (T, k) float32, topk_ids (T, k) int32.

        The ids come from the backend's routing; the weights are recomputed with torch from the
        chosen ids when the logits need gradients (through the gate weight or through x), so the
        router trains, and x gets the routing weights' gradient, through any backend.
        """
        a = self.args
        logits = self.logits(x)
        ops = ops_for(a.backend, x.device)
        weights, ids = ops.route(
            logits.detach() if torch.is_grad_enabled() else logits, self.bias, topk=a.n_activated_experts,
            n_groups=a.n_expert_groups, topk_groups=a.n_limited_groups, score_func=a.score_func,
            route_scale=a.route_scale,
        )
        if torch.is_grad_enabled() and logits.requires_grad:
            weights = _route_weights(logits, ids, a.score_func, a.route_scale)
        return weights, ids


def _route_weights(logits: torch.Tensor, ids: torch.Tensor, score_func: str, route_scale: float) -> torch.Tensor:
    """Differentiable weights of the chosen experts: unbiased scores, sigmoid-normalised, scaled."""
    scores = logits.softmax(-1) if score_func == "softmax" else logits.sigmoid()
    w = scores.gather(1, ids.long())
    if score_func == "sigmoid":
        w = w / w.sum(-1, keepdim=True)
    return w * route_scale


def sequence_balance_loss(logits: torch.Tensor, ids: torch.Tensor, args: ModelArgs, seq_len: int) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss (without its α factor).

    Per sequence of ``seq_len`` tokens: ``Σ_i f_i · P_i`` with ``f_i = E/(k·T) · #{t: i ∈ topk(t)}``
    and ``P_i = mean_t s'_{i,t}``, ``s'`` the scores normalised over all experts; averaged over
    sequences. logits: (B·seq_len, E); ids: (B·seq_len, k).
    """
    E, k = args.n_routed_experts, args.n_activated_experts
    scores = logits.softmax(-1) if args.score_func == "softmax" else logits.sigmoid()
    scores = scores / scores.sum(-1, keepdim=True)
    B = logits.shape[0] // seq_len
    chosen = torch.zeros(B * seq_len, E, device=logits.device).scatter_(1, ids.long(), 1.0)
    f = chosen.view(B, seq_len, E).sum(1) * (E / (k * seq_len))  # (B, E)
    p = scores.view(B, seq_len, E).mean(1)  # (B, E)
    return (f * p).sum(-1).mean()


def routed_experts(
    ops: ModuleType,
    x: torch.Tensor,
    plan: RoutingPlan,
    weights: torch.Tensor | None,
    w13: torch.Tensor,
    w2: torch.Tensor,
    *,
    w13_scale_inv: torch.Tensor | None = None,
    w2_scale_inv: torch.Tensor | None = None,
    scale_fmt: str | None = None,
) -> torch.Tensor:
    """The routed experts of a routing plan: ``y[t] = Σ_j weights[t, j] · w2_e · swiglu(w13_e · x[t])``
    with ``e`` the plan's expert of slot (t, j) (skipped slots add nothing), as
    permute -> grouped GEMM -> swiglu -> grouped GEMM -> unpermute of ``ops`` (``moela.kernels``
    or ``moela.reference``, from :func:`~moela.model.backend.ops_for`).

    x: (T, D); plan: ``ops.make_routing(ids, E)``; weights: (T, k) float or None (unit weights);
    w13: (E, 2I, D), each expert's gate projection (rows ``[0, I)``) over its up projection;
    w2: (E, D, I). FP8 experts: e4m3 ``w13``/``w2`` with their float32 128×128 block scales
    ``w13_scale_inv`` (E, ⌈2I/128⌉, ⌈D/128⌉) and ``w2_scale_inv`` (E, ⌈D/128⌉, ⌈I/128⌉); the
    activations are quantized on the fly (1×128 blocks, ``scale_fmt``) and the output is x's dtype.
    Returns (T, D) in x's dtype.
    """
    if (w13_scale_inv is None) != (w2_scale_inv is None):
        raise ValueError("w13_scale_inv, w2_scale_inv: expected both (FP8 experts) or neither, got "
                         f"{type(w13_scale_inv).__name__} and {type(w2_scale_inv).__name__}")
    check_tensor("w13", w13, ndim=3)
    I = w13.shape[1] // 2
    if w13.shape[1] != 2 * I:
        raise ValueError(f"w13: expected shape (E, 2I, D) with an even middle dim, got {tuple(w13.shape)}")
    if w13_scale_inv is not None:  # activations quantized while they are dispatched (one quantization per token)
        q, s = ops.permute(x, plan, fp8=True, scale_fmt=scale_fmt)  # (M, D) e4m3, (M, D/128)
        h = ops.fp8_grouped_gemm(q, s, w13, w13_scale_inv, plan.offsets, out_dtype=x.dtype)
        q, s = ops.swiglu(h[:, :I], h[:, I:], fp8=True, block=_BLOCK, scale_fmt=scale_fmt)  # quantized in one pass
        ys = ops.fp8_grouped_gemm(q, s, w2, w2_scale_inv, plan.offsets, out_dtype=x.dtype)
    else:
        xs = ops.permute(x, plan)  # (M, D)
        h = ops.grouped_gemm(xs, w13, plan.offsets)  # (M, 2I)
        act = ops.swiglu(h[:, :I], h[:, I:]).contiguous()  # (M, I); the kernel's is contiguous already
        ys = ops.grouped_gemm(act, w2, plan.offsets)  # (M, D)
    return ops.unpermute(ys, plan, weights)  # (T, D)


class MoE(nn.Module):
    """DeepSeek MoE: routed experts through grouped GEMMs, plus shared experts.

    Same parameters (by ``state_dict`` name) and the same numbers as ``moela.reference.MoE``;
    ``args.backend`` picks Triton kernels or references, ``args.dtype`` bf16 or fp8 experts.
    Training: the gate weight gets gradients; call :meth:`update_gate_bias` for DeepSeek's
    aux-loss-free balancing; ``seq_aux_alpha > 0`` leaves the sequence-wise balance loss in
    ``self.aux_loss`` after each forward.
    """

    def __init__(self, args: ModelArgs, seq_aux_alpha: float = 0.0):
        super().__init__()
        self.args = args
        self.seq_aux_alpha = seq_aux_alpha
        E, I, D = args.n_routed_experts, args.moe_inter_dim, args.dim
        self.fp8 = args.dtype == "fp8"
        if self.fp8 and (I % _BLOCK or D % _BLOCK):
            raise ValueError(f"dtype='fp8' needs moe_inter_dim and dim multiples of {_BLOCK} "
                             f"(128×128 weight blocks), got moe_inter_dim={I}, dim={D}")
        self.gate = Gate(args)
        w13, w2 = torch.empty(E, 2 * I, D), torch.empty(E, D, I)
        nn.init.normal_(w13, std=D**-0.5)
        nn.init.normal_(w2, std=I**-0.5)
        if self.fp8:  # quantized by the kernels when built on a GPU (V3's experts: 11e9 weights)
            quant_weight = ops_for(args.backend if w13.is_cuda else "reference", w13.device).quant_weight
            q13, s13 = quant_weight(w13)
            q2, s2 = quant_weight(w2)
            self.w13 = nn.Parameter(q13, requires_grad=False)
            self.w13_scale_inv = nn.Parameter(s13, requires_grad=False)
            self.w2 = nn.Parameter(q2, requires_grad=False)
            self.w2_scale_inv = nn.Parameter(s2, requires_grad=False)
        else:
            self.w13 = nn.Parameter(w13)
            self.w2 = nn.Parameter(w2)
        self.shared_experts = MLP(D, args.n_shared_experts * I) if args.n_shared_experts else None
        if self.fp8 and self.shared_experts is not None:
            quantize_linears_(self.shared_experts, args)
        self.register_buffer("expert_load", torch.zeros(E, dtype=torch.float32), persistent=False)
        self.aux_loss: torch.Tensor | None = None
        self.register_state_dict_post_hook(_experts_to_checkpoint)
        self.register_load_state_dict_pre_hook(_experts_from_checkpoint)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., D) -> (..., D); the leading dims are flattened into tokens."""
        a = self.args
        check_tensor("x", x, dtypes=FLOAT_DTYPES)
        if x.ndim == 0 or x.shape[-1] != a.dim:
            raise ValueError(f"x: expected a last dim of {a.dim}, got shape {tuple(x.shape)}")
        if x.device != self.w13.device:
            raise ValueError(f"x: expected device {self.w13.device} (the layer's), got {x.device}")
        if not self.fp8 and x.dtype != self.w13.dtype:
            raise TypeError(f"x: expected dtype {self.w13.dtype} (the layer's), got {x.dtype}")
        if self.fp8 and x.dtype not in _FP8_ACT_DTYPES:
            raise TypeError(f"x: the FP8 experts take bfloat16/float16/float32 activations, got {x.dtype}")
        shape, x2 = x.shape, x.reshape(-1, a.dim)
        ops = ops_for(a.backend, x.device)

        weights, ids = self.gate(x2)
        plan = ops.make_routing(ids, a.n_routed_experts)
        if self.fp8:
            y = routed_experts(ops, x2, plan, weights, self.w13, self.w2, w13_scale_inv=self.w13_scale_inv,
                               w2_scale_inv=self.w2_scale_inv, scale_fmt=a.scale_fmt)
        else:
            y = routed_experts(ops, x2, plan, weights, self.w13, self.w2)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x2)
        if self.training:
            self.expert_load += plan.tokens_per_expert.float()  # no host sync
            if self.seq_aux_alpha > 0:
                seq = shape[-2] if x.ndim >= 3 else x2.shape[0]
                self.aux_loss = self.seq_aux_alpha * sequence_balance_loss(self.gate.logits(x2), ids, a, seq)
        return y.view(shape)

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() move the FP8 experts but keep their dtypes, and the float32 load
        # counts of update_gate_bias (bf16 counts are inexact past 256 tokens per expert)
        keep = (self.expert_load, self.w13, self.w13_scale_inv, self.w2, self.w2_scale_inv) if self.fp8 else \
            (self.expert_load,)
        return super()._apply(keep_dtype(fn, keep), recurse)

    @torch.no_grad()
    def update_gate_bias(self, rate: float = 1e-3) -> None:
        """Aux-loss-free balancing (DeepSeek-V3): ``bias += rate · sign(mean load − load)`` from the
        loads counted since the last call, then reset the counts."""
        if self.gate.bias is None:
            raise ValueError("update_gate_bias: this config has no gate bias (gate_bias=False)")
        load = self.expert_load
        self.gate.bias += rate * torch.sign(load.mean() - load)
        load.zero_()

    def extra_repr(self) -> str:
        a = self.args
        return (f"experts={a.n_routed_experts}, k={a.n_activated_experts}, dim={a.dim}, "
                f"inter={a.moe_inter_dim}, dtype={a.dtype}, backend={a.backend}")


# ---------------------------------------------------------------------- checkpoint names
def _stacked_names(module: MoE) -> list[tuple[str, str]]:
    names = [("w13", "weight"), ("w2", "weight")]
    if module.fp8:
        names += [("w13_scale_inv", "weight_scale_inv"), ("w2_scale_inv", "weight_scale_inv")]
    return names


def _experts_to_checkpoint(module: MoE, state: dict, prefix: str, local_metadata: dict) -> None:
    """w13/w2 (stacked) -> experts.{i}.w1/w2/w3.weight (+ weight_scale_inv)."""
    I = module.args.moe_inter_dim
    split = I // _BLOCK if module.fp8 else I
    for attr, leaf in _stacked_names(module):
        t = state.pop(prefix + attr)
        half = split if attr.endswith("scale_inv") else I
        for i in range(t.shape[0]):
            if attr.startswith("w13"):
                state[f"{prefix}experts.{i}.w1.{leaf}"] = t[i, :half]
                state[f"{prefix}experts.{i}.w3.{leaf}"] = t[i, half:]
            else:
                state[f"{prefix}experts.{i}.w2.{leaf}"] = t[i]


def _experts_from_checkpoint(module: MoE, state: dict, prefix: str, local_metadata, strict, missing, unexpected,
                             errors) -> None:
    """experts.{i}.w1/w2/w3.weight (+ weight_scale_inv) -> w13/w2 (stacked)."""
    E = module.args.n_routed_experts
    for attr, leaf in _stacked_names(module):
        keys = ([(f"{prefix}experts.{i}.w1.{leaf}", f"{prefix}experts.{i}.w3.{leaf}") for i in range(E)]
                if attr.startswith("w13") else [(f"{prefix}experts.{i}.w2.{leaf}",) for i in range(E)])
        if not all(k in state for group in keys for k in group):
            continue  # left to load_state_dict's missing-key report (or an already-stacked state)
        rows = [torch.cat([state.pop(k) for k in group]) for group in keys]
        state[prefix + attr] = torch.stack(rows)
