"""make_routing(topk_ids[T,k], n_experts, align=1) -> RoutingPlan: per-expert counts,
padded offsets, slot<->row maps.

Memory-bound: bytes = ids read; counts, offsets, slot_to_row, row_to_token and row_to_slot
written (M = plan.max_rows rows). Baseline: the torch-native composition a MoE layer would
use instead (stable argsort + bincount + cumsum: the same information, another layout).
"""

from __future__ import annotations

import torch

from moela import reference as ref

from ..registry import Case, Impl, Op, register
from ..shapes import CONFIGS, DECODE_TOKENS, LOADS, PREFILL_TOKENS, Problem, token_problems
from ._common import exact
from ._dispatch import INVALID_EVERY, topk_ids

OP = "make_routing"


def make_case(p: Problem, device: torch.device, seed: int) -> Case:
    args = CONFIGS[p.params["config"]]
    E, k, T, align = args.n_routed_experts, args.n_activated_experts, p.params["tokens"], p.params.get("align", 1)
    ids = topk_ids(p, device)
    M = ref.max_rows(T, k, E, align)
    nbytes = T * k * 4 + 2 * E * 4 + T * k * 4 + 2 * M * 4
    return Case(p, {"topk_ids": ids, "n_experts": E, "align": align}, flops=0.0, bytes=float(nbytes),
                info={"max_rows": M})


def signature(case: Case) -> tuple[tuple, dict]:
    i = case.inputs
    return (i["topk_ids"], i["n_experts"]), {"align": i["align"]}


def _argsort(case: Case):
    ids, E = case.inputs["topk_ids"], case.inputs["n_experts"]

    def run():
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)  # sorted position -> slot
        counts = torch.bincount(flat.long().clamp(min=0), minlength=E)
        return order, counts.cumsum(0)

    return run


SETS = {
    "tiny": [*token_problems(OP, "tiny", ["tiny"], [8, 33]),
             *token_problems(OP, "tiny", ["tiny"], [13], align=4, **{INVALID_EVERY: 5})],
    "check": [*token_problems(OP, "check", ["v3", "v2lite"], [64, 1000], LOADS),
              *token_problems(OP, "check", ["v3"], [777], align=128, **{INVALID_EVERY: 7})],
    "quick": token_problems(OP, "quick", ["v3"], [128, 16384]),
    "v3-decode": token_problems(OP, "v3-decode", ["v3"], DECODE_TOKENS, LOADS),
    "v3-prefill": [*token_problems(OP, "v3-prefill", ["v3"], PREFILL_TOKENS, LOADS),
                   *token_problems(OP, "v3-prefill", ["v3"], PREFILL_TOKENS, align=128)],
    "v2lite-decode": token_problems(OP, "v2lite-decode", ["v2lite"], DECODE_TOKENS, LOADS),
    "v2lite-prefill": token_problems(OP, "v2lite-prefill", ["v2lite"], PREFILL_TOKENS, LOADS),
}

register(Op(
    name=OP,
    summary="routing plan: counts, padded offsets, slot<->row maps",
    make_case=make_case,
    signature=signature,
    reference=ref.make_routing,
    shape_sets=SETS,
    compare=exact(),
    kernel="make_routing",
    baselines=(Impl("torch argsort", _argsort, same_function=False, note="stable argsort + bincount + cumsum"),),
    baseline_order=("torch argsort", "reference"),
    compute="none",
))
