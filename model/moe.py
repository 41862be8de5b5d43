"""Drop-in DeepSeek MoE layer on the fast path: gate -> plan -> permute -> grouped GEMMs -> combine.

Legend: T tokens, D model dim, E routed experts, k experts per token, I expert hidden dim,
M rows after dispatch.

The routed experts are stored stacked for the grouped GEMM: ``w13 (E, 2I, D)`` holds each
expert's gate projection w1 (rows ``[0, I)``) over its up projection w3 (rows ``[I, 2I)``),
and ``w2 (E, D, I)`` the down projections. ``state_dict()`` still speaks DeepSeek's names
(``experts.{i}.w1.weight`` ...) through state-dict hooks, so checkpoints load unchanged. With
``args.dtype == "fp8"`` the stacked weights are e4m3 with 128×128 ``*_scale_inv`` blocks
(``experts.{i}.w1.weight_scale_inv`` in the checkpoint), activations are quantized on the fly.
With ``args.train_fp8`` the stacked weights are floating master weights and the routed experts
train in FP8 (``model.fp8_training.fp8_experts_train``: every GEMM of forward and backward in
e4m3, the weights re-quantized once per optimizer step), as do the shared experts (FP8Linear).

Expert parallelism: ``MoE(args, ep_group=group)`` holds only its rank's block of
``E / W`` experts (``state_dict`` names them by their global ids) and moves tokens with a
``moela.distributed`` dispatcher; the gate and the shared experts are replicated.

The forward never synchronises with the host: every shape is known from T, k and E (the
all-to-all dispatcher reads its split sizes once).
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moela.distributed import DISPATCHERS, ContiguousLayout, Dispatcher, MaskedLayout, from_masked, to_masked
from moela.reference import ModelArgs
from moela.reference._checks import FLOAT_DTYPES, accumulate_dtype, check_tensor
from moela.reference.dispatch import RoutingPlan
from moela.reference.moe import MLP

from .backend import ops_for
from .fp8_training import FP8WeightCache, fp8_experts_train
from .quantize import keep_dtype, quantize_linears_, uses_fp8_linears

__all__ = ["Gate", "MoE", "grouped_experts", "routed_experts", "sequence_balance_loss"]

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


def sequence_balance_loss(logits: torch.Tensor, ids: torch.Tensor, args: ModelArgs, seq_len: int | None,
                          *, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss (without its α factor).

    Per sequence of ``seq_len`` tokens: ``Σ_i f_i · P_i`` with ``f_i = E/(k·T) · #{t: i ∈ topk(t)}``
    and ``P_i = mean_t s'_{i,t}``, ``s'`` the scores normalised over all experts; averaged over
    sequences. logits: (B·seq_len, E); ids: (B·seq_len, k); ``seq_len=None``: all rows are one sequence.

    ``group``: the rows are this rank's share of a batch sharded over the group (expert
    parallelism); the result is this rank's share of that batch's loss (the shares sum to it, in
    value and gradient). With ``seq_len=None`` the one sequence spans the ranks: the expert
    loads and the token count are all-reduced; otherwise the mean runs over all ranks' sequences.
    """
    E, k = args.n_routed_experts, args.n_activated_experts
    scores = logits.softmax(-1) if args.score_func == "softmax" else logits.sigmoid()
    scores = scores / scores.sum(-1, keepdim=True)
    T = logits.shape[0]
    chosen = torch.zeros(T, E, device=logits.device).scatter_(1, ids.long(), 1.0)
    if group is not None and seq_len is None:
        stats = torch.cat([chosen.sum(0), chosen.new_full((1,), T)])  # the group's loads and token count
        dist.all_reduce(stats, group=group)
        f = stats[:E] * (E / k) / stats[E]
        return (f * (scores.sum(0) / stats[E])).sum()  # this rank's part of P_i = Σ_t s'_{i,t} / T_all
    seq = T if seq_len is None else seq_len
    B = T // seq
    f = chosen.view(B, seq, E).sum(1) * (E / (k * seq))  # (B, E)
    p = scores.view(B, seq, E).mean(1)  # (B, E)
    per_seq = (f * p).sum(-1)  # (B,)
    if group is None:
        return per_seq.mean()
    n_seqs = per_seq.new_full((1,), B)
    dist.all_reduce(n_seqs, group=group)
    return per_seq.sum() / n_seqs[0]


