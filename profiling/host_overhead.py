"""Host (Python) time of a decode step of moela.model.MoE, the GPU kernels' work left out.

At decode sizes the kernels run for microseconds and a layer's eager time is what its Python
costs: argument checks, dispatch, allocation, Triton's launch path. This measures that cost on
any machine, without a GPU: the layer runs on CPU tensors through the Triton interpreter with
the interpreter's kernel execution replaced by a no-op, so what is timed is everything *but*
the kernels (the small torch ops on CPU included). The absolute numbers depend on the CPU;
compare two commits on the same machine::

    python -m moela.profiling.host_overhead            # min over 7 rounds of 200 calls
    python -m moela.profiling.host_overhead --calls 50 --rounds 3

On a GPU, ``python -m moela.profiling bench --graphs`` measures the same thing the other way
round: eager time beside CUDA-graph replay time.
"""

from __future__ import annotations

import argparse
import os
import time


def measure(calls: int = 200, rounds: int = 7, tokens: int = 1) -> float:
    """Seconds of host time per MoE forward (tiny dims, 64 experts, top-8), the min over rounds."""
    os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
    import torch
    import triton.runtime.interpreter as interp

    from moela.kernels.interpreter import install_compat
    from moela.model import MoE
    from moela.reference import ModelArgs

    install_compat()
    args = ModelArgs.from_name("tiny", dim=256, moe_inter_dim=128, n_routed_experts=64, n_activated_experts=8,
                               n_expert_groups=8, n_limited_groups=4, backend="triton")
    layer = MoE(args).eval()
    x = torch.randn(tokens, args.dim)
    run = interp.InterpretedFunction.run
    best = float("inf")
    with torch.no_grad():
        layer(x)  # imports, first-call caches
        interp.InterpretedFunction.run = lambda self, *a, **k: None  # the kernels' work: none
        try:
            for _ in range(rounds):
                start = time.perf_counter()
                for _ in range(calls):
                    layer(x)
                best = min(best, (time.perf_counter() - start) / calls)
        finally:
            interp.InterpretedFunction.run = run
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moela.profiling.host_overhead", description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=200, help="forwards per round (default 200)")
    parser.add_argument("--rounds", type=int, default=7, help="rounds; the fastest counts (default 7)")
    parser.add_argument("--tokens", type=int, default=1, help="tokens per forward (default 1: decode)")
    ns = parser.parse_args(argv)
    if min(ns.calls, ns.rounds, ns.tokens) < 1:
        parser.error("--calls, --rounds and --tokens must be >= 1")
    seconds = measure(ns.calls, ns.rounds, ns.tokens)
    print(f"moela.model.MoE forward, T={ns.tokens}, kernels left out: {seconds * 1e6:.1f} us of host time per call "
          f"(min of {ns.rounds} x {ns.calls} calls)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
