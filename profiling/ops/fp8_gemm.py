"""fp8_gemm(a[M,K], a_s[M,⌈K/128⌉], b[N,K], b_s[⌈N/128⌉,⌈K/128⌉], out_dtype=bf16) -> [M,N].

FLOPs 2·M·N·K; bytes: a, b (1 byte each), both scales, the bf16 output. Compared with the
emulated reference (near exact). Baselines: cuBLAS block-wise FP8 through ``F.scaled_mm``
(the same recipe, sm_90), ``torch._scaled_mm`` with per-tensor scales (a cheaper recipe: the
fastest FP8 GEMM torch has) and bf16 ``torch.matmul`` of the same shape.
"""

from __future__ import annotations

import torch

from moela import reference as ref

from ..registry import Case, Impl, Op, register
from ..shapes import DEEPGEMM_DENSE, Problem
from ._common import (
    BLOCK,
    cdiv,
    close,
    generator,
    rand_fp8,
    rand_scale,
    scaled_mm_blockwise_runner,
    scaled_mm_tensorwise_runner,
)
from ._outside import deepgemm_impls, sgl_kernel_impls

OP = "fp8_gemm"


def problem(set_name: str, m: int, n: int, k: int) -> Problem:
    return Problem(OP, set_name, f"m={m} n={n} k={k}", {"series": f"n={n} k={k}", "tokens": m, "m": m, "n": n, "k": k})


def make_case(p: Problem, device: torch.device, seed: int) -> Case:
    M, N, K = p.params["m"], p.params["n"], p.params["k"]
    gen = generator(device, seed)
    a, b = rand_fp8((M, K), device, gen), rand_fp8((N, K), device, gen)
    a_s = rand_scale((M, cdiv(K, BLOCK)), device, gen, 1e-2)
    # column-major (M-major): the layout cuBLAS block-wise takes and moela's GEMMs read fastest, so every
    # row of the table reads the same scales the same way
    a_s = a_s.t().contiguous().t()
    b_s = rand_scale((cdiv(N, BLOCK), cdiv(K, BLOCK)), device, gen, 1e-2 * K**-0.5)
    nbytes = M * K + N * K + (a_s.numel() + b_s.numel()) * 4 + M * N * 2
    return Case(p, {"a": a, "a_s": a_s, "b": b, "b_s": b_s}, flops=2.0 * M * N * K, bytes=float(nbytes))


def signature(case: Case) -> tuple[tuple, dict]:
    i = case.inputs
    return (i["a"], i["a_s"], i["b"], i["b_s"]), {"out_dtype": torch.bfloat16}


def _bf16(case: Case):
    a, b = case.inputs["a"].to(torch.bfloat16), case.inputs["b"].to(torch.bfloat16)
    return lambda: torch.matmul(a, b.T)


def _blockwise(case: Case):
    i = case.inputs
    return scaled_mm_blockwise_runner(i["a"], i["a_s"], i["b"], i["b_s"], torch.bfloat16)


def _tensorwise(case: Case):
    return scaled_mm_tensorwise_runner(case.inputs["a"], case.inputs["b"], torch.bfloat16)


V3_LINEAR_M = (1, 16, 256, 1024, 8192, 16384)
SETS = {
    "tiny": [problem("tiny", 16, 128, 256), problem("tiny", 5, 96, 384)],
    "check": [problem("check", 64, 2112, 7168), problem("check", 128, 7168, 2048), problem("check", 77, 4096, 7168)],
    "quick": [problem("quick", m, n, k) for m, n, k in ((64, 2112, 7168), (4096, 2112, 7168), (4096, 7168, 16384))],
    "deepgemm-dense": [problem("deepgemm-dense", m, n, k)
                       for n, k in DEEPGEMM_DENSE["nk"] for m in DEEPGEMM_DENSE["m"]],
    # The same (n, k): DeepSeek-V3's projections (wq_a+wkv_a, wq_b, wkv_b, wo, shared expert up, down).
    "v3-linear": [problem("v3-linear", m, n, k) for n, k in DEEPGEMM_DENSE["nk"] for m in V3_LINEAR_M],
}

register(Op(
    name=OP,
    summary="block-scaled FP8 GEMM (1x128 x 128x128)",
    make_case=make_case,
    signature=signature,
    reference=ref.fp8_gemm,
    shape_sets=SETS,
    compare=close(1e-5),
    kernel="fp8_gemm",
    baselines=(
        Impl("torch scaled_mm blockwise", _blockwise, note="cuBLAS BlockWise1x128 x BlockWise128x128"),
        Impl("torch scaled_mm tensorwise", _tensorwise, same_function=False, note="one scale per tensor"),
        Impl("torch matmul bf16", _bf16, same_function=False, note="bf16 GEMM of the same shape"),
        *deepgemm_impls(OP),
        *sgl_kernel_impls(OP),
    ),
    baseline_order=("torch scaled_mm blockwise", "torch matmul bf16", "reference"),
    compute="fp8",
    warm_alone=True,
))
