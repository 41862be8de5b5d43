"""dequant(q, scale, block=128, out_dtype) -> q·scale with the scale broadcast over its blocks.

Memory-bound: bytes = values and scales read, the output written. Reference only.
"""

from __future__ import annotations

import torch

from moela import reference as ref

from ..registry import Case, Op, register
from ..shapes import PREFILL_TOKENS, V3, Problem
from ._common import BLOCK, DTYPES, cdiv, exact, generator, rand_fp8, rand_scale

OP = "dequant"


def act(set_name: str, tokens, k: int) -> list[Problem]:
    return [Problem(OP, set_name, f"act K={k} T={t}", {"series": f"act K={k}", "tokens": t, "rows": t, "k": k,
                                                      "layout": "act", "out": "bf16"}) for t in tokens]


def weight(set_name: str, n: int, k: int) -> Problem:
    return Problem(OP, set_name, f"weight {n}x{k}", {"series": "weight", "rows": n, "k": k, "layout": "weight",
                                                     "out": "bf16"})


def make_case(p: Problem, device: torch.device, seed: int) -> Case:
    R, K, layout = p.params["rows"], p.params["k"], p.params["layout"]
    gen = generator(device, seed)
    q = rand_fp8((R, K), device, gen)
    s_shape = (R, cdiv(K, BLOCK)) if layout == "act" else (cdiv(R, BLOCK), cdiv(K, BLOCK))
    scale = rand_scale(s_shape, device, gen, 1e-2)
    out = DTYPES[p.params["out"]]
    nbytes = R * K * (1 + torch.finfo(out).bits // 8) + scale.numel() * 4
    return Case(p, {"q": q, "scale": scale, "out_dtype": out}, flops=0.0, bytes=float(nbytes))


def signature(case: Case) -> tuple[tuple, dict]:
    i = case.inputs
    return (i["q"], i["scale"]), {"block": BLOCK, "out_dtype": i["out_dtype"]}


D = V3.dim
SETS = {
    "tiny": [*act("tiny", [5], 256), weight("tiny", 96, 200)],
    "check": [*act("check", [64], D), weight("check", 4096, D)],
    "quick": [*act("quick", [16384], D)],
    "deepseek": [*act("deepseek", PREFILL_TOKENS, D), weight("deepseek", 2 * V3.moe_inter_dim, D),
                 weight("deepseek", D, V3.moe_inter_dim)],
}

register(Op(
    name=OP,
    summary="FP8 dequantization (activation or weight scale layout)",
    make_case=make_case,
    signature=signature,
    reference=ref.dequant,
    shape_sets=SETS,
    compare=exact(),
    kernel="dequant",
    compute="none",
))
