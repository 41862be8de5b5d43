"""grouped_gemm(xs[M,K], w[E,N,K], offsets[E]) -> [M,N]: rows of group e multiply w[e]ᵀ.

FLOPs 2·M·N·K; bytes: xs and the output once, plus the weights of the experts that have rows.
Baselines: torch's grouped GEMM (CUTLASS, no host sync), a per-expert loop of torch.matmul,
and a dense matmul of equal FLOPs (what the grouped kernel would reach if grouping were free).
"""

from __future__ import annotations

import torch

from moela import reference as ref

from ..registry import Case, Impl, Op, register
from ..shapes import (
    DECODE_TOKENS,
    PREFILL_TOKENS,
    V2_LITE,
    V3,
    Problem,
    deepgemm_grouped_problems,
    grouped_problem,
    moe_dims,
    moe_gemm_problems,
    sizes_from_params,
)
from ._common import DTYPES, close, expert_loop_runner, generator, grouped_mm_runner, offsets_of, randn
from ._outside import deepgemm_impls

OP = "grouped_gemm"
v3, v2l = moe_dims(V3, "v3"), moe_dims(V2_LITE, "v2lite")


def make_case(p: Problem, device: torch.device, seed: int) -> Case:
    prm = p.params
    dtype = DTYPES[prm.get("dtype", "bf16")]
    sizes = sizes_from_params(prm)
    E, N, K, M = len(sizes), prm["n"], prm["k"], sum(sizes)
    gen = generator(device, seed)
    xs = randn((M, K), dtype, device, gen)
    w = randn((E, N, K), dtype, device, gen, std=K**-0.5)
    active = sum(1 for s in sizes if s)
    es = xs.element_size()
    return Case(
        p, {"xs": xs, "w": w, "offsets": offsets_of(sizes, device), "sizes": tuple(sizes)},
        flops=2.0 * M * N * K, bytes=float((M * K + active * N * K + M * N) * es),
        info={"rows": M, "experts": E, "active_experts": active, "max_group_rows": max(sizes)},
    )


def signature(case: Case) -> tuple[tuple, dict]:
    i = case.inputs
    return (i["xs"], i["w"], i["offsets"]), {}


def _dense(case: Case):
    xs, w = case.inputs["xs"], case.inputs["w"]
    return lambda: torch.matmul(xs, w[0].T)


def _tiny(set_name: str) -> list[Problem]:
    tiny = [
        Problem(OP, set_name, f"E=4 n=48 k=64 T=8 {load}", {
            "series": f"tiny {load}", "tokens": 8, "experts": 4, "topk": 2, "load": load, "n": 48, "k": 64})
        for load in ("balanced", "zipf")
    ]
    return tiny + [grouped_problem(OP, set_name, "empty groups [0,5,0,11] n=48 k=64", [0, 5, 0, 11], 48, 64)]


SETS = {
    "tiny": _tiny("tiny"),
    "check": [
        *moe_gemm_problems(OP, "check", v2l, [64], ["zipf"], ["up"]),
        *moe_gemm_problems(OP, "check", v3, [1, 128], ["balanced"], ["down"]),
        grouped_problem(OP, "check", "odd E=7 n=200 k=136", [0, 33, 1, 0, 70, 5, 2], 200, 136),
    ],
    "quick": [
        *moe_gemm_problems(OP, "quick", v3, [128, 4096], ["balanced"], ["up"]),
        *deepgemm_grouped_problems(OP, "quick", ["contiguous 4x8192"]),
    ],
    "deepgemm-grouped": deepgemm_grouped_problems(OP, "deepgemm-grouped"),
    "v3-decode": moe_gemm_problems(OP, "v3-decode", v3, DECODE_TOKENS),
    "v3-prefill": moe_gemm_problems(OP, "v3-prefill", v3, PREFILL_TOKENS),
    "v2lite-decode": moe_gemm_problems(OP, "v2lite-decode", v2l, DECODE_TOKENS),
    "v2lite-prefill": moe_gemm_problems(OP, "v2lite-prefill", v2l, PREFILL_TOKENS),
}

register(Op(
    name=OP,
    summary="grouped expert GEMM, bf16",
    make_case=make_case,
    signature=signature,
    reference=ref.grouped_gemm,
    shape_sets=SETS,
    compare=close(1e-5),
    kernel="grouped_gemm",
    baselines=(
        Impl("torch grouped_mm", lambda c: grouped_mm_runner(c.inputs["xs"], c.inputs["w"], c.inputs["offsets"]),
             note="F.grouped_mm / torch._grouped_mm"),
        Impl("torch loop", lambda c: expert_loop_runner(c.inputs["xs"], c.inputs["w"], c.inputs["sizes"]),
             note="per-expert torch.matmul"),
        Impl("torch dense", _dense, same_function=False, note="one (M,K)x(K,N) matmul of equal FLOPs"),
        *deepgemm_impls(OP),
    ),
    baseline_order=("torch grouped_mm", "torch loop", "reference"),
    compute="bf16",
    warm_alone=True,
))
