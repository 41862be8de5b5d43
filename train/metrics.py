"""Throughput accounting: training FLOPs per token of a moela Transformer, and MFU against the GPU's
dense bf16 peak.

FLOPs per token: ``6 · N_active`` for the GEMMs (forward 2, backward 4 per weight; routed expert
weights counted at k/E, the embedding lookup not at all) plus causal attention's
``3 · n_layers · S · H · (d_qk + d_v)`` (forward ``S/2`` keys per query, two GEMMs, times three
for the backward). MFU is the achieved FLOP/s over the dense bf16 peak of the card (the usual
convention, also for the FP8 runs, whose own peak is twice that on Hopper).
"""

from __future__ import annotations

import torch
from torch import nn

from moela.model import MoE, Transformer

__all__ = ["active_params", "flops_per_token", "peak_bf16_flops", "mfu"]

#: Dense bf16 tensor-core peaks (FLOP/s) by a substring of the device name.
_PEAK_BF16 = (("H200", 989.4e12), ("H100", 989.4e12), ("H800", 989.4e12), ("H20", 148e12), ("A100", 312e12),
              ("A800", 312e12), ("L40S", 362e12), ("B200", 2250e12))


def active_params(model: Transformer) -> int:
    """Weights one token's forward multiplies: all but the embedding, routed experts at k/E."""
    total = 0.0
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, nn.Embedding):
                continue
            if isinstance(module, MoE) and name in ("w13", "w2"):
                total += p.numel() * module.args.n_activated_experts / module.args.n_routed_experts
            else:
                total += p.numel()
    return int(total)


def flops_per_token(model: Transformer, seq_len: int) -> float:
    a = model.args
    attention = 3 * a.n_layers * seq_len * a.n_heads * (a.qk_head_dim + a.v_head_dim)
    return 6.0 * active_params(model) + attention


def peak_bf16_flops(device: torch.device) -> float | None:
    """The card's dense bf16 peak, or None (a CPU, an unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in _PEAK_BF16 if key in name), None)


def mfu(tokens_per_s: float, flops_tok: float, device: torch.device) -> float | None:
    peak = peak_bf16_flops(device)
    return None if peak is None else tokens_per_s * flops_tok / peak
