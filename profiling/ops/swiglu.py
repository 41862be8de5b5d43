"""swiglu(gate[M,N], up[M,N]) -> silu(gate) * up [M,N]: the activation between the expert GEMMs.

gate and up are the two column halves of one (M, 2N) bf16 tensor, as the first grouped GEMM
writes them; M = T·k expert rows of V3 (k = 8), N = moe_inter_dim. Memory-bound: bytes = both
halves read and the product written (3·M·N·2), the fewest a fused kernel moves; the reference
(``F.silu`` then ``*``, two torch kernels) moves 5·M·N·2. FLOPs are not counted.
``fp8`` rows: the FP8 experts' activation, quantized in the same pass (1×128 e4m3 + float32
scales; the reference is ``quant_act`` of the torch product): bytes 2·M·N·2 read, M·N + scales
written.
"""

from __future__ import annotations

import torch

from moela import reference as ref

from ..registry import Case, Op, register
from ..shapes import DECODE_TOKENS, PREFILL_TOKENS, V3, Problem
from ._common import BLOCK, cdiv, close, generator, randn

OP = "swiglu"


def problems(set_name: str, tokens, n: int, k: int = V3.n_activated_experts, fp8: bool = False) -> list[Problem]:
    tag = " fp8" if fp8 else ""
    return [Problem(OP, set_name, f"N={n} T={t}{tag}", {"series": f"N={n} k={k}{tag}", "tokens": t, "rows": t * k,
                                                         "n": n, "fp8": fp8})
            for t in tokens]


def make_case(p: Problem, device: torch.device, seed: int) -> Case:
    M, N = p.params["rows"], p.params["n"]
    h = randn((M, 2 * N), torch.bfloat16, device, generator(device, seed))
    written = M * N + M * cdiv(N, BLOCK) * 4 if p.params["fp8"] else M * N * 2
    return Case(p, {"gate": h[:, :N], "up": h[:, N:], "fp8": p.params["fp8"]}, flops=0.0,
                bytes=float(2 * M * N * 2 + written))


def signature(case: Case) -> tuple[tuple, dict]:
    kwargs = {"fp8": True, "block": BLOCK} if case.inputs["fp8"] else {}
    return (case.inputs["gate"], case.inputs["up"]), kwargs


I = V3.moe_inter_dim
SETS = {
    "tiny": problems("tiny", [3], 96, k=2) + problems("tiny", [3], 256, k=2, fp8=True),
    "check": problems("check", [77], I) + problems("check", [77], I, fp8=True),
    "quick": problems("quick", [1, 4096], I),
    "v3-decode": problems("v3-decode", DECODE_TOKENS, I) + problems("v3-decode", DECODE_TOKENS, I, fp8=True),
    "v3-prefill": problems("v3-prefill", PREFILL_TOKENS, I) + problems("v3-prefill", PREFILL_TOKENS, I, fp8=True),
}

register(Op(
    name=OP,
    summary="SwiGLU activation, silu(gate) * up, one fused pass (optionally quantized to FP8)",
    make_case=make_case,
    signature=signature,
    reference=ref.swiglu,
    shape_sets=SETS,
    compare=close(1e-6),
    kernel="swiglu",
    compute="none",
))
