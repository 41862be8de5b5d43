"""gate(x[T,D], weight[E,D], bias[E]|None, args) -> (topk_weights[T,k], topk_ids[T,k]):
the router GEMM then DeepSeek routing (``route``).

FLOPs 2·T·E·D; bytes: x, the router weight, bias, weights and ids written.
Baseline: bf16 ``F.linear`` + sigmoid/softmax + ``torch.topk`` (no groups, no bias, no tie
rule: a simpler function, timed for its speed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moela import reference as ref

from ..registry import Case, Impl, Op, register
from ..shapes import CONFIGS, Problem
from ._common import generator, ids_and_weights, randn
from ._dispatch import token_sets

OP = "gate"


def make_case(p: Problem, device: torch.device, seed: int) -> Case:
    args = CONFIGS[p.params["config"]]
    T, E, D, k = p.params["tokens"], args.n_routed_experts, args.dim, args.n_activated_experts
    gen = generator(device, seed)
    x = randn((T, D), torch.bfloat16, device, gen)
    weight = randn((E, D), torch.bfloat16, device, gen, std=D**-0.5)
    bias = randn((E,), torch.float32, device, gen, std=0.1) if args.has_gate_bias else None
    nbytes = (T * D + E * D) * 2 + (E * 4 if bias is not None else 0) + T * k * 8
    return Case(p, {"x": x, "weight": weight, "bias": bias, "args": args}, flops=2.0 * T * E * D,
                bytes=float(nbytes), info={"experts": E, "topk": k})


def signature(case: Case) -> tuple[tuple, dict]:
    i = case.inputs
    return (i["x"], i["weight"], i["bias"], i["args"]), {}


def _linear_topk(case: Case):
    x, w, args = case.inputs["x"], case.inputs["weight"], case.inputs["args"]
    k, sigmoid = args.n_activated_experts, args.score_func == "sigmoid"

    def run():
        logits = F.linear(x, w).float()
        return torch.topk(logits.sigmoid() if sigmoid else logits.softmax(-1), k, dim=-1)

    return run


SETS = token_sets(OP)

register(Op(
    name=OP,
    summary="router GEMM + DeepSeek routing",
    make_case=make_case,
    signature=signature,
    reference=ref.gate,
    shape_sets=SETS,
    compare=ids_and_weights(1e-8),
    kernel="gate",
    baselines=(Impl("torch linear+topk", _linear_topk, same_function=False,
                    note="bf16 F.linear, scores, torch.topk: no groups, no bias"),),
    baseline_order=("torch linear+topk", "reference"),
    compute="bf16",
))