def grouped_experts(
    ops: ModuleType,
    xs: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    offsets: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    *,
    w13_scale_inv: torch.Tensor | None = None,
    w2_scale_inv: torch.Tensor | None = None,
    scale_fmt: str | None = None,
    fp8_cache: FP8WeightCache | None = None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """The experts on rows grouped by expert: ``ys = w2_e · swiglu(w13_e · xs)`` for the rows
    ``offsets[e-1]:offsets[e]``, with ``ops`` (``moela.kernels`` or ``moela.reference``, from
    :func:`~moela.model.backend.ops_for`).

    xs: (M, D), or for FP8 experts (e4m3 (M, D), scale (M, ⌈D/128⌉)) or (M, D) to quantize;
    w13: (E, 2I, D), each expert's gate projection (rows ``[0, I)``) over its up projection;
    w2: (E, D, I). FP8 experts: e4m3 ``w13``/``w2`` with float32 128×128 block scales
    ``w13_scale_inv`` (E, ⌈2I/128⌉, ⌈D/128⌉) and ``w2_scale_inv`` (E, ⌈D/128⌉, ⌈I/128⌉), the
    activations quantized on the fly (1×128 blocks, ``scale_fmt``). FP8 training (``fp8_cache``,
    the layer's :class:`~moela.model.fp8_training.FP8WeightCache`): ``w13``/``w2`` are floating
    master weights, xs (M, D) floating, and every GEMM of forward and backward runs in e4m3
    (:func:`~moela.model.fp8_training.fp8_experts_train`; the cache's scale format). Returns (M, D)
    in ``out_dtype``.
    """
    if fp8_cache is not None:
        if w13_scale_inv is not None or w2_scale_inv is not None:
            raise ValueError("fp8_cache: FP8 training takes floating master weights, not e4m3 ones with scales")
        return fp8_experts_train(xs, w13, w2, offsets, fp8_cache, ops).to(out_dtype)
    if (w13_scale_inv is None) != (w2_scale_inv is None):
        raise ValueError("w13_scale_inv, w2_scale_inv: expected both (FP8 experts) or neither, got "
                         f"{type(w13_scale_inv).__name__} and {type(w2_scale_inv).__name__}")
    check_tensor("w13", w13, ndim=3)
    I = w13.shape[1] // 2
    if w13.shape[1] != 2 * I:
        raise ValueError(f"w13: expected shape (E, 2I, D) with an even middle dim, got {tuple(w13.shape)}")
    if w13_scale_inv is not None:
        q, s = xs if isinstance(xs, tuple) else ops.quant_act(xs, _BLOCK, scale_fmt)
        h = ops.fp8_grouped_gemm(q, s, w13, w13_scale_inv, offsets, out_dtype=out_dtype)
        q, s = ops.swiglu(h[:, :I], h[:, I:], fp8=True, block=_BLOCK, scale_fmt=scale_fmt)  # quantized in one pass
        return ops.fp8_grouped_gemm(q, s, w2, w2_scale_inv, offsets, out_dtype=out_dtype)
    h = ops.grouped_gemm(xs, w13, offsets)  # (M, 2I)
    act = ops.swiglu(h[:, :I], h[:, I:]).contiguous()  # (M, I); the kernel's is contiguous already
    return ops.grouped_gemm(act, w2, offsets)  # (M, D)


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
    fp8_cache: FP8WeightCache | None = None,
) -> torch.Tensor:
    """The routed experts of a routing plan on one device: ``y[t] = Σ_j weights[t, j] · expert_e(x[t])``
    with ``e`` the plan's expert of slot (t, j) (skipped slots add nothing): permute ->
    :func:`grouped_experts` -> unpermute. x: (T, D); plan: ``ops.make_routing(ids, E)``; weights:
    (T, k) float or None (unit weights); the weights as :func:`grouped_experts` (FP8: the tokens
    are quantized once, while they are dispatched; FP8 training, ``fp8_cache``: dispatched in x's
    dtype, quantized by the experts' training function). Returns (T, D) in x's dtype.
    """
    fp8 = w13_scale_inv is not None
    xs = ops.permute(x, plan, fp8=True, scale_fmt=scale_fmt) if fp8 else ops.permute(x, plan)
    ys = grouped_experts(ops, xs, plan.offsets, w13, w2, w13_scale_inv=w13_scale_inv, w2_scale_inv=w2_scale_inv,
                         scale_fmt=scale_fmt, fp8_cache=fp8_cache, out_dtype=x.dtype)
    return ops.unpermute(ys, plan, weights)  # (T, D)


