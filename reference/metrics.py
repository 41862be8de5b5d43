"""Error metrics used across the field (tests and benchmarks import them from here)."""

from __future__ import annotations

import torch

__all__ = ["calc_diff", "cosine_diff", "max_abs_err", "rel_err"]


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepGEMM's similarity error ``1 - 2·Σxy / Σ(x² + y²)`` in float64 (0 when x == y).

    FP8 GEMMs pass below 1e-3 against the bf16 product of the unquantized inputs.
    """
    x, y = x.detach().double(), y.detach().double()
    denominator = (x * x + y * y).sum()
    if denominator == 0:
        return 0.0
    return float(1 - 2 * (x * y).sum() / denominator)


def cosine_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """FlashMLA's metric: ``1 - cos(x, y)`` over the flattened tensors, in float64."""
    x, y = x.double().flatten(), y.double().flatten()
    return float(1 - torch.nn.functional.cosine_similarity(x, y, dim=0))


def max_abs_err(x: torch.Tensor, y: torch.Tensor) -> float:
    """``max |x - y|`` in float64; NaN anywhere gives NaN (it is never hidden)."""
    if x.numel() == 0:
        return 0.0
    return float((x.double() - y.double()).abs().max())


def rel_err(x: torch.Tensor, y: torch.Tensor) -> float:
    """``‖x - y‖ / ‖y‖`` (Frobenius) in float64."""
    y64 = y.double()
    return float((x.double() - y64).norm() / y64.norm().clamp_min(1e-300))
