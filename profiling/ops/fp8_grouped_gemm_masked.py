"""fp8_grouped_gemm_masked(x[E,max_m,K], x_s, w[E,N,K], w_s, masked_m[E], out_dtype=bf16) -> [E,max_m,N].

FLOPs 2·Σ masked_m·N·K (the real rows); bytes: the real rows of x and their scales, the weights
and scales of experts with rows, the whole bf16 output (rows past masked_m are written as zeros).
Problems: DeepGEMM's masked 4 × 256 (N 7168, K 2048, every row real) and a DeepSeek-V3 decode
step on one expert-parallel rank (32 of the 256 experts, the rows V3's top-8 routing of T tokens
sends them, buffers of max_m = the largest count rounded up to 64). Baselines:
``torch._scaled_grouped_mm`` on the 3-D batch with row-wise scales (a cheaper recipe, every
max_m row computed) and a loop of cuBLAS block-wise ``F.scaled_mm`` over the experts with rows
(the same recipe; the counts are known on the host, so nothing synchronises while timed).
"""

from __future__ import annotations

import torch

from moela import reference as ref

from ..registry import Case, Impl, Op, Unavailable, register
from ..shapes import DEEPGEMM_GROUPED, V3, Problem, group_sizes, moe_dims, routing_ids
from ._common import BLOCK, cdiv, close, generator, need_cuda, probed, rand_fp8, rand_scale, scaled_mm_blockwise_fn

OP = "fp8_grouped_gemm_masked"
v3 = moe_dims(V3, "v3")
#: Experts on one rank of a V3 expert-parallel decode (EP = 8).
LOCAL_EXPERTS = 32


def problem(set_name: str, name: str, counts: list[int], max_m: int, n: int, k: int, **extra) -> Problem:
    return Problem(OP, set_name, name, {"series": extra.pop("series", name), "masked_m": list(counts),
                                         "max_m": max_m, "n": n, "k": k, **extra})


def deepgemm_masked(set_name: str) -> list[Problem]:
    return [problem(set_name, f"{label} n={n} k={k}", [rows] * groups, rows, n, k, series="deepgemm masked")
            for label, groups, rows, n, k in DEEPGEMM_GROUPED if label.startswith("masked")]


def v3_decode(set_name: str, tokens: tuple[int, ...], gemms: tuple[str, ...] = ("up", "down")) -> list[Problem]:
    """Rank 0 of EP = 8: the first 32 experts' rows when T tokens (all ranks) are routed top-8."""
    out = []
    for label, n, k in (("up", 2 * v3.inter, v3.dim), ("down", v3.dim, v3.inter)):
        if label not in gemms:
            continue
        for t in tokens:
            counts = group_sizes(routing_ids(t, v3.experts, v3.topk), v3.experts)[:LOCAL_EXPERTS]
            max_m = max(64, cdiv(max(counts), 64) * 64)
            out.append(problem(set_name, f"v3 {label} T={t} E={LOCAL_EXPERTS}", counts, max_m, n, k,
                               series=f"v3 decode {label}", tokens=t))
    return out


def make_case(p: Problem, device: torch.device, seed: int) -> Case:
    prm = p.params
    counts, max_m, N, K = prm["masked_m"], prm["max_m"], prm["n"], prm["k"]
    E = len(counts)
    gen = generator(device, seed)
    x, w = rand_fp8((E, max_m, K), device, gen), rand_fp8((E, N, K), device, gen)
    x_s = rand_scale((E, max_m, cdiv(K, BLOCK)), device, gen, 1e-2)
    w_s = rand_scale((E, cdiv(N, BLOCK), cdiv(K, BLOCK)), device, gen, 1e-2 * K**-0.5)
    rows, active = sum(counts), sum(1 for c in counts if c)
    nbytes = rows * (K + x_s.shape[2] * 4) + active * (N * K + w_s[0].numel() * 4) + E * max_m * N * 2
    return Case(p, {"x": x, "x_s": x_s, "w": w, "w_s": w_s,
                    "masked_m": torch.tensor(counts, dtype=torch.int32, device=device), "counts": tuple(counts)},
                flops=2.0 * rows * N * K, bytes=float(nbytes),
                info={"rows": rows, "experts": E, "active_experts": active, "max_m": max_m})


def signature(case: Case) -> tuple[tuple, dict]:
    i = case.inputs
    return (i["x"], i["x_s"], i["w"], i["w_s"], i["masked_m"]), {"out_dtype": torch.bfloat16}


def _rowwise(case: Case):
    need_cuda(case.inputs["x"].device, at_least=(9, 0), what="torch._scaled_grouped_mm")
    fn = getattr(torch, "_scaled_grouped_mm", None)
    if fn is None:
        raise Unavailable(f"torch {torch.__version__} has no torch._scaled_grouped_mm")
    i = case.inputs
    x, w = i["x"], i["w"]
    scale_a = i["x_s"][:, :, 0].contiguous()  # (E, max_m) one scale per row
    scale_b = i["w_s"][:, :, 0].repeat_interleave(BLOCK, dim=1)[:, : w.shape[1]].contiguous()  # (E, N)
    wt = w.transpose(-2, -1)  # (E, K, N) column-major
    return probed(lambda: fn(x, wt, scale_a, scale_b, out_dtype=torch.bfloat16), "torch._scaled_grouped_mm 3-D")


def _blockwise_loop(case: Case):
    i = case.inputs
    x, x_s, w, w_s = i["x"], i["x_s"], i["w"], i["w_s"]
    E, max_m, K = x.shape
    call = scaled_mm_blockwise_fn(x.device, K, torch.bfloat16)
    experts = [(e, m) for e, m in enumerate(i["counts"]) if m]

    def run() -> torch.Tensor:
        out = torch.zeros(E, max_m, w.shape[1], dtype=torch.bfloat16, device=x.device)
        for e, m in experts:
            out[e, :m] = call(x[e, :m], x_s[e, :m], w[e], w_s[e])
        return out

    return probed(run, "F.scaled_mm block-wise per expert")


def _tiny(set_name: str) -> list[Problem]:
    return [problem(set_name, "E=3 max_m=16 n=128 k=256 [5,0,16]", [5, 0, 16], 16, 128, 256),
            problem(set_name, "E=2 max_m=24 n=96 k=384 [24,1]", [24, 1], 24, 96, 384)]


SETS = {
    "tiny": _tiny("tiny"),
    "check": [*deepgemm_masked("check"), *v3_decode("check", (512,), ("down",))],
    "quick": [*deepgemm_masked("quick"), *v3_decode("quick", (1024,), ("up",))],
    "deepgemm-grouped": deepgemm_masked("deepgemm-grouped"),
    "v3-decode": v3_decode("v3-decode", (128, 512, 1024, 2048)),
}

register(Op(
    name=OP,
    summary="grouped expert GEMM in FP8, masked layout (DeepEP low-latency buffers)",
    make_case=make_case,
    signature=signature,
    reference=ref.fp8_grouped_gemm_masked,
    shape_sets=SETS,
    compare=close(1e-5),
    kernel="fp8_grouped_gemm_masked",
    baselines=(
        Impl("torch scaled_mm blockwise loop", _blockwise_loop, note="cuBLAS block-wise FP8 per expert with rows"),
        Impl("torch scaled_grouped_mm rowwise", _rowwise, same_function=False,
             note="row-wise FP8 scales on the 3-D batch (a cheaper recipe; every max_m row computed)"),
    ),
    baseline_order=("torch scaled_mm blockwise loop", "torch scaled_grouped_mm rowwise", "reference"),
    compute="fp8",
    warm_alone=True,
))
