"""permute(x[T,D], plan) -> xs[M,D]: token rows gathered into expert order (padding rows 0).

Memory-bound: bytes = x read once, xs written, row_to_token read. Baseline:
``x.index_select(0, row_to_token)`` (equal where the plan has no padding rows, as here).
"""

from __future__ import annotations

import torch

from moela import reference as ref

from ..registry import Case, Impl, Op, Unavailable, register
from ..shapes import CONFIGS, Problem
from ._common import exact, generator, randn
from ._dispatch import plan_of, token_sets, topk_ids

OP = "permute"


def make_case(p: Problem, device: torch.device, seed: int) -> Case:
    args = CONFIGS[p.params["config"]]
    T, D, E = p.params["tokens"], args.dim, args.n_routed_experts
    plan = plan_of(topk_ids(p, device), E, p.params.get("align", 1))
    x = randn((T, D), torch.bfloat16, device, generator(device, seed))
    M = plan.max_rows
    return Case(p, {"x": x, "plan": plan}, flops=0.0, bytes=float((T * D + M * D) * 2 + M * 4),
                info={"rows": M, "dim": D})


def signature(case: Case) -> tuple[tuple, dict]:
    return (case.inputs["x"], case.inputs["plan"]), {}


def _index_select(case: Case):
    x, plan = case.inputs["x"], case.inputs["plan"]
    if bool((plan.row_to_token < 0).any()):
        raise Unavailable("the plan has padding rows, which index_select would not zero")
    idx = plan.row_to_token.long()
    return lambda: x.index_select(0, idx)


SETS = token_sets(OP)

register(Op(
    name=OP,
    summary="gather token rows into expert order",
    make_case=make_case,
    signature=signature,
    reference=ref.permute,
    shape_sets=SETS,
    compare=exact(),
    kernel="permute",
    baselines=(Impl("torch index_select", _index_select),),
    baseline_order=("torch index_select", "reference"),
    compute="none",
))
