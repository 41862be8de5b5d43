"""Shared pieces of the FP8 training ops' benchmarks (``quant_act_t``, ``quant_act_dual``,
``fp8_dgrad``, ``fp8_grouped_dgrad``, ``fp8_wgrad``, ``fp8_grouped_wgrad``): their shapes.

DeepSeek-V3's training GEMMs: each forward GEMM ``y (M, N) = x (M, K) · W (N, K)ᵀ`` of the
DeepGEMM dense grid (V3's projections) has a dgrad ``dx (M, K) = dy (M, N) · W`` (reduction N)
and a wgrad ``dW (N, K) = dyᵀ · x`` (reduction over the M tokens); the experts' GEMMs (up/gate
N = 2I, K = D; down N = D, K = I) have the grouped forms.
"""

from __future__ import annotations

from ..shapes import DEEPGEMM_DENSE, V3, Problem, moe_dims

__all__ = ["V3_DIMS", "TRAIN_TOKENS", "dense_problems"]

V3_DIMS = moe_dims(V3, "v3")
#: Tokens per GPU of a training micro-batch (V3 trained on sequences of 4096).
TRAIN_TOKENS = (4096, 8192)


def dense_problems(op: str, set_name: str, tokens, nks=None) -> list[Problem]:
    """One problem per forward (n, k) of DeepGEMM's dense grid and token count ``m``."""
    out = []
    for n, k in nks if nks is not None else DEEPGEMM_DENSE["nk"]:
        for m in tokens:
            out.append(Problem(op, set_name, f"m={m} n={n} k={k}", {
                "series": f"n={n} k={k}", "tokens": m, "m": m, "n": n, "k": k}))
    return out