class MoE(nn.Module):
    """DeepSeek MoE: routed experts through grouped GEMMs, plus shared experts.

    Same parameters (by ``state_dict`` name) and the same numbers as ``moela.reference.MoE``;
    ``args.backend`` picks Triton kernels or references, ``args.dtype`` bf16 or fp8 experts.
    Training: the gate weight gets gradients; call :meth:`update_gate_bias` for DeepSeek's
    aux-loss-free balancing; ``seq_aux_alpha > 0`` leaves the sequence-wise balance loss in
    ``self.aux_loss`` after each forward.

    Expert parallelism (``ep_group``, a torch.distributed process group of W ranks): this rank
    holds experts ``local_experts = range(r·E/W, (r+1)·E/W)`` (``w13 (E/W, 2I, D)``...) and
    ``dispatcher`` moves the tokens: ``"all_to_all"`` (each rank brings its own tokens: training,
    prefill), ``"all_reduce"`` (every rank brings the same tokens: decode), ``"deep_ep"``, or a
    ``moela.distributed.Dispatcher``. The gate and the shared experts are replicated: build every
    rank from the same checkpoint or seed. ``state_dict`` holds only the local experts, under their
    global names; ``load_state_dict`` of a whole layer's state takes this rank's experts from it
    (``load_checkpoint(layer, path)`` likewise: it skips the other ranks' experts). With the
    token-sharding dispatchers a replicated parameter gets this rank's share of its gradient (sum
    them over the group, as data parallelism does); :meth:`update_gate_bias` and the balance loss
    use the whole group's expert loads.
    """

    def __init__(self, args: ModelArgs, seq_aux_alpha: float = 0.0, *, ep_group: dist.ProcessGroup | None = None,
                 dispatcher: str | Dispatcher = "all_to_all"):
        super().__init__()
        self.args = args
        self.seq_aux_alpha = seq_aux_alpha
        self.ep_group = ep_group
        self.dispatcher = None if ep_group is None else _make_dispatcher(dispatcher, args.n_routed_experts, ep_group)
        self.local_experts = range(args.n_routed_experts) if self.dispatcher is None else self.dispatcher.experts
        E, I, D = len(self.local_experts), args.moe_inter_dim, args.dim
        self.fp8 = args.dtype == "fp8"
        if uses_fp8_linears(args) and (I % _BLOCK or D % _BLOCK):
            what = "dtype='fp8'" if self.fp8 else "train_fp8=True"
            raise ValueError(f"{what} needs moe_inter_dim and dim multiples of {_BLOCK} "
                             f"(128×128 weight blocks), got moe_inter_dim={I}, dim={D}")
        self.fp8_cache = FP8WeightCache(_BLOCK, args.scale_fmt) if args.train_fp8 else None
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
        if uses_fp8_linears(args) and self.shared_experts is not None:
            quantize_linears_(self.shared_experts, args)
        # tokens routed to each of the E experts since the last update_gate_bias (under EP: to this rank's)
        self.register_buffer("expert_load", torch.zeros(args.n_routed_experts, dtype=torch.float32),
                             persistent=False)
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
        if self.dispatcher is not None:
            y = self._expert_parallel(x2, weights, ids, ops)
        else:
            plan = ops.make_routing(ids, a.n_routed_experts)
            if self.fp8:  # activations quantized while they are dispatched (one quantization per token)
                xs = ops.permute(x2, plan, fp8=True, scale_fmt=a.scale_fmt)  # (M, D) e4m3, (M, D/128)
            else:
                xs = ops.permute(x2, plan)  # (M, D)
            y = ops.unpermute(self._experts(xs, plan.offsets, ops, x.dtype), plan, weights)  # (T, D)
            if self.training:
                self.expert_load += plan.tokens_per_expert.float()  # no host sync
        if self.shared_experts is not None:
            y = y + self.shared_experts(x2)
        if self.training and self.seq_aux_alpha > 0:
            sharded = self.dispatcher is not None and self.dispatcher.shards_tokens
            seq = shape[-2] if x.ndim >= 3 else None
            self.aux_loss = self.seq_aux_alpha * sequence_balance_loss(
                self.gate.logits(x2), ids, a, seq, group=self.ep_group if sharded else None)
        return y.view(shape)

    def _experts(self, xs, offsets: torch.Tensor, ops, out_dtype: torch.dtype) -> torch.Tensor:
        """The routed experts on rows grouped by expert: xs (M, D), or (e4m3, scale) for FP8 -> (M, D)."""
        if self.fp8_cache is not None:  # FP8 training: every GEMM of forward and backward in e4m3
            return grouped_experts(ops, xs, offsets, self.w13, self.w2, fp8_cache=self.fp8_cache, out_dtype=out_dtype)
        if self.fp8:
            return grouped_experts(ops, xs, offsets, self.w13, self.w2, w13_scale_inv=self.w13_scale_inv,
                                   w2_scale_inv=self.w2_scale_inv, scale_fmt=self.args.scale_fmt, out_dtype=out_dtype)
        return grouped_experts(ops, xs, offsets, self.w13, self.w2, out_dtype=out_dtype)

    def _expert_parallel(self, x2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, ops) -> torch.Tensor:
        """Dispatch to the experts' ranks, run the local experts, combine: (T, D) -> (T, D)."""
        xs, layout, handle = self.dispatcher.dispatch(x2, weights, ids, ops=ops)
        if isinstance(layout, MaskedLayout):  # as contiguous rows, until a masked grouped GEMM takes the blocks
            E_l, max_m = xs.shape[:2]
            rows = ContiguousLayout(torch.cumsum(layout.tokens_per_expert, 0, dtype=torch.int32),
                                    layout.tokens_per_expert)
            ys = self._experts(from_masked(xs, rows, E_l * max_m), rows.offsets, ops, x2.dtype)
            ys = to_masked(ys, rows, max_m)[0]
        else:
            ys = self._experts(xs, layout.offsets, ops, x2.dtype)
        if self.training:  # this rank counts its own experts' rows; update_gate_bias sums over the group
            first = self.local_experts.start
            self.expert_load[first:first + len(self.local_experts)] += layout.tokens_per_expert.float()
        return self.dispatcher.combine(ys, handle)

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() move the FP8 experts but keep their dtypes, and the float32 load
        # counts of update_gate_bias (bf16 counts are inexact past 256 tokens per expert)
        keep = (self.expert_load, self.w13, self.w13_scale_inv, self.w2, self.w2_scale_inv) if self.fp8 else \
            (self.expert_load,)
        return super()._apply(keep_dtype(fn, keep), recurse)

    @torch.no_grad()
    def update_gate_bias(self, rate: float = 1e-3) -> None:
        """Aux-loss-free balancing (DeepSeek-V3): ``bias += rate · sign(mean load − load)`` from the
        loads counted since the last call, then reset the counts. Under expert parallelism the
        loads are all-reduced over the group first (a collective: every rank calls it), so every
        rank takes the same step, from the global loads."""
        if self.gate.bias is None:
            raise ValueError("update_gate_bias: this config has no gate bias (gate_bias=False)")
        load = self.expert_load
        if self.ep_group is not None:
            load = load.clone()
            dist.all_reduce(load, group=self.ep_group)
        self.gate.bias += rate * torch.sign(load.mean() - load)
        self.expert_load.zero_()

    @property
    def checkpoint_ignore(self) -> list[str]:
        """Regexes matching the keys of the experts other ranks hold (``[]`` without expert
        parallelism); ``load_checkpoint`` skips them, so each rank reads only its own experts."""
        others = [str(i) for i in range(self.args.n_routed_experts) if i not in self.local_experts]
        return [rf"(^|\.)experts\.({'|'.join(others)})\."] if others else []

    def extra_repr(self) -> str:
        a = self.args
        ep = "" if self.dispatcher is None else f", ep={self.dispatcher!r}"
        return (f"experts={a.n_routed_experts}, k={a.n_activated_experts}, dim={a.dim}, "
                f"inter={a.moe_inter_dim}, dtype={a.dtype}, backend={a.backend}{ep}")


