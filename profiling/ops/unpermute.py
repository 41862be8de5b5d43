"""unpermute(ys[M,D], plan, topk_weights[T,k]) -> y[T,D]: y[t] = Σ_j w[t,j]·ys[slot_to_row[t,j]].

FLOPs 2·T·k·D; bytes = ys read, y written, weights and slot_to_row read. Baseline:
``index_add_`` of the weighted rows into a float32 buffer (atomics: not deterministic).
"""

from __future__ import annotations

import torch

from moela import reference as ref

from ..registry import Case, Impl, Op, Unavailable, register
from ..shapes import CONFIGS, Problem
from ._common import close, generator, randn
from ._dispatch import plan_of, token_sets, topk_ids, topk_weights

OP = "unpermute"


def make_case(p: Problem, device: torch.device, seed: int) -> Case:
    args = CONFIGS[p.params["config"]]
    T, D, E, k = p.params["tokens"], args.dim, args.n_routed_experts, args.n_activated_experts
    plan = plan_of(topk_ids(p, device), E, p.params.get("align", 1))
    gen = generator(device, seed)
    M = plan.max_rows
    ys = randn((M, D), torch.bfloat16, device, gen)
    w = topk_weights(T, k, device, gen)
    nbytes = (M * D + T * D) * 2 + T * k * 8
    return Case(p, {"ys": ys, "plan": plan, "topk_weights": w}, flops=2.0 * T * k * D, bytes=float(nbytes),
                info={"rows": M, "dim": D})


def signature(case: Case) -> tuple[tuple, dict]:
    i = case.inputs
    return (i["ys"], i["plan"], i["topk_weights"]), {}


def _index_add(case: Case):
    ys, plan, w = case.inputs["ys"], case.inputs["plan"], case.inputs["topk_weights"]
    if bool((plan.row_to_token < 0).any()):
        raise Unavailable("the plan has padding rows")
    tok, slot = plan.row_to_token.long(), plan.row_to_slot.long()
    T, D = w.shape[0], ys.shape[1]

    def run():
        y = torch.zeros(T, D, dtype=torch.float32, device=ys.device)
        y.index_add_(0, tok, ys.float() * w.view(-1)[slot, None])
        return y.to(ys.dtype)

    return run


SETS = token_sets(OP)

register(Op(
    name=OP,
    summary="weighted combine of expert rows back to tokens",
    make_case=make_case,
    signature=signature,
    reference=ref.unpermute,
    shape_sets=SETS,
    compare=close(1e-5),
    kernel="unpermute",
    baselines=(Impl("torch index_add", _index_add, note="float32 index_add_ of weighted rows"),),
    baseline_order=("torch index_add", "reference"),
    compute="none",
))
