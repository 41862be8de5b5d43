"""quant_act_dual(x[M,K]) -> (e4m3[M,K], s[M,⌈K/128⌉], e4m3[K,M], s_t[K,⌈M/128⌉]): both quantizations, one read.

Memory-bound: bytes = x read once (bf16), both e4m3 copies and both scales written. Baseline:
moela's two separate kernels (``quant_act`` and ``quant_act_t``: x read twice), the same outputs.
"""

from __future__ import annotations

import torch

from moela import reference as ref

from ..registry import Case, Impl, Op, register, resolve_kernel
from ..shapes import V3, Problem
from ._common import BLOCK, cdiv, exact, generator, randn
from ._fp8_train import TRAIN_TOKENS

OP = "quant_act_dual"


def problems(set_name: str, tokens, ks) -> list[Problem]:
    return [Problem(OP, set_name, f"K={k} T={t}", {"series": f"K={k}", "tokens": t, "k": k})
            for k in ks for t in tokens]


def make_case(p: Problem, device: torch.device, seed: int) -> Case:
    T, K = p.params["tokens"], p.params["k"]
    x = randn((T, K), torch.bfloat16, device, generator(device, seed))
    nbytes = T * K * 2 + 2 * T * K + (T * cdiv(K, BLOCK) + K * cdiv(T, BLOCK)) * 4
    return Case(p, {"x": x}, flops=0.0, bytes=float(nbytes))


def _two_kernels(case: Case):
    quant_act, quant_act_t = resolve_kernel("quant_act"), resolve_kernel("quant_act_t")
    x = case.inputs["x"]
    return lambda: (*quant_act(x), *quant_act_t(x))


D, I = V3.dim, V3.moe_inter_dim
SETS = {
    "tiny": [*problems("tiny", [5], [256]), *problems("tiny", [130], [200])],
    "check": problems("check", [300], [D, I]),
    "quick": problems("quick", [4096], [D]),
    "v3-train": problems("v3-train", TRAIN_TOKENS, [D, I, 2 * I]),
}

register(Op(
    name=OP,
    summary="FP8 1x128 and 128x1 quantization of one activation from one read",
    make_case=make_case,
    signature=lambda c: ((c.inputs["x"],), {}),
    reference=ref.quant_act_dual,
    shape_sets=SETS,
    compare=exact(),
    kernel="quant_act_dual",
    baselines=(Impl("moela quant_act + quant_act_t", _two_kernels, kind="moela",
                    note="the two quantizations as two kernels (x read twice)"),),
    baseline_order=("moela quant_act + quant_act_t", "reference"),
    compute="none",
))
