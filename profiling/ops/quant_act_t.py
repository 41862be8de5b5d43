"""quant_act_t(x[M,K], block=128, scale_fmt=None) -> (e4m3[K,M], scale[K,⌈M/128⌉] f32).

The B×1 (token-direction) quantization of the wgrad operands, written transposed. Memory-bound:
bytes = x read (bf16), values (1 byte) and scales written. Baseline: the torch composition of a
transposing copy and moela's 1×128 ``quant_act`` kernel (two passes).
"""

from __future__ import annotations

import torch

from moela import reference as ref

from ..registry import Case, Impl, Op, register, resolve_kernel
from ..shapes import V3, Problem
from ._common import BLOCK, cdiv, exact, generator, randn
from ._fp8_train import TRAIN_TOKENS

OP = "quant_act_t"


def problems(set_name: str, tokens, ks, fmts=(None,)) -> list[Problem]:
    return [Problem(OP, set_name, f"K={k} T={t}{' ' + fmt if fmt else ''}", {
        "series": f"K={k}{' ' + fmt if fmt else ''}", "tokens": t, "k": k, "scale_fmt": fmt})
        for k in ks for fmt in fmts for t in tokens]


def make_case(p: Problem, device: torch.device, seed: int) -> Case:
    T, K = p.params["tokens"], p.params["k"]
    x = randn((T, K), torch.bfloat16, device, generator(device, seed))
    nbytes = T * K * 2 + T * K + K * cdiv(T, BLOCK) * 4
    return Case(p, {"x": x, "scale_fmt": p.params.get("scale_fmt")}, flops=0.0, bytes=float(nbytes))


def signature(case: Case) -> tuple[tuple, dict]:
    return (case.inputs["x"],), {"block": BLOCK, "scale_fmt": case.inputs["scale_fmt"]}


def _transpose_then_quant_act(case: Case):
    quant_act = resolve_kernel("quant_act")
    x, fmt = case.inputs["x"], case.inputs["scale_fmt"]
    return lambda: quant_act(x.t().contiguous(), BLOCK, fmt)


D, I = V3.dim, V3.moe_inter_dim
SETS = {
    "tiny": [*problems("tiny", [5], [256]), *problems("tiny", [130], [200], [None, "ue8m0"])],
    "check": [*problems("check", [300], [D]), *problems("check", [4096], [I], ["ue8m0"])],
    "quick": problems("quick", [4096], [D]),
    "v3-train": problems("v3-train", TRAIN_TOKENS, [D, I, 2 * I]),
}

register(Op(
    name=OP,
    summary="FP8 token-direction (128x1) quantization, written transposed",
    make_case=make_case,
    signature=signature,
    reference=ref.quant_act_t,
    shape_sets=SETS,
    compare=exact(),
    kernel="quant_act_t",
    baselines=(Impl("transpose + moela quant_act", _transpose_then_quant_act, kind="moela",
                    note="x.t().contiguous() then the 1x128 quant_act kernel"),),
    baseline_order=("transpose + moela quant_act", "reference"),
    compute="none",
))
