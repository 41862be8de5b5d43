"""Inputs shared by the dispatch ops: expert ids drawn from a load, routing weights, plans."""

from __future__ import annotations

import torch

from moela import reference as ref

from ..shapes import CONFIGS, DECODE_TOKENS, PREFILL_TOKENS, Problem, routing_ids, token_problems

INVALID_EVERY = "invalid_every"  # param: every n-th slot gets id -1 (an expert on another rank)


def topk_ids(p: Problem, device: torch.device) -> torch.Tensor:
    """(T, k) int32 ids of the problem's config and load (deterministic), on ``device``."""
    args = CONFIGS[p.params["config"]]
    ids = routing_ids(p.params["tokens"], args.n_routed_experts, args.n_activated_experts,
                      p.params.get("load", "balanced")).clone()
    every = p.params.get(INVALID_EVERY)
    if every:
        ids.view(-1)[::every] = -1
    return ids.to(device)


def topk_weights(T: int, k: int, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    """(T, k) float32 positive weights summing to 1 per token (like a sigmoid gate's)."""
    w = torch.rand((T, k), dtype=torch.float32, device=device, generator=gen) + 0.1
    return w / w.sum(-1, keepdim=True)


def plan_of(ids: torch.Tensor, n_experts: int, align: int = 1) -> ref.RoutingPlan:
    return ref.make_routing(ids, n_experts, align)


def token_sets(op: str, loads: tuple[str, ...] = ("balanced",)) -> dict[str, list[Problem]]:
    """The dispatch ops' shape sets: V3 and V2-Lite token sweeps (decode 1..256, prefill 4096..16384)."""
    return {
        "tiny": token_problems(op, "tiny", ["tiny"], [8, 33]),
        "check": token_problems(op, "check", ["v3", "v2lite"], [64, 1000], loads),
        "quick": token_problems(op, "quick", ["v3"], [128, 16384]),
        "v3-decode": token_problems(op, "v3-decode", ["v3"], DECODE_TOKENS, loads),
        "v3-prefill": token_problems(op, "v3-prefill", ["v3"], PREFILL_TOKENS, loads),
        "v2lite-decode": token_problems(op, "v2lite-decode", ["v2lite"], DECODE_TOKENS, loads),
        "v2lite-prefill": token_problems(op, "v2lite-prefill", ["v2lite"], PREFILL_TOKENS, loads),
    }
