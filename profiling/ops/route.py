"""route(logits[T,E], bias[E]|None, *, topk, n_groups, topk_groups, score_func, route_scale)
-> (topk_weights[T,k] f32, topk_ids[T,k] i32): DeepSeek routing from router logits.

Memory-bound: bytes = logits + bias read, weights and ids written; no FLOPs counted.
Baseline: ``torch.topk`` of the scores, without groups, bias or the tie rule (a different,
simpler function: its speed is the floor a fused routing kernel competes with).
"""

from __future__ import annotations

import torch

from moela import reference as ref

from ..registry import Case, Impl, Op, register
from ..shapes import CONFIGS, Problem
from ._common import generator, ids_and_weights, randn
from ._dispatch import token_sets
from ._outside import sgl_kernel_impls

OP = "route"


def route_kwargs(args) -> dict:
    return {"topk": args.n_activated_experts, "n_groups": args.n_expert_groups,
            "topk_groups": args.n_limited_groups, "score_func": args.score_func, "route_scale": args.route_scale}


def make_case(p: Problem, device: torch.device, seed: int) -> Case:
    args = CONFIGS[p.params["config"]]
    T, E, k = p.params["tokens"], args.n_routed_experts, args.n_activated_experts
    gen = generator(device, seed)
    logits = randn((T, E), torch.float32, device, gen)
    bias = randn((E,), torch.float32, device, gen, std=0.1) if args.has_gate_bias else None
    nbytes = T * E * 4 + (E * 4 if bias is not None else 0) + T * k * 8
    return Case(p, {"logits": logits, "bias": bias, "args": args}, flops=0.0, bytes=float(nbytes),
                info={"experts": E, "topk": k})


def signature(case: Case) -> tuple[tuple, dict]:
    i = case.inputs
    return (i["logits"], i["bias"]), route_kwargs(i["args"])


def _topk(case: Case):
    logits, args = case.inputs["logits"], case.inputs["args"]
    k, sigmoid = args.n_activated_experts, args.score_func == "sigmoid"
    return lambda: torch.topk(logits.sigmoid() if sigmoid else logits.softmax(-1), k, dim=-1)


SETS = token_sets(OP)

register(Op(
    name=OP,
    summary="DeepSeek routing from logits (groups, bias, top-k)",
    make_case=make_case,
    signature=signature,
    reference=ref.route,
    shape_sets=SETS,
    compare=ids_and_weights(1e-10),
    kernel="route",
    baselines=(Impl("torch topk", _topk, same_function=False, note="topk of the scores: no groups, no bias"),
               *sgl_kernel_impls(OP)),
    baseline_order=("torch topk", "reference"),
    compute="none",
))
