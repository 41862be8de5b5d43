"""fp8_dgrad(dy[M,N], dy_s[M,⌈N/128⌉], w[N,K], w_s[⌈N/128⌉,⌈K/128⌉], out_dtype=bf16) -> dx[M,K].

The input gradient of V3's projections (DeepGEMM's dense (n, k) grid as forward shapes; the
reduction here is n). FLOPs 2·M·N·K; bytes: dy and w (1 byte each), their scales, the bf16 dx.
Baselines: cuBLAS block-wise FP8 through ``F.scaled_mm`` on a transposed copy of the weight (the
same function; the copy made outside the timed region) and bf16 ``torch.matmul`` (dy · W).
"""

from __future__ import annotations

import torch

from moela import reference as ref

from ..registry import Case, Impl, Op, register
from ..shapes import Problem
from ._common import BLOCK, cdiv, close, generator, rand_fp8, rand_scale, scaled_mm_blockwise_runner
from ._fp8_train import TRAIN_TOKENS, dense_problems

OP = "fp8_dgrad"


def make_case(p: Problem, device: torch.device, seed: int) -> Case:
    M, N, K = p.params["m"], p.params["n"], p.params["k"]
    gen = generator(device, seed)
    dy, w = rand_fp8((M, N), device, gen), rand_fp8((N, K), device, gen)
    dy_s = rand_scale((M, cdiv(N, BLOCK)), device, gen, 1e-2)
    w_s = rand_scale((cdiv(N, BLOCK), cdiv(K, BLOCK)), device, gen, 1e-2 * N**-0.5)
    nbytes = M * N + N * K + (dy_s.numel() + w_s.numel()) * 4 + M * K * 2
    return Case(p, {"dy": dy, "dy_s": dy_s, "w": w, "w_s": w_s}, flops=2.0 * M * N * K, bytes=float(nbytes))


def signature(case: Case) -> tuple[tuple, dict]:
    i = case.inputs
    return (i["dy"], i["dy_s"], i["w"], i["w_s"]), {"out_dtype": torch.bfloat16}


def _cublas_transposed(case: Case):
    i = case.inputs
    w_t, w_s_t = i["w"].t().contiguous(), i["w_s"].t().contiguous()  # (K, N): the forward weight transposed
    return scaled_mm_blockwise_runner(i["dy"], i["dy_s"], w_t, w_s_t, torch.bfloat16)


def _bf16(case: Case):
    dy, w = case.inputs["dy"].to(torch.bfloat16), case.inputs["w"].to(torch.bfloat16)
    return lambda: torch.matmul(dy, w)


SETS = {
    "tiny": [*dense_problems(OP, "tiny", [16], [(256, 128)]), *dense_problems(OP, "tiny", [5], [(200, 96)])],
    "check": dense_problems(OP, "check", [128], [(2112, 7168), (7168, 2048)]),
    "quick": dense_problems(OP, "quick", [4096], [(2112, 7168), (7168, 16384)]),
    "v3-train": dense_problems(OP, "v3-train", TRAIN_TOKENS),
}

register(Op(
    name=OP,
    summary="FP8 dgrad GEMM dx = dy·W (128x128 weight blocks used transposed)",
    make_case=make_case,
    signature=signature,
    reference=ref.fp8_dgrad,
    shape_sets=SETS,
    compare=close(1e-5),
    kernel="fp8_dgrad",
    baselines=(
        Impl("torch scaled_mm blockwise", _cublas_transposed, note="cuBLAS 1x128 x 128x128 on a transposed copy of W"),
        Impl("torch matmul bf16", _bf16, same_function=False, note="bf16 dy·W of the same shape"),
    ),
    baseline_order=("torch scaled_mm blockwise", "torch matmul bf16", "reference"),
    compute="fp8",
    warm_alone=True,
))
