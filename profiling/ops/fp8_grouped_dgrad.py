"""fp8_grouped_dgrad(dy[M,N], dy_s, w[E,N,K], w_s, offsets[E], out_dtype=bf16) -> dx[M,K].

The MoE experts' input gradient: rows of expert e compute dy · w[e] (V3's up/gate: N = 2I, K = D;
down: N = D, K = I; and DeepGEMM's grouped shapes). FLOPs 2·M·N·K; bytes: dy (1 byte) and its
scales, the weights and scales of the experts with rows, the bf16 dx. Baselines (speed only: bf16
arithmetic on the same shapes): torch's grouped GEMM and moela's bf16 ``grouped_gemm`` on w[e]ᵀ.
"""

from __future__ import annotations

import torch

from moela import reference as ref

from ..registry import Case, Impl, Op, register, resolve_kernel
from ..shapes import Problem, deepgemm_grouped_problems, grouped_problem, moe_gemm_problems, sizes_from_params
from ._common import BLOCK, cdiv, close, generator, grouped_mm_runner, offsets_of, rand_fp8, rand_scale
from ._fp8_train import TRAIN_TOKENS, V3_DIMS

OP = "fp8_grouped_dgrad"


def make_case(p: Problem, device: torch.device, seed: int) -> Case:
    prm = p.params
    sizes = sizes_from_params(prm)
    E, N, K, M = len(sizes), prm["n"], prm["k"], sum(sizes)
    gen = generator(device, seed)
    dy, w = rand_fp8((M, N), device, gen), rand_fp8((E, N, K), device, gen)
    dy_s = rand_scale((M, cdiv(N, BLOCK)), device, gen, 1e-2)
    w_s = rand_scale((E, cdiv(N, BLOCK), cdiv(K, BLOCK)), device, gen, 1e-2 * N**-0.5)
    active = sum(1 for s in sizes if s)
    nbytes = M * N + dy_s.numel() * 4 + active * (N * K + w_s[0].numel() * 4) + M * K * 2
    return Case(p, {"dy": dy, "dy_s": dy_s, "w": w, "w_s": w_s, "offsets": offsets_of(sizes, device)},
                flops=2.0 * M * N * K, bytes=float(nbytes),
                info={"rows": M, "experts": E, "active_experts": active})


def signature(case: Case) -> tuple[tuple, dict]:
    i = case.inputs
    return (i["dy"], i["dy_s"], i["w"], i["w_s"], i["offsets"]), {"out_dtype": torch.bfloat16}


def _bf16(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    return case.inputs["dy"].to(torch.bfloat16), case.inputs["w"].to(torch.bfloat16).transpose(1, 2)


def _torch_bf16(case: Case):
    dy, w_t = _bf16(case)
    return grouped_mm_runner(dy, w_t, case.inputs["offsets"])


def _moela_bf16(case: Case):
    fn = resolve_kernel("grouped_gemm")
    dy, w_t = _bf16(case)
    offsets = case.inputs["offsets"]
    return lambda: fn(dy, w_t, offsets)


def _dgrad_problems(set_name: str, tokens, loads=("balanced",)) -> list[Problem]:
    """The forward expert GEMMs' (n, k) with the dgrad's roles: dy (M, n) · w (n, k)."""
    return moe_gemm_problems(OP, set_name, V3_DIMS, tokens, loads)


SETS = {
    "tiny": [grouped_problem(OP, "tiny", "groups [5,0,11] n=256 k=128", [5, 0, 11], 256, 128),
             grouped_problem(OP, "tiny", "groups [3,9] n=200 k=96", [3, 9], 200, 96)],
    "check": [*_dgrad_problems("check", [128]), *deepgemm_grouped_problems(OP, "check", ["masked 4x256"])],
    "quick": _dgrad_problems("quick", [4096]),
    "v3-train": _dgrad_problems("v3-train", TRAIN_TOKENS, ("balanced", "zipf")),
    "deepgemm-grouped": deepgemm_grouped_problems(OP, "deepgemm-grouped"),
}

register(Op(
    name=OP,
    summary="grouped FP8 dgrad dx = dy·w[e] (expert weight blocks used transposed)",
    make_case=make_case,
    signature=signature,
    reference=ref.fp8_grouped_dgrad,
    shape_sets=SETS,
    compare=close(1e-5),
    kernel="fp8_grouped_dgrad",
    baselines=(
        Impl("torch grouped_mm bf16", _torch_bf16, same_function=False, note="bf16 grouped GEMM on w[e]ᵀ"),
        Impl("moela grouped_gemm bf16", _moela_bf16, kind="moela", same_function=False,
             note="moela's bf16 grouped GEMM on w[e]ᵀ"),
    ),
    baseline_order=("torch grouped_mm bf16", "reference"),
    compute="fp8",
    warm_alone=True,
))
