"""quant_act(x[...,K], block=128, scale_fmt=None) -> (e4m3[...,K], scale[...,⌈K/128⌉] f32).

Memory-bound: bytes = x read (bf16), values (1 byte) and scales written. No torch-native
baseline beyond the reference itself (which is the amax/divide/cast composition in torch).
"""

from __future__ import annotations

import torch

from moela import reference as ref

from ..registry import Case, Op, register
from ..shapes import DECODE_TOKENS, PREFILL_TOKENS, V3, Problem
from ._common import BLOCK, cdiv, exact, generator, randn

OP = "quant_act"


def problems(set_name: str, tokens, ks, fmts=(None,)) -> list[Problem]:
    out = []
    for k in ks:
        for fmt in fmts:
            tag = f" {fmt}" if fmt else ""
            for t in tokens:
                out.append(Problem(OP, set_name, f"K={k} T={t}{tag}", {
                    "series": f"K={k}{tag}", "tokens": t, "k": k, "scale_fmt": fmt}))
    return out


def make_case(p: Problem, device: torch.device, seed: int) -> Case:
    T, K = p.params["tokens"], p.params["k"]
    x = randn((T, K), torch.bfloat16, device, generator(device, seed))
    nbytes = T * K * 2 + T * K + T * cdiv(K, BLOCK) * 4
    return Case(p, {"x": x, "scale_fmt": p.params.get("scale_fmt")}, flops=0.0, bytes=float(nbytes))


def signature(case: Case) -> tuple[tuple, dict]:
    return (case.inputs["x"],), {"block": BLOCK, "scale_fmt": case.inputs["scale_fmt"]}


D, I = V3.dim, V3.moe_inter_dim  # the inputs of the up/gate and of the down projection
SETS = {
    "tiny": [*problems("tiny", [5], [256]), *problems("tiny", [3], [200], [None, "ue8m0"])],
    "check": [*problems("check", [64], [D]), *problems("check", [77], [I], ["ue8m0"])],
    "quick": problems("quick", [128, 16384], [D]),
    "v3-decode": problems("v3-decode", DECODE_TOKENS, [D, I]),
    "v3-prefill": problems("v3-prefill", PREFILL_TOKENS, [D, I], [None, "ue8m0"]),
}

register(Op(
    name=OP,
    summary="FP8 activation quantization, 1x128 scales",
    make_case=make_case,
    signature=signature,
    reference=ref.quant_act,
    shape_sets=SETS,
    compare=exact(),
    kernel="quant_act",
    compute="none",
))
