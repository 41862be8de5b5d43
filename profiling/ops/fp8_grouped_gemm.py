"""fp8_grouped_gemm(xs, xs_s, w[E,N,K], w_s[E,⌈N/128⌉,⌈K/128⌉], offsets[E], out_dtype=bf16) -> [M,N].

FLOPs 2·M·N·K; bytes: xs (1 byte) and its scales, the weights and scales of the experts with
rows, the bf16 output. Baselines: torch's bf16 grouped GEMM and moela's bf16 grouped_gemm on
the same shapes, and ``torch._scaled_grouped_mm`` with row-wise scales (a cheaper FP8 recipe);
none computes the block-scaled function, so speedups are over the bf16 grouped GEMM.
"""

from __future__ import annotations

import torch

from moela import reference as ref

from ..registry import Case, Impl, Op, Unavailable, register, resolve_kernel
from ..shapes import (
    DECODE_TOKENS,
    PREFILL_TOKENS,
    V3,
    Problem,
    deepgemm_grouped_problems,
    grouped_problem,
    moe_dims,
    moe_gemm_problems,
    sizes_from_params,
)
from ._common import (
    BLOCK,
    cdiv,
    close,
    generator,
    grouped_mm_runner,
    need_cuda,
    offsets_of,
    probed,
    rand_fp8,
    rand_scale,
)
from ._outside import deepgemm_impls

OP = "fp8_grouped_gemm"
v3 = moe_dims(V3, "v3")


def make_case(p: Problem, device: torch.device, seed: int) -> Case:
    prm = p.params
    sizes = sizes_from_params(prm)
    E, N, K, M = len(sizes), prm["n"], prm["k"], sum(sizes)
    gen = generator(device, seed)
    xs, w = rand_fp8((M, K), device, gen), rand_fp8((E, N, K), device, gen)
    xs_s = rand_scale((M, cdiv(K, BLOCK)), device, gen, 1e-2)
    # column-major (M-major): the layout cuBLAS block-wise takes and moela's GEMMs read fastest, so every
    # row of the table reads the same scales the same way
    xs_s = xs_s.t().contiguous().t()
    w_s = rand_scale((E, cdiv(N, BLOCK), cdiv(K, BLOCK)), device, gen, 1e-2 * K**-0.5)
    active = sum(1 for s in sizes if s)
    nbytes = M * K + xs_s.numel() * 4 + active * (N * K + w_s[0].numel() * 4) + M * N * 2
    return Case(
        p, {"xs": xs, "xs_s": xs_s, "w": w, "w_s": w_s, "offsets": offsets_of(sizes, device), "sizes": tuple(sizes)},
        flops=2.0 * M * N * K, bytes=float(nbytes),
        info={"rows": M, "experts": E, "active_experts": active, "max_group_rows": max(sizes)},
    )


def signature(case: Case) -> tuple[tuple, dict]:
    i = case.inputs
    return (i["xs"], i["xs_s"], i["w"], i["w_s"], i["offsets"]), {"out_dtype": torch.bfloat16}


def _bf16_inputs(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    return case.inputs["xs"].to(torch.bfloat16), case.inputs["w"].to(torch.bfloat16)


def _torch_bf16(case: Case):
    xs, w = _bf16_inputs(case)
    return grouped_mm_runner(xs, w, case.inputs["offsets"])


def _moela_bf16(case: Case):
    fn = resolve_kernel("grouped_gemm")
    xs, w = _bf16_inputs(case)
    offsets = case.inputs["offsets"]
    return lambda: fn(xs, w, offsets)


def _rowwise(case: Case):
    need_cuda(case.inputs["xs"].device, at_least=(9, 0), what="torch._scaled_grouped_mm")
    fn = getattr(torch, "_scaled_grouped_mm", None)
    if fn is None:
        raise Unavailable(f"torch {torch.__version__} has no torch._scaled_grouped_mm")
    i = case.inputs
    xs, w, offsets = i["xs"], i["w"], i["offsets"]
    scale_a = i["xs_s"][:, 0].contiguous()  # (M,) one scale per row
    scale_b = i["w_s"][:, :, 0].repeat_interleave(BLOCK, dim=1)[:, : w.shape[1]].contiguous()  # (E, N)
    wt = w.transpose(-2, -1)  # (E, K, N) column-major
    return probed(lambda: fn(xs, wt, scale_a, scale_b, offs=offsets, out_dtype=torch.bfloat16),
                  "torch._scaled_grouped_mm")


def _tiny(set_name: str) -> list[Problem]:
    return [
        *(Problem(OP, set_name, f"E=4 n=128 k=256 T=8 {load}", {
            "series": f"tiny {load}", "tokens": 8, "experts": 4, "topk": 2, "load": load, "n": 128, "k": 256})
          for load in ("balanced", "zipf")),
        grouped_problem(OP, set_name, "empty groups [0,5,0,11] n=128 k=256", [0, 5, 0, 11], 128, 256),
    ]


SETS = {
    "tiny": _tiny("tiny"),
    "check": [
        *moe_gemm_problems(OP, "check", v3, [64], ["balanced"], ["up"]),
        *moe_gemm_problems(OP, "check", v3, [128], ["zipf"], ["down"]),
        *deepgemm_grouped_problems(OP, "check", ["masked 4x256"]),
    ],
    "quick": [
        *moe_gemm_problems(OP, "quick", v3, [128], ["balanced"], ["up"]),
        *deepgemm_grouped_problems(OP, "quick", ["contiguous 4x8192"]),
    ],
    "deepgemm-grouped": deepgemm_grouped_problems(OP, "deepgemm-grouped"),
    "v3-decode": moe_gemm_problems(OP, "v3-decode", v3, DECODE_TOKENS),
    "v3-prefill": moe_gemm_problems(OP, "v3-prefill", v3, PREFILL_TOKENS),
}

register(Op(
    name=OP,
    summary="grouped expert GEMM in FP8 (block scales)",
    make_case=make_case,
    signature=signature,
    reference=ref.fp8_grouped_gemm,
    shape_sets=SETS,
    compare=close(1e-5),
    kernel="fp8_grouped_gemm",
    baselines=(
        Impl("torch grouped_mm bf16", _torch_bf16, same_function=False, note="bf16 grouped GEMM, same shapes"),
        Impl("moela grouped_gemm bf16", _moela_bf16, kind="moela", same_function=False,
             note="moela's bf16 grouped GEMM, same shapes"),
        Impl("torch scaled_grouped_mm rowwise", _rowwise, same_function=False,
             note="row-wise FP8 scales (a cheaper recipe)"),
        *deepgemm_impls(OP),
    ),
    baseline_order=("torch grouped_mm bf16", "reference"),
    compute="fp8",
    warm_alone=True,
))
