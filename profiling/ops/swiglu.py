"""swiglu(gate[M,N], up[M,N]) -> silu(gate) * up [M,N]: the activation between the expert GEMMs.

gate and up are the two column halves of one (M, 2N) bf16 tensor, as the first grouped GEMM
writes them; M = T·k expert rows of V3 (k = 8), N = moe_inter_dim. Memory-bound: bytes = both
halves read and the product written (3·M·N·2), the fewest a fused kernel moves; the reference
(``F.silu`` then ``*``, two torch kernels) moves 5·M·N·2. FLOPs are not counted.
"""

from __future__ import annotations

import torch

from moela import reference as ref

from ..registry import Case, Op, register
from ..shapes import DECODE_TOKENS, PREFILL_TOKENS, V3, Problem
from ._common import close, generator, randn

OP = "swiglu"


def problems(set_name: str, tokens, n: int, k: int = V3.n_activated_experts) -> list[Problem]:
    return [Problem(OP, set_name, f"N={n} T={t}", {"series": f"N={n} k={k}", "tokens": t, "rows": t * k, "n": n})
            for t in tokens]


def make_case(p: Problem, device: torch.device, seed: int) -> Case:
    M, N = p.params["rows"], p.params["n"]
    h = randn((M, 2 * N), torch.bfloat16, device, generator(device, seed))
    return Case(p, {"gate": h[:, :N], "up": h[:, N:]}, flops=0.0, bytes=float(3 * M * N * 2))


def signature(case: Case) -> tuple[tuple, dict]:
    return (case.inputs["gate"], case.inputs["up"]), {}


I = V3.moe_inter_dim
SETS = {
    "tiny": problems("tiny", [3], 96, k=2),
    "check": problems("check", [77], I),
    "quick": problems("quick", [1, 4096], I),
    "v3-decode": problems("v3-decode", DECODE_TOKENS, I),
    "v3-prefill": problems("v3-prefill", PREFILL_TOKENS, I),
}

register(Op(
    name=OP,
    summary="SwiGLU activation, silu(gate) * up, one fused pass",
    make_case=make_case,
    signature=signature,
    reference=ref.swiglu,
    shape_sets=SETS,
    compare=close(1e-6),
    kernel="swiglu",
    compute="none",
))