def _make_dispatcher(dispatcher: str | Dispatcher, n_experts: int, group: dist.ProcessGroup) -> Dispatcher:
    """The dispatcher of ``MoE(ep_group=group, dispatcher=...)``: built from its name, or checked."""
    if isinstance(dispatcher, Dispatcher):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        if (dispatcher.n_experts, dispatcher.world, dispatcher.rank) != (n_experts, world, rank):
            raise ValueError(f"dispatcher: expected one for {n_experts} experts over the ep_group's {world} ranks "
                             f"(this one rank {rank}), got {dispatcher!r}")
        return dispatcher
    if dispatcher not in DISPATCHERS:
        raise ValueError(f"dispatcher: expected one of {sorted(DISPATCHERS)} or a moela.distributed.Dispatcher, "
                         f"got {dispatcher!r}")
    return DISPATCHERS[dispatcher](n_experts, group)


# ---------------------------------------------------------------------- checkpoint names
def _stacked_names(module: MoE) -> list[tuple[str, str]]:
    names = [("w13", "weight"), ("w2", "weight")]
    if module.fp8:
        names += [("w13_scale_inv", "weight_scale_inv"), ("w2_scale_inv", "weight_scale_inv")]
    return names


def _experts_to_checkpoint(module: MoE, state: dict, prefix: str, local_metadata: dict) -> None:
    """w13/w2 (stacked) -> experts.{i}.w1/w2/w3.weight (+ weight_scale_inv), i the global expert ids."""
    I = module.args.moe_inter_dim
    split = I // _BLOCK if module.fp8 else I
    for attr, leaf in _stacked_names(module):
        t = state.pop(prefix + attr)
        half = split if attr.endswith("scale_inv") else I
        for local, i in enumerate(module.local_experts):
            if attr.startswith("w13"):
                state[f"{prefix}experts.{i}.w1.{leaf}"] = t[local, :half]
                state[f"{prefix}experts.{i}.w3.{leaf}"] = t[local, half:]
            else:
                state[f"{prefix}experts.{i}.w2.{leaf}"] = t[local]


def _experts_from_checkpoint(module: MoE, state: dict, prefix: str, local_metadata, strict, missing, unexpected,
                             errors) -> None:
    """experts.{i}.w1/w2/w3.weight (+ weight_scale_inv) -> w13/w2 (stacked). Under expert
    parallelism the keys of other ranks' experts are dropped: a whole layer's state loads on every rank."""
    local = module.local_experts
    if len(local) != module.args.n_routed_experts:
        remote = {str(i) for i in range(module.args.n_routed_experts) if i not in local}
        head = f"{prefix}experts."
        for name in [k for k in state if k.startswith(head) and k[len(head):].split(".", 1)[0] in remote]:
            del state[name]
    for attr, leaf in _stacked_names(module):
        keys = ([(f"{prefix}experts.{i}.w1.{leaf}", f"{prefix}experts.{i}.w3.{leaf}") for i in local]
                if attr.startswith("w13") else [(f"{prefix}experts.{i}.w2.{leaf}",) for i in local])
        if not all(k in state for group in keys for k in group):
            continue  # left to load_state_dict's missing-key report (or an already-stacked state)
        rows = [torch.cat([state.pop(k) for k in group]) for group in keys]
        state[prefix + attr] = torch.stack(rows)
