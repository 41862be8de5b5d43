"""quant_weight(w[...,N,K], block=128, scale_fmt=None) -> (e4m3, scale[...,⌈N/128⌉,⌈K/128⌉]).

Memory-bound: bytes = w read (bf16), values (1 byte) and scales written. Reference only.
"""

from __future__ import annotations

import torch

from moela import reference as ref

from ..registry import Case, Op, register
from ..shapes import V2_LITE, V3, Problem, expert_gemms, moe_dims
from ._common import BLOCK, cdiv, exact, generator, randn

OP = "quant_weight"


def problem(set_name: str, label: str, shape: tuple[int, ...], fmt: str | None = None) -> Problem:
    dims = "x".join(map(str, shape))
    tag = f" {fmt}" if fmt else ""
    return Problem(OP, set_name, f"{label} {dims}{tag}", {"series": label, "shape": list(shape), "scale_fmt": fmt})


def make_case(p: Problem, device: torch.device, seed: int) -> Case:
    shape = tuple(p.params["shape"])
    N, K = shape[-2:]
    lead = 1
    for s in shape[:-2]:
        lead *= s
    w = randn(shape, torch.bfloat16, device, generator(device, seed), std=K**-0.5)
    nbytes = lead * (N * K * 3 + cdiv(N, BLOCK) * cdiv(K, BLOCK) * 4)
    return Case(p, {"w": w, "scale_fmt": p.params.get("scale_fmt")}, flops=0.0, bytes=float(nbytes))


def signature(case: Case) -> tuple[tuple, dict]:
    return (case.inputs["w"],), {"block": BLOCK, "scale_fmt": case.inputs["scale_fmt"]}


(_, v3_up_n, v3_up_k), (_, v3_down_n, v3_down_k) = expert_gemms(moe_dims(V3, "v3"))
v2l = moe_dims(V2_LITE, "v2lite")
SETS = {
    "tiny": [problem("tiny", "odd", (96, 200)), problem("tiny", "experts", (3, 128, 256), "ue8m0")],
    "check": [problem("check", "v3 up", (v3_up_n, v3_up_k)), problem("check", "odd experts", (7, 200, 136))],
    "quick": [problem("quick", "v3 up", (v3_up_n, v3_up_k))],
    "deepseek": [
        problem("deepseek", "v3 up", (v3_up_n, v3_up_k)),
        problem("deepseek", "v3 down", (v3_down_n, v3_down_k)),
        problem("deepseek", "v3 wq_b", (V3.n_heads * V3.qk_head_dim, V3.q_lora_rank)),
        problem("deepseek", "v3 wkv_b", (V3.n_heads * (V3.qk_nope_head_dim + V3.v_head_dim), V3.kv_lora_rank)),
        problem("deepseek", "v2lite experts up", (v2l.experts, 2 * v2l.inter, v2l.dim)),
    ],
}

register(Op(
    name=OP,
    summary="FP8 weight quantization, 128x128 scales",
    make_case=make_case,
    signature=signature,
    reference=ref.quant_weight,
    shape_sets=SETS,
    compare=exact(),
    kernel="quant_weight",
    compute="none",
))
