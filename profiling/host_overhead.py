"""Host (Python) time of a decode step of moela.model.MoE, the GPU kernels' work left out.

At decode sizes the kernels run for microseconds and a layer's eager time is what its Python
costs: argument checks, dispatch, allocation, Triton's launch path. This measures that cost on
any machine, without a GPU: the layer runs on CPU tensors through the Triton interpreter with
the interpreter's kernel execution replaced by a no-op, so what is timed is everything *but*
the kernels (the small torch ops on CPU included). Every callable is warmed up by one untimed
round, then timed per call (the fastest round counts); beside it a baseline (the reference layer
in plain torch, whose CPU arithmetic at these dims is small) and the floor of any op
(``torch.empty``). The absolute numbers depend on the CPU; compare two commits on the same
machine::

    python -m moela.profiling.host_overhead            # min over 7 rounds of 200 calls
    python -m moela.profiling.host_overhead --calls 50 --rounds 3
    python -m moela.profiling.host_overhead --ops      # and each op of the layer alone
    python -m moela.profiling.host_overhead --ops --dtype bfloat16   # the GPU's decode dtype:
                                                                     # the Hopper (TMA) GEMM path

On a GPU, ``python -m moela.profiling bench --graphs`` measures the same thing the other way
round: eager time beside CUDA-graph replay time.
"""

from __future__ import annotations

import argparse
import os
import time


def measure(calls: int = 200, rounds: int = 7, tokens: int = 1, ops: bool = False,
            dtype: str = "float32") -> dict[str, float]:
    """Seconds of host time per call, the min over rounds, each callable warmed up by one untimed
    round first: ``"layer"`` (an MoE forward: tiny dims, 64 experts, top-8, kernels not run),
    ``"baseline"`` (``moela.reference.MoE`` of the same dims: plain torch, its CPU arithmetic
    included), ``"torch.empty"`` (the floor of any op) and with ``ops`` each moela op of the
    layer's forward alone. ``dtype``: the layer's and the input's (``"float32"`` or
    ``"bfloat16"``; the GEMMs take their Hopper-native path for 16-bit inputs)."""
    os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
    import torch
    import triton.runtime.interpreter as interp

    import moela.kernels as K
    from moela.model import MoE
    from moela.reference import ModelArgs
    from moela.reference import MoE as ReferenceMoE

    a = ModelArgs.from_name("tiny", dim=256, moe_inter_dim=128, n_routed_experts=64, n_activated_experts=8,
                            n_expert_groups=8, n_limited_groups=4, backend="triton")
    dt = getattr(torch, dtype)
    layer = MoE(a).eval().to(dt)
    reference = ReferenceMoE(a).eval().to(dt)
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(tokens, a.dim, dtype=dt)
    I = a.moe_inter_dim
    calls_of = {"layer": lambda: layer(x), "baseline": lambda: reference(x),
                "torch.empty": lambda: torch.empty(tokens, a.dim)}
    run = interp.InterpretedFunction.run
    with torch.no_grad():
        layer(x)  # imports, first-call caches (the kernels run once, for real)
        if ops:  # each op on the inputs the layer gives it
            logits = layer.gate.logits(x)
            weights, ids = layer.gate(x)
            plan = K.make_routing(ids, a.n_routed_experts)
            xs = K.permute(x, plan)
            h = K.grouped_gemm(xs, layer.w13, plan.offsets)
            act = K.swiglu(h[:, :I], h[:, I:])
            ys = K.grouped_gemm(act, layer.w2, plan.offsets)
            calls_of.update({
                "route": lambda: K.route(logits, layer.gate.bias, topk=a.n_activated_experts,
                                         n_groups=a.n_expert_groups, topk_groups=a.n_limited_groups,
                                         score_func=a.score_func, route_scale=a.route_scale),
                "make_routing": lambda: K.make_routing(ids, a.n_routed_experts),
                "permute": lambda: K.permute(x, plan),
                "grouped_gemm": lambda: K.grouped_gemm(xs, layer.w13, plan.offsets),
                "swiglu": lambda: K.swiglu(h[:, :I], h[:, I:]),
                "unpermute": lambda: K.unpermute(ys, plan, weights),
            })
        interp.InterpretedFunction.run = lambda self, *args, **kwargs: None  # the kernels' work: none
        best = {}
        try:
            for name, fn in calls_of.items():
                for _ in range(calls):  # warm-up round, untimed: allocator, caches, branch history
                    fn()
                best[name] = float("inf")
                for _ in range(rounds):
                    start = time.perf_counter()
                    for _ in range(calls):
                        fn()
                    best[name] = min(best[name], (time.perf_counter() - start) / calls)
        finally:
            interp.InterpretedFunction.run = run
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moela.profiling.host_overhead", description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=200, help="forwards per round (default 200)")
    parser.add_argument("--rounds", type=int, default=7, help="rounds; the fastest counts (default 7)")
    parser.add_argument("--tokens", type=int, default=1, help="tokens per forward (default 1: decode)")
    parser.add_argument("--ops", action="store_true", help="also time each op of the forward alone")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the layer's dtype (default float32; bfloat16 takes the Hopper GEMM path)")
    ns = parser.parse_args(argv)
    if min(ns.calls, ns.rounds, ns.tokens) < 1:
        parser.error("--calls, --rounds and --tokens must be >= 1")
    us = {name: s * 1e6 for name, s in measure(ns.calls, ns.rounds, ns.tokens, ops=ns.ops, dtype=ns.dtype).items()}
    print(f"moela.model.MoE forward, {ns.dtype}, T={ns.tokens}, kernels left out: {us.pop('layer'):.1f} us of host "
          f"time per call (min of {ns.rounds} x {ns.calls} calls, after {ns.calls} warm-up calls)")
    print(f"  baseline: moela.reference.MoE, plain torch    {us.pop('baseline'):8.1f} us per call (its CPU "
          "arithmetic included)")
    print(f"  floor: torch.empty                            {us.pop('torch.empty'):8.1f} us per call")
    for name, value in us.items():
        print(f"  {name:14s} {value:8.1f} us per call")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
