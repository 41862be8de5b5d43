"""Run the reference layers (MoE, MLA prefill + decode) of a config on random input, timed.

On a CPU these are wall-clock numbers of the pure-PyTorch references: they show that the
layers run at real DeepSeek dims and how long the ground truth takes, nothing about GPU speed.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from moela.reference import MLA, ModelArgs, MoE

__all__ = ["LayerTiming", "run_reference_layers", "wall_time"]


@dataclass
class LayerTiming:
    config: str
    layer: str
    shape: str
    median_ms: float
    min_ms: float
    reps: int
    finite: bool


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_time(fn: Callable[[], object], device: torch.device, reps: int = 3, warmup: int = 1) -> list[float]:
    """Wall-clock milliseconds of ``fn`` (synchronised on CUDA), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def _randomize_(module: torch.nn.Module) -> torch.nn.Module:
    """Random weights (never zeros), scaled like a trained layer: std = fan_in**-0.5."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif p.ndim == 1:
                p.normal_(0.0, 0.1)
            else:
                p.normal_(0.0, p.shape[-1] ** -0.5)
    return module


def run_reference_layers(
    name: str,
    args: ModelArgs,
    *,
    tokens: int,
    decode_steps: int,
    device: torch.device,
    dtype: torch.dtype,
    reps: int = 3,
) -> list[LayerTiming]:
    """Time the reference MoE forward (``tokens`` tokens) and the MLA prefill/decode of one sequence."""
    results: list[LayerTiming] = []
    gen = torch.Generator(device="cpu").manual_seed(0)

    def record(layer: str, shape: str, fn: Callable[[], torch.Tensor]) -> None:
        out: list[torch.Tensor] = []
        times = wall_time(lambda: out.append(fn()), device, reps=reps)
        finite = bool(torch.isfinite(out[-1]).all())
        results.append(LayerTiming(name, layer, shape, statistics.median(times), min(times), reps, finite))

    with torch.no_grad():
        moe = _randomize_(MoE(args)).to(device=device, dtype=dtype)
        x = torch.randn(tokens, args.dim, generator=gen).to(device=device, dtype=dtype)
        record("moe (loop over experts)", f"T={tokens} D={args.dim} E={args.n_routed_experts} "
               f"k={args.n_activated_experts}", lambda moe=moe: moe(x))
        del moe

        seq = min(tokens, args.max_seq_len - decode_steps)
        for impl in ("naive", "absorb"):
            mla = _randomize_(MLA(args, attn_impl=impl)).to(device=device, dtype=dtype)
            cache = mla.new_cache(1, seq + decode_steps, dtype=dtype, device=device)
            h = torch.randn(1, seq + decode_steps, args.dim, generator=gen).to(device=device, dtype=dtype)
            record(f"mla {impl} prefill", f"B=1 S={seq} H={args.n_heads}",
                   lambda mla=mla, cache=cache, h=h: mla(h[:, :seq], 0, cache))

            def decode(mla=mla, cache=cache, h=h) -> torch.Tensor:
                y = h[:, :0]
                for i in range(decode_steps):
                    y = mla(h[:, seq + i: seq + i + 1], seq + i, cache)
                return y

            record(f"mla {impl} decode x{decode_steps}", f"B=1 cache={seq}+{decode_steps}", decode)
            del mla, cache
    return results
