"""Ceilings measured at the start of a run: copy bandwidth and matmul rates on random data.

CUDA: a 1 GiB device-to-device copy (bytes read + written), a bf16 8192³ ``torch.matmul``, an
FP8 8192³ ``torch._scaled_mm`` with per-tensor scales (sm_89+) and, for information, the
cuBLAS block-wise FP8 GEMM (sm_90). ANCHORS.md has what an H200 reached before (copy ≈ 4.3
TB/s, bf16 ≈ 770-800 TFLOP/s). CPU: a 64 MiB copy and a float32 1024³ matmul, wall clock.

Each ceiling is ``{"value", "unit", "median_ms", "what"}`` or ``{"skipped": reason}``. Results
are compared with ``ceiling_for(compute, ceilings)``: the matmul rate of their compute dtype
and the copy bandwidth.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from moela.reference import FP8_DTYPE

from .timing import time_fns

__all__ = ["measure_ceilings", "ceiling_for", "spin_up", "COMPUTE_CEILINGS"]

#: Compute kind of an op -> ceilings to compare it with, first present wins.
COMPUTE_CEILINGS = {
    "bf16": ("matmul_bf16", "matmul_fp32"),
    "fp8": ("matmul_fp8", "matmul_fp32"),
    "none": ("matmul_bf16", "matmul_fp32"),
}


def _ceiling(fn: Callable[[], Any], device: torch.device, amount: float, unit: str, what: str,
             **timer: Any) -> dict[str, Any]:
    timing, _ = time_fns([fn], device, **timer)
    scale = 1e9 if unit == "GB/s" else 1e12
    return {"value": amount / (timing.median_ms * 1e-3) / scale, "unit": unit, "median_ms": timing.median_ms,
            "what": what, "method": timing.method}


def _matmul(n: int, dtype: torch.dtype, device: torch.device, **timer: Any) -> dict[str, Any]:
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=gen).to(dtype)
    b = torch.randn(n, n, device=device, generator=gen).to(dtype)
    name = str(dtype).removeprefix("torch.")
    return _ceiling(lambda: torch.matmul(a, b), device, 2.0 * n**3, "TFLOP/s", f"{name} {n}^3 torch.matmul", **timer)


def _fp8_tensorwise(n: int, device: torch.device, **timer: Any) -> dict[str, Any]:
    if torch.cuda.get_device_capability(device) < (8, 9):
        return {"skipped": "FP8 needs sm_89 or newer"}
    gen = torch.Generator(device=device).manual_seed(0)
    a = (torch.randn(n, n, device=device, generator=gen) * 64).clamp(-448, 448).to(FP8_DTYPE)
    b = (torch.randn(n, n, device=device, generator=gen) * 64).clamp(-448, 448).to(FP8_DTYPE)
    one = torch.ones((), device=device)
    fn = lambda: torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    return _ceiling(fn, device, 2.0 * n**3, "TFLOP/s", f"fp8 e4m3 {n}^3 torch._scaled_mm, per-tensor scales", **timer)


def _fp8_blockwise(n: int, device: torch.device, **timer: Any) -> dict[str, Any]:
    from .ops._common import scaled_mm_blockwise_runner

    gen = torch.Generator(device=device).manual_seed(0)
    a = (torch.randn(n, n, device=device, generator=gen) * 64).clamp(-448, 448).to(FP8_DTYPE)
    b = (torch.randn(n, n, device=device, generator=gen) * 64).clamp(-448, 448).to(FP8_DTYPE)
    a_s = torch.rand(n, n // 128, device=device, generator=gen) + 0.5
    b_s = torch.rand(n // 128, n // 128, device=device, generator=gen) + 0.5
    fn = scaled_mm_blockwise_runner(a, a_s, b, b_s, torch.bfloat16)
    return _ceiling(fn, device, 2.0 * n**3, "TFLOP/s", f"fp8 e4m3 {n}^3 F.scaled_mm, 1x128 x 128x128 scales", **timer)


def _copy(nbytes: int, device: torch.device, **timer: Any) -> dict[str, Any]:
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return _ceiling(lambda: dst.copy_(src), device, 2.0 * nbytes, "GB/s",
                    f"{nbytes >> 20} MiB copy, bytes read + written", **timer)


def _guard(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return fn()
    except Exception as e:  # a ceiling that cannot run here is reported, not fatal
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return {"skipped": f"{type(e).__name__}: {first}"[:300]}


def spin_up(device: torch.device, seconds: float) -> float:
    """Keep the GPU busy with bf16 matmuls for about ``seconds`` so that its clocks leave idle
    (an idle H200 sits at 345 MHz, and a few ms of warm-up time the ramp, not the chip: the first
    H200 run measured 676 TFLOP/s for a matmul that reached 780 later in the same run).
    Returns the seconds spent."""
    import time

    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(20):
            torch.matmul(a, a)
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def measure_ceilings(device: torch.device, quick: bool = False) -> dict[str, dict[str, Any]]:
    """Measure the ceilings of ``device`` now (a few seconds on a GPU, about one on a CPU).

    On a GPU the clocks are first spun up (:func:`spin_up`, 1 s) and every ceiling warms up
    for 200 ms before its timed repetitions."""
    if device.type == "cuda":
        spin_up(device, 1.0 if not quick else 0.3)
        timer = {"rep_ms": 100.0 if not quick else 30.0, "warmup_ms": 200.0 if not quick else 50.0, "max_warm": 1000}
        n = 8192 if not quick else 4096
        out = {
            "copy": _guard(lambda: _copy(1 << 30, device, **timer)),
            "matmul_bf16": _guard(lambda: _matmul(n, torch.bfloat16, device, **timer)),
            "matmul_fp8": _guard(lambda: _fp8_tensorwise(n, device, **timer)),
            "matmul_fp8_blockwise": _guard(lambda: _fp8_blockwise(n, device, **timer)),
        }
        torch.cuda.empty_cache()
        return out
    timer = {"rep_ms": 200.0, "min_reps": 3, "max_reps": 10}
    return {
        "copy": _guard(lambda: _copy(64 << 20, device, **timer)),
        "matmul_fp32": _guard(lambda: _matmul(1024, torch.float32, device, **timer)),
    }


def ceiling_for(kind: str, ceilings: dict[str, dict[str, Any]]) -> tuple[str, float] | None:
    """(name, TFLOP/s) of the compute ceiling for an op's compute kind, or None."""
    for name in COMPUTE_CEILINGS[kind]:
        c = ceilings.get(name, {})
        if "value" in c:
            return name, float(c["value"])
    return None
