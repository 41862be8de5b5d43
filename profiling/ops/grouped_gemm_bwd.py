"""The grouped GEMM's backward: dX and dW, on the forward's shape sets.

grouped_gemm_dx: ``dX = grouped_gemm(dY, w.transpose(1, 2), offsets)`` (M, K): the forward kernel on
    the transposed weight view. FLOPs 2·M·N·K; bytes dY, the active experts' weights, dX.
grouped_gemm_dw: ``dW[e] = dY[rows of e]ᵀ · X[rows of e]`` (E, N, K). FLOPs 2·M·N·K; bytes X, dY
    and the active experts' dW (empty experts are written too: zeros).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from moela import reference as ref

from ..registry import Case, Impl, Op, register
from ..shapes import Problem
from ._common import close, expert_loop_runner, generator, grouped_mm, grouped_mm_runner, probed, randn
from .grouped_gemm import SETS
from .grouped_gemm import make_case as forward_case


def _sets_for(op: str) -> dict[str, list[Problem]]:
    """The forward's shape sets, filed under this op."""
    return {name: [replace(p, op=op) for p in problems] for name, problems in SETS.items()}


def make_case(p: Problem, device: torch.device, seed: int) -> Case:
    """dX reads dY, the active experts' weights and writes dX; dW reads dY and X and writes all
    of dW (E·N·K: the zeros of the experts without rows are part of the result)."""
    fwd = forward_case(p, device, seed)
    i = fwd.inputs
    M, K = i["xs"].shape
    E, N, _ = i["w"].shape
    dy = randn((M, N), i["xs"].dtype, device, generator(device, seed + 1))
    es = i["xs"].element_size()
    weights = (E if p.op == "grouped_gemm_dw" else fwd.info["active_experts"]) * N * K
    return Case(p, {**i, "dy": dy, "wt": i["w"].transpose(1, 2)}, flops=fwd.flops,
                bytes=float((M * N + weights + M * K) * es), info=fwd.info)


def _dw_loop(case: Case):
    xs, dy, sizes = case.inputs["xs"], case.inputs["dy"], case.inputs["sizes"]
    E, N, K = len(sizes), dy.shape[1], xs.shape[1]

    def run() -> torch.Tensor:
        dw = torch.zeros(E, N, K, dtype=xs.dtype, device=xs.device)
        start = 0
        for e, n in enumerate(sizes):
            if n:
                torch.matmul(dy[start:start + n].T, xs[start:start + n], out=dw[e])
            start += n
        return dw

    return run


def _dw_grouped_mm(case: Case):
    fn, name = grouped_mm()
    xs, dy, offsets = case.inputs["xs"], case.inputs["dy"], case.inputs["offsets"]
    dyt = dy.T  # (N, M): the 2-D x 2-D form, groups along the shared M dim
    return probed(lambda: fn(dyt, xs, offs=offsets), f"{name} (2d x 2d)")


register(Op(
    name="grouped_gemm_dx",
    summary="grouped GEMM backward dX = dY · w[e], bf16",
    make_case=make_case,
    signature=lambda c: ((c.inputs["dy"], c.inputs["wt"], c.inputs["offsets"]), {}),
    reference=ref.grouped_gemm,
    shape_sets=_sets_for("grouped_gemm_dx"),
    compare=close(1e-5),
    kernel="grouped_gemm",
    baselines=(
        Impl("torch grouped_mm", lambda c: grouped_mm_runner(c.inputs["dy"], c.inputs["wt"], c.inputs["offsets"]),
             note="F.grouped_mm / torch._grouped_mm on w's transpose"),
        Impl("torch loop", lambda c: expert_loop_runner(c.inputs["dy"], c.inputs["wt"], c.inputs["sizes"]),
             note="per-expert torch.matmul"),
    ),
    baseline_order=("torch grouped_mm", "torch loop", "reference"),
    compute="bf16",
    warm_alone=True,
))

register(Op(
    name="grouped_gemm_dw",
    summary="grouped GEMM backward dW[e] = dY[e]ᵀ · X[e], bf16",
    make_case=make_case,
    signature=lambda c: ((c.inputs["xs"], c.inputs["dy"], c.inputs["offsets"]), {}),
    reference=ref.grouped_gemm_dw,
    shape_sets=_sets_for("grouped_gemm_dw"),
    compare=close(1e-5),
    kernel="grouped_gemm_dw",
    baselines=(
        Impl("torch grouped_mm", _dw_grouped_mm, note="F.grouped_mm / torch._grouped_mm, groups along M"),
        Impl("torch loop", _dw_loop, note="per-expert dYᵀ·X"),
    ),
    baseline_order=("torch grouped_mm", "torch loop", "reference"),
    compute="bf16",
    warm_alone=True,
))
