"""The dispatch round trip: make_routing -> permute -> unpermute (identity experts), end to end.

``moe_dispatch_combine(x[T,D], topk_ids[T,k], topk_weights[T,k], n_experts) -> y[T,D]`` with
``y[t] = Σ_j w[t,j]·x[t]``: what a MoE layer spends moving tokens, without the GEMMs. The
moela version chains ``moela.kernels.make_routing/permute/unpermute`` (available once all
three exist); the reference chains the references. Bytes are those of the unfused chain:
x read, xs written and read back, y written, plus ids and weights.
Baseline: stable argsort + bincount + index_select + index_add_ (the usual torch composition).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moela import reference as ref

from ..registry import Case, Impl, Op, register, resolve_kernel
from ..shapes import CONFIGS, LOADS, Problem
from ._common import close, generator, randn
from ._dispatch import token_sets, topk_ids, topk_weights

OP = "moe_dispatch_combine"


def chain(make_routing: Callable, permute: Callable, unpermute: Callable) -> Callable:
    """The round trip built from three ops of the contract."""

    def dispatch_combine(x, ids, weights, n_experts):
        plan = make_routing(ids, n_experts)
        return unpermute(permute(x, plan), plan, weights)

    return dispatch_combine


def make_case(p: Problem, device: torch.device, seed: int) -> Case:
    args = CONFIGS[p.params["config"]]
    T, D, E, k = p.params["tokens"], args.dim, args.n_routed_experts, args.n_activated_experts
    gen = generator(device, seed)
    x = randn((T, D), torch.bfloat16, device, gen)
    ids = topk_ids(p, device)
    w = topk_weights(T, k, device, gen)
    M = T * k
    nbytes = (2 * T * D + 2 * M * D) * 2 + T * k * 8
    return Case(p, {"x": x, "topk_ids": ids, "topk_weights": w, "n_experts": E}, flops=2.0 * M * D,
                bytes=float(nbytes), info={"rows": M, "dim": D})


def signature(case: Case) -> tuple[tuple, dict]:
    i = case.inputs
    return (i["x"], i["topk_ids"], i["topk_weights"], i["n_experts"]), {}


def _torch_native(case: Case):
    x, ids, w, E = (case.inputs[n] for n in ("x", "topk_ids", "topk_weights", "n_experts"))
    k = ids.shape[1]

    def run():
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)  # rows in expert order -> flat slot
        torch.bincount(flat.long(), minlength=E)  # the group sizes a grouped GEMM would need
        token = order // k
        xs = x.index_select(0, token)
        y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        y.index_add_(0, token, xs.float() * w.reshape(-1)[order, None])
        return y.to(x.dtype)

    return run


SETS = token_sets(OP, LOADS)

register(Op(
    name=OP,
    summary="make_routing + permute + unpermute round trip",
    make_case=make_case,
    signature=signature,
    reference=chain(ref.make_routing, ref.permute, ref.unpermute),
    shape_sets=SETS,
    compare=close(1e-5),
    kernel=lambda: chain(*(resolve_kernel(n) for n in ("make_routing", "permute", "unpermute"))),
    baselines=(Impl("torch native", _torch_native, note="argsort + bincount + index_select + index_add_"),),
    baseline_order=("torch native", "reference"),
    compute="none",
))
