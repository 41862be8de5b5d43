"""fp8_grouped_wgrad(dy_t[N,M], dy_t_s, x_t[K,M], x_t_s, offsets[E], out_dtype=f32) -> dW[E,N,K].

The MoE experts' weight gradient, k-grouped (DeepGEMM's ``k_grouped_fp8_gemm_tn_contiguous``):
expert e reduces over its own tokens. V3's up/gate (N = 2I, K = D) and down (N = D, K = I) at
training token counts, each expert's rows padded to a multiple of 128 as
``make_routing(..., align=128)`` lays them out (DeepGEMM's layout), and DeepGEMM's grouped
shapes. FLOPs 2·M·N·K (padding rows included); bytes: both e4m3 operands and their scales, the
float32 dW of every expert. Baselines (speed only, bf16): torch's grouped GEMM with the groups
along the reduction (2-D × 2-D) and moela's bf16 ``grouped_gemm_dw``.
"""

from __future__ import annotations

import torch

from moela import reference as ref

from ..registry import Case, Impl, Op, register, resolve_kernel
from ..shapes import Problem, deepgemm_grouped_problems, grouped_problem, moe_gemm_problems, sizes_from_params
from ._common import BLOCK, cdiv, close, generator, grouped_mm, offsets_of, probed, rand_fp8, rand_scale
from ._fp8_train import TRAIN_TOKENS, V3_DIMS

OP = "fp8_grouped_wgrad"


def make_case(p: Problem, device: torch.device, seed: int) -> Case:
    prm = p.params
    sizes = sizes_from_params(prm)
    if prm.get("align", 1) > 1:
        sizes = [cdiv(s, prm["align"]) * prm["align"] for s in sizes]
    E, N, K, M = len(sizes), prm["n"], prm["k"], sum(sizes)
    gen = generator(device, seed)
    dy_t, x_t = rand_fp8((N, M), device, gen), rand_fp8((K, M), device, gen)
    dy_t_s = rand_scale((N, cdiv(M, BLOCK)), device, gen, 1e-2)
    x_t_s = rand_scale((K, cdiv(M, BLOCK)), device, gen, 1e-2 * max(M, 1) ** -0.5)
    nbytes = (N + K) * M + (dy_t_s.numel() + x_t_s.numel()) * 4 + E * N * K * 4
    return Case(p, {"dy_t": dy_t, "dy_t_s": dy_t_s, "x_t": x_t, "x_t_s": x_t_s, "offsets": offsets_of(sizes, device)},
                flops=2.0 * M * N * K, bytes=float(nbytes),
                info={"rows": M, "experts": E, "active_experts": sum(1 for s in sizes if s)})


def signature(case: Case) -> tuple[tuple, dict]:
    i = case.inputs
    return (i["dy_t"], i["dy_t_s"], i["x_t"], i["x_t_s"], i["offsets"]), {}


def _bf16(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """dy (M, N) and x (M, K) in bf16, as the bf16 path holds them."""
    return case.inputs["dy_t"].to(torch.bfloat16).t(), case.inputs["x_t"].to(torch.bfloat16).t()


def _torch_bf16(case: Case):
    fn, name = grouped_mm()
    dy, x = _bf16(case)
    dy_t, offsets = dy.t(), case.inputs["offsets"]
    return probed(lambda: fn(dy_t, x, offs=offsets), f"{name} (2d x 2d)")


def _moela_bf16(case: Case):
    fn = resolve_kernel("grouped_gemm_dw")
    dy, x = (t.contiguous() for t in _bf16(case))
    offsets = case.inputs["offsets"]
    return lambda: fn(x, dy, offsets)


def _aligned(set_name: str, tokens, loads=("balanced",)) -> list[Problem]:
    out = moe_gemm_problems(OP, set_name, V3_DIMS, tokens, loads)
    for p in out:
        p.params["align"] = BLOCK
    return out


SETS = {
    "tiny": [grouped_problem(OP, "tiny", "groups [50,0,120,90] n=64 k=96", [50, 0, 120, 90], 64, 96),
             grouped_problem(OP, "tiny", "aligned [128,256] n=48 k=72", [128, 256], 48, 72)],
    "check": [*_aligned("check", [256]), *deepgemm_grouped_problems(OP, "check", ["masked 4x256"])],
    "quick": _aligned("quick", [4096]),
    "v3-train": _aligned("v3-train", TRAIN_TOKENS, ("balanced", "zipf")),
    "deepgemm-grouped": deepgemm_grouped_problems(OP, "deepgemm-grouped"),
}

register(Op(
    name=OP,
    summary="k-grouped FP8 wgrad dW[e] = dy[e]ᵀ·x[e] (128x1 token blocks)",
    make_case=make_case,
    signature=signature,
    reference=ref.fp8_grouped_wgrad,
    shape_sets=SETS,
    compare=close(1e-5),
    kernel="fp8_grouped_wgrad",
    baselines=(
        Impl("torch grouped_mm bf16", _torch_bf16, same_function=False, note="bf16, groups along the reduction"),
        Impl("moela grouped_gemm_dw bf16", _moela_bf16, kind="moela", same_function=False,
             note="moela's bf16 weight-gradient kernel"),
    ),
    baseline_order=("torch grouped_mm bf16", "reference"),
    compute="fp8",
    warm_alone=True,
))
