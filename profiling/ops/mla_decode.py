"""mla_decode(q[B,S,H,576], kv[B,L,576], softmax_scale) -> o[B,S,H,512]: MLA decode attention
in the absorbed form (FlashMLA's problem).

One latent KV head shared by all H query heads: keys are the 576-wide cache rows (512 latent
+ 64 rope), values their first 512 columns. Query i of S sits at position L - S + i and sees
keys 0..L-S+i (causal among the new tokens). FLOPs 2·B·S·H·L·(576 + 512); bytes: the cache
once, q and o. moela.reference has no standalone function for this (its MLA module folds the
projections in), so the torch composition with float32 softmax is the truth here.

``flashmla-ragged``: FlashMLA's variable-length benchmark, a serving batch. The cache is a
buffer of ``L`` slots per sequence; sequence b holds ``n_b`` keys (``cache_seqlens``), drawn
around the mean ``L/2`` (normal, σ = L/4, clamped into [S, L], seeded), its queries at the last
S of them. FLOPs and bytes count the keys held, Σ n_b. The torch baselines mask each
sequence's own length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..registry import Case, Impl, Op, register
from ..shapes import FLASHMLA_DECODE, V3, Problem
from ._common import close, generator, randn
from ._outside import flash_mla_impl

OP = "mla_decode"
DK, DV = FLASHMLA_DECODE["head_dim"], FLASHMLA_DECODE["v_dim"]


def problem(set_name: str, b: int, cache: int, heads: int, s: int, ragged: bool = False) -> Problem:
    name = f"B={b} L={cache} H={heads} S={s}" + (" ragged" if ragged else "")
    return Problem(OP, set_name, name, {
        "series": f"B={b} H={heads} S={s}" + (" ragged" if ragged else ""), "tokens": cache, "batch": b,
        "cache_len": cache, "heads": heads, "q_tokens": s, "ragged": ragged})


def ragged_lengths(B: int, L: int, S: int, seed: int) -> list[int]:
    """FlashMLA's variable lengths: normal around L/2 with σ = L/4, clamped into [S, L] (seeded, host)."""
    gen = torch.Generator().manual_seed(seed)
    lens = torch.normal(L / 2, L / 4, (B,), generator=gen).round().clamp(S, L)
    return [int(n) for n in lens]


def make_case(p: Problem, device: torch.device, seed: int) -> Case:
    B, L, H, S = (p.params[n] for n in ("batch", "cache_len", "heads", "q_tokens"))
    gen = generator(device, seed)
    q = randn((B, S, H, DK), torch.bfloat16, device, gen)
    kv = randn((B, L, DK), torch.bfloat16, device, gen)
    inputs = {"q": q, "kv": kv, "softmax_scale": V3.softmax_scale}
    keys = B * L
    if p.params.get("ragged"):
        lens = ragged_lengths(B, L, S, seed)
        inputs["cache_seqlens"] = torch.tensor(lens, dtype=torch.int32, device=device)
        keys = sum(lens)
    nbytes = (keys * DK + B * S * H * DK + B * S * H * DV) * 2
    return Case(p, inputs, flops=2.0 * S * H * keys * (DK + DV), bytes=float(nbytes))


def signature(case: Case) -> tuple[tuple, dict]:
    i = case.inputs
    kwargs = {"cache_seqlens": i["cache_seqlens"]} if "cache_seqlens" in i else {}
    return (i["q"], i["kv"], i["softmax_scale"]), kwargs


def _visible(S: int, H: int, L: int, device: torch.device, seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """(S·H, L) bool: query row (i, h) sees keys 0..L-S+i; with seqlens (B,), (B, S·H, L): keys
    0..seqlens[b]-S+i of sequence b."""
    ends = torch.tensor([L], device=device) if seqlens is None else seqlens.to(device=device, dtype=torch.long)
    pos = ends[:, None] - S + torch.arange(S, device=device).repeat_interleave(H)[None, :]  # (B or 1, S·H)
    visible = torch.arange(L, device=device)[None, None, :] <= pos[:, :, None]
    return visible[0] if seqlens is None else visible


def _math(case: Case):
    q, kv, scale = case.inputs["q"], case.inputs["kv"], case.inputs["softmax_scale"]
    B, S, H, _ = q.shape
    visible = _visible(S, H, kv.shape[1], q.device, case.inputs.get("cache_seqlens"))

    def run():
        rows = q.reshape(B, S * H, DK).float()  # every head attends to the same keys: one wide MQA head
        scores = torch.bmm(rows, kv.float().transpose(1, 2)) * scale  # (B, S·H, L)
        p = scores.masked_fill(~visible, float("-inf")).softmax(-1).to(kv.dtype)
        return torch.bmm(p, kv[..., :DV]).view(B, S, H, DV)

    return run


def _sdpa(case: Case):
    q, kv, scale = case.inputs["q"], case.inputs["kv"], case.inputs["softmax_scale"]
    B, S, H, _ = q.shape
    visible = _visible(S, H, kv.shape[1], q.device, case.inputs.get("cache_seqlens"))
    if visible.ndim == 3:
        visible = visible[:, None]  # (B, 1, S·H, L): one mask per sequence
    rows = q.reshape(B, 1, S * H, DK)
    k, v = kv[:, None], kv[:, None, :, :DV]

    def run():
        o = F.scaled_dot_product_attention(rows, k, v, attn_mask=visible, scale=scale)
        return o.view(B, S, H, DV)

    return run


F_ = FLASHMLA_DECODE
SETS = {
    "tiny": [problem("tiny", 2, 64, 4, 1), problem("tiny", 2, 40, 4, 2)],
    "check": [problem("check", 16, 1024, 16, 2), problem("check", 8, 4096, 128, 1)],
    "quick": [problem("quick", 128, 4096, 128, 1), problem("quick", 128, 8192, 16, 2)],
    "flashmla-decode": [problem("flashmla-decode", F_["batch"], L, H, S)
                        for S in F_["q_tokens"] for H in F_["heads"] for L in F_["cache_len"]],
    "flashmla-ragged": [problem("flashmla-ragged", F_["batch"], L, H, 1, ragged=True)
                        for H in F_["heads"] for L in F_["cache_len"]],
}
SETS["tiny"].append(problem("tiny", 3, 48, 2, 2, ragged=True))

register(Op(
    name=OP,
    summary="MLA decode attention, absorbed form (FlashMLA shapes, equal and ragged lengths)",
    make_case=make_case,
    signature=signature,
    reference=None,
    reference_missing="moela.reference has no standalone MLA decode attention (its MLA module includes "
                      "the projections)",
    shape_sets=SETS,
    compare=close(1e-4),
    kernel="mla_decode",
    baselines=(
        Impl("torch math", _math, note="bmm + float32 softmax + bmm, one wide MQA head"),
        Impl("torch sdpa", _sdpa, note="F.scaled_dot_product_attention, one wide MQA head"),
        flash_mla_impl(DV),
    ),
    baseline_order=("torch sdpa", "torch math"),
    truth="torch math",
    compute="bf16",
))
