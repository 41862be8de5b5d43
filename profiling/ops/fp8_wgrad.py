"""fp8_wgrad(dy_t[N,M], dy_t_s[N,⌈M/128⌉], x_t[K,M], x_t_s[K,⌈M/128⌉], out_dtype=f32) -> dW[N,K].

The weight gradient of V3's projections from the token-direction quantizations of dy and x
(DeepGEMM's dense (n, k) grid, M tokens of a training micro-batch as the reduction). FLOPs
2·M·N·K; bytes: both e4m3 operands and their scales, the float32 dW. Baselines: cuBLAS FP8 with
1×128 scales on both operands through ``F.scaled_mm`` (where this torch and GPU have it) and bf16
``torch.matmul`` (dyᵀ · x).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moela import reference as ref

from ..registry import Case, Impl, Op, Unavailable, register
from ..shapes import Problem
from ._common import BLOCK, cdiv, close, generator, need_cuda, probed, rand_fp8, rand_scale
from ._fp8_train import TRAIN_TOKENS, dense_problems

OP = "fp8_wgrad"


def make_case(p: Problem, device: torch.device, seed: int) -> Case:
    M, N, K = p.params["m"], p.params["n"], p.params["k"]
    gen = generator(device, seed)
    dy_t, x_t = rand_fp8((N, M), device, gen), rand_fp8((K, M), device, gen)
    dy_t_s = rand_scale((N, cdiv(M, BLOCK)), device, gen, 1e-2)
    x_t_s = rand_scale((K, cdiv(M, BLOCK)), device, gen, 1e-2 * M**-0.5)
    nbytes = (N + K) * M + (dy_t_s.numel() + x_t_s.numel()) * 4 + N * K * 4
    return Case(p, {"dy_t": dy_t, "dy_t_s": dy_t_s, "x_t": x_t, "x_t_s": x_t_s}, flops=2.0 * M * N * K,
                bytes=float(nbytes))


def signature(case: Case) -> tuple[tuple, dict]:
    i = case.inputs
    return (i["dy_t"], i["dy_t_s"], i["x_t"], i["x_t_s"]), {}


def _cublas_1x128_both(case: Case):
    i = case.inputs
    need_cuda(i["dy_t"].device, what="cuBLAS block-wise FP8 1x128 x 1x128", exactly=(9, 0))
    ScalingType = getattr(F, "ScalingType", None)
    if getattr(F, "scaled_mm", None) is None or ScalingType is None:
        raise Unavailable(f"torch {torch.__version__} has no F.scaled_mm with block-wise scaling types")
    bw = ScalingType.BlockWise1x128
    a, b = i["dy_t"], i["x_t"]
    a_s = i["dy_t_s"].t().contiguous().t()  # outer-dim-major scales, as cuBLAS reads them
    b_s = i["x_t_s"].t().contiguous().t()
    return probed(lambda: F.scaled_mm(a, b.t(), a_s, bw, b_s, bw, output_dtype=torch.float32),
                  "F.scaled_mm 1x128 x 1x128")


def _bf16(case: Case):
    dy_t, x_t = case.inputs["dy_t"].to(torch.bfloat16), case.inputs["x_t"].to(torch.bfloat16)
    return lambda: torch.matmul(dy_t, x_t.t())


SETS = {
    "tiny": [*dense_problems(OP, "tiny", [256], [(128, 128)]), *dense_problems(OP, "tiny", [130], [(96, 72)])],
    "check": dense_problems(OP, "check", [512], [(2112, 7168), (7168, 2048)]),
    "quick": dense_problems(OP, "quick", [4096], [(2112, 7168), (7168, 16384)]),
    "v3-train": dense_problems(OP, "v3-train", TRAIN_TOKENS),
}

register(Op(
    name=OP,
    summary="FP8 wgrad GEMM dW = dyᵀ·x (128x1 token blocks on both operands)",
    make_case=make_case,
    signature=signature,
    reference=ref.fp8_wgrad,
    shape_sets=SETS,
    compare=close(1e-5),
    kernel="fp8_wgrad",
    baselines=(
        Impl("torch scaled_mm 1x128 both", _cublas_1x128_both, note="cuBLAS block-wise, 1x128 scales on both"),
        Impl("torch matmul bf16", _bf16, same_function=False, note="bf16 dyᵀ·x of the same shape"),
    ),
    baseline_order=("torch scaled_mm 1x128 both", "torch matmul bf16", "reference"),
    compute="fp8",
    warm_alone=True,
))
