"""fp8_linear(x[M,K] bf16, weight[N,K] e4m3, weight_scale_inv[⌈N/128⌉,K/128], bias[N]|None) -> [M,N] bf16.

The FP8 projection of a model: quantize the activation 1×128 on the fly, then the block-scaled
GEMM. FLOPs 2·M·N·K; bytes: x (bf16), the e4m3 weight and its scales, the bf16 output. Compared
with the reference (near exact). Baselines: bf16 ``F.linear`` of the dequantized weight (what a
model without FP8 kernels runs) and torch's own composite, ``quant_act`` in torch then cuBLAS
block-wise FP8 through ``F.scaled_mm``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moela import reference as ref

from ..registry import Case, Impl, Op, register
from ..shapes import DEEPGEMM_DENSE, Problem
from ._common import BLOCK, cdiv, close, generator, probed, rand_fp8, rand_scale, randn, scaled_mm_blockwise_fn

OP = "fp8_linear"


def problem(set_name: str, m: int, n: int, k: int) -> Problem:
    return Problem(OP, set_name, f"m={m} n={n} k={k}", {"series": f"n={n} k={k}", "tokens": m, "m": m, "n": n, "k": k})


def make_case(p: Problem, device: torch.device, seed: int) -> Case:
    M, N, K = p.params["m"], p.params["n"], p.params["k"]
    gen = generator(device, seed)
    x = randn((M, K), torch.bfloat16, device, gen)
    w = rand_fp8((N, K), device, gen)
    w_s = rand_scale((cdiv(N, BLOCK), cdiv(K, BLOCK)), device, gen, 1e-2 * K**-0.5)
    nbytes = M * K * 2 + N * K + w_s.numel() * 4 + M * N * 2
    return Case(p, {"x": x, "weight": w, "weight_scale_inv": w_s}, flops=2.0 * M * N * K, bytes=float(nbytes))


def signature(case: Case) -> tuple[tuple, dict]:
    i = case.inputs
    return (i["x"], i["weight"], i["weight_scale_inv"]), {}


def _bf16(case: Case):
    i = case.inputs
    w = ref.dequant(i["weight"], i["weight_scale_inv"], BLOCK, torch.bfloat16)  # outside the timed region
    return lambda: F.linear(i["x"], w)


def _torch_composite(case: Case):
    i = case.inputs
    x, w, w_s = i["x"], i["weight"], i["weight_scale_inv"]
    gemm = scaled_mm_blockwise_fn(x.device, x.shape[1], torch.bfloat16)
    return probed(lambda: gemm(*ref.quant_act(x), w, w_s), "quant_act + F.scaled_mm block-wise")


SETS = {
    "tiny": [problem("tiny", 16, 128, 256), problem("tiny", 5, 96, 384)],
    "check": [problem("check", 64, 2112, 7168), problem("check", 77, 4096, 7168)],
    "quick": [problem("quick", m, n, k) for m, n, k in ((64, 2112, 7168), (4096, 2112, 7168))],
    "v3-linear": [problem("v3-linear", m, n, k) for n, k in DEEPGEMM_DENSE["nk"] for m in (1, 64, 4096)],
}

register(Op(
    name=OP,
    summary="FP8 linear: on-the-fly 1x128 activation quantization + block-scaled GEMM",
    make_case=make_case,
    signature=signature,
    reference=ref.fp8_linear,
    shape_sets=SETS,
    compare=close(1e-5),
    kernel="fp8_linear",
    baselines=(
        Impl("torch quant + scaled_mm blockwise", _torch_composite,
             note="reference quant_act in torch, then cuBLAS BlockWise1x128 x BlockWise128x128"),
        Impl("torch linear bf16", _bf16, same_function=False, note="bf16 F.linear of the dequantized weight"),
    ),
    baseline_order=("torch quant + scaled_mm blockwise", "torch linear bf16", "reference"),
    compute="fp8",
))
