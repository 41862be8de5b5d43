"""grouped_gemm_masked(x[E,max_m,K], w[E,N,K], masked_m[E]) -> [E,max_m,N]: the masked layout.

Rows ``r < masked_m[e]`` of expert e compute ``x[e, r] · w[e]ᵀ``; the rest of the output is zeros.
FLOPs 2·Σ masked_m·N·K; bytes: the live rows of x, the weights of the experts with rows, the whole
output (its zero rows are written too).

Sets: DeepGEMM's masked benchmark (4 experts × 256 rows, N=7168, K=2048: full, and ragged), and
V3 decode under expert parallelism as DeepEP's low-latency mode lays it out: 8 ranks of T tokens
each, top-8 of 256 experts, one rank's 32 experts, max_m = 8·T (a rank's buffer holds every
token of every rank), masked_m drawn from the routing.

Baselines compute every padded row (they do not read masked_m): ``torch.bmm`` and torch's grouped
GEMM over the (E, max_m, K) batch; for the full DeepGEMM problem that is the same function.
"""

from __future__ import annotations

import torch

from moela import reference as ref

from ..registry import Case, Impl, Op, register
from ..shapes import DECODE_TOKENS, V3, Problem, expert_gemms, group_sizes, moe_dims, routing_ids
from ._common import DTYPES, close, generator, grouped_mm, probed, randn

OP = "grouped_gemm_masked"
v3 = moe_dims(V3, "v3")
EP_RANKS = 8


def _problem(set_name: str, name: str, masked_m: list[int], max_m: int, n: int, k: int, **extra) -> Problem:
    return Problem(OP, set_name, name, {"series": extra.pop("series", name), "masked_m": list(masked_m),
                                        "max_m": max_m, "n": n, "k": k, **extra})


def deepgemm_masked(set_name: str) -> list[Problem]:
    """DeepGEMM's masked 4 × 256, N=7168, K=2048: every row live, and a ragged fill."""
    return [_problem(set_name, "deepgemm masked 4x256", [256] * 4, 256, 7168, 2048),
            _problem(set_name, "deepgemm masked 4x256 ragged", [256, 171, 64, 1], 256, 7168, 2048)]


def v3_decode(set_name: str, tokens=DECODE_TOKENS, which=("up", "down")) -> list[Problem]:
    """One rank's 32 experts of V3 under 8-way expert parallelism, T tokens per rank (module docstring)."""
    local = v3.experts // EP_RANKS
    out = []
    for T in tokens:
        counts = group_sizes(routing_ids(T * EP_RANKS, v3.experts, v3.topk, "balanced"), v3.experts)[:local]
        for label, n, k in expert_gemms(v3):
            if label in which:
                out.append(_problem(set_name, f"v3 {label} T={T}", counts, EP_RANKS * T, n, k,
                                    series=f"v3 {label}", tokens=T))
    return out


def make_case(p: Problem, device: torch.device, seed: int) -> Case:
    prm = p.params
    dtype = DTYPES[prm.get("dtype", "bf16")]
    masked_m, max_m, N, K = prm["masked_m"], prm["max_m"], prm["n"], prm["k"]
    E = len(masked_m)
    gen = generator(device, seed)
    x = randn((E, max_m, K), dtype, device, gen)
    w = randn((E, N, K), dtype, device, gen, std=K**-0.5)
    rows = sum(min(max(m, 0), max_m) for m in masked_m)
    active = sum(1 for m in masked_m if m > 0)
    es = x.element_size()
    return Case(
        p, {"x": x, "w": w, "masked_m": torch.tensor(masked_m, dtype=torch.int32, device=device)},
        flops=2.0 * rows * N * K, bytes=float((rows * K + active * N * K + E * max_m * N) * es),
        info={"rows": rows, "experts": E, "active_experts": active, "max_m": max_m},
    )


def signature(case: Case) -> tuple[tuple, dict]:
    i = case.inputs
    return (i["x"], i["w"], i["masked_m"]), {}


def _bmm(case: Case):
    x, w = case.inputs["x"], case.inputs["w"]
    return lambda: torch.bmm(x, w.transpose(1, 2))


def _grouped_mm(case: Case):
    fn, name = grouped_mm()
    x, w = case.inputs["x"], case.inputs["w"]
    return probed(lambda: fn(x, w.transpose(1, 2)), f"{name} (3-D batch)")


SETS = {
    "tiny": [_problem("tiny", "E=3 max_m=24 n=48 k=64", [5, 0, 24], 24, 48, 64),
             _problem("tiny", "E=2 max_m=16 n=32 k=32 out-of-range", [40, 3], 16, 32, 32)],
    "check": [*deepgemm_masked("check"), *v3_decode("check", (1, 64), ("down",))],
    "quick": [deepgemm_masked("quick")[0], *v3_decode("quick", (16,), ("up",))],
    "deepgemm-masked": deepgemm_masked("deepgemm-masked"),
    "v3-decode": v3_decode("v3-decode"),
}

register(Op(
    name=OP,
    summary="grouped expert GEMM over the masked layout (DeepEP low-latency), bf16",
    make_case=make_case,
    signature=signature,
    reference=ref.grouped_gemm_masked,
    shape_sets=SETS,
    compare=close(1e-5),
    kernel="grouped_gemm_masked",
    baselines=(
        Impl("torch bmm", _bmm, same_function=False, note="every padded row (equal to the op when all are live)"),
        Impl("torch grouped_mm", _grouped_mm, same_function=False, note="3-D batch: every padded row"),
    ),
    baseline_order=("torch grouped_mm", "torch bmm", "reference"),
    compute="bf16",
    warm_alone=True,
))
