"""mla_decode(q[B,S,H,576], kv, softmax_scale, cache_seqlens=, block_table=) -> o[B,S,H,512]:
MLA decode attention in the absorbed form (FlashMLA's problem), over FlashMLA's cache layouts.

One latent KV head shared by all H query heads: keys are the 576-wide cache rows (512 latent
+ 64 rope), values their first 512 columns. Query i of S sits at position L - S + i and sees
keys 0..L-S+i (causal among the new tokens). FLOPs 2·B·S·H·keys·(576 + 512); bytes: every key
held read once at the cache's own width (1152 bytes a token in bf16, FlashMLA's FP8 row 656),
q and o once, the block table and lengths where there are some.

Sets: ``flashmla-decode`` (a contiguous bf16 cache); ``flashmla-ragged`` (FlashMLA's
variable-length benchmark: sequence b holds ``n_b`` keys of a buffer of ``L`` slots, normal
around L/2 with σ = L/4, clamped into [S, L], seeded; FLOPs and bytes count Σ n_b);
``flashmla-paged`` (64-token pages in a seeded random order, ``block_table``);
``flashmla-fp8`` (FlashMLA's FP8 rows, paged: the e4m3 latent, its float32 scales, the bf16
rope part). The torch baselines run on the dense bf16 cache the problem describes (gathered
from the pages and dequantized outside the timed region): they show what the same attention
costs without moela's layouts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moela import reference
from moela.reference.mla_decode import dequant_latent, fp8_latent_width, quant_latent

from ..registry import Case, Impl, Op, register
from ..shapes import FLASHMLA_DECODE, V3, Problem
from ._common import close, generator, randn
from ._outside import flash_mla_impl

OP = "mla_decode"
DK, DV = FLASHMLA_DECODE["head_dim"], FLASHMLA_DECODE["v_dim"]
PAGE = 64


def problem(set_name: str, b: int, cache: int, heads: int, s: int, ragged: bool = False, paged: bool = False,
            fp8: bool = False) -> Problem:
    tags = "".join(f" {t}" for t, on in (("ragged", ragged), ("paged", paged), ("fp8", fp8)) if on)
    return Problem(OP, set_name, f"B={b} L={cache} H={heads} S={s}{tags}", {
        "series": f"B={b} H={heads} S={s}{tags}", "tokens": cache, "batch": b, "cache_len": cache, "heads": heads,
        "q_tokens": s, "ragged": ragged, "paged": paged, "fp8": fp8})


def ragged_lengths(B: int, L: int, S: int, seed: int) -> list[int]:
    """FlashMLA's variable lengths: normal around L/2 with σ = L/4, clamped into [S, L] (seeded, host)."""
    gen = torch.Generator().manual_seed(seed)
    lens = torch.normal(L / 2, L / 4, (B,), generator=gen).round().clamp(S, L)
    return [int(n) for n in lens]


def make_case(p: Problem, device: torch.device, seed: int) -> Case:
    B, L, H, S = (p.params[n] for n in ("batch", "cache_len", "heads", "q_tokens"))
    paged, fp8 = p.params.get("paged", False), p.params.get("fp8", False)
    gen = generator(device, seed)
    q = randn((B, S, H, DK), torch.bfloat16, device, gen)
    inputs = {"q": q, "softmax_scale": V3.softmax_scale}
    extra = 0
    if paged:  # the sequences' pages in a random order of the pool
        blocks = -(-L // PAGE)
        pool = randn((B * blocks, PAGE, DK), torch.bfloat16, device, gen)
        order = torch.randperm(B * blocks, generator=torch.Generator().manual_seed(seed))
        inputs["block_table"] = order.view(B, blocks).to(device=device, dtype=torch.int32)
        inputs["cache_seqlens"] = torch.full((B,), L, dtype=torch.int32, device=device)
        kv = pool
        extra = B * blocks * 4 + B * 4
    else:
        kv = randn((B, L, DK), torch.bfloat16, device, gen)
    inputs["kv"] = quant_latent(kv, DV) if fp8 else kv
    keys = B * L
    if p.params.get("ragged"):
        lens = ragged_lengths(B, L, S, seed)
        inputs["cache_seqlens"] = torch.tensor(lens, dtype=torch.int32, device=device)
        keys = sum(lens)
        extra = B * 4
    row = fp8_latent_width(DK, DV) if fp8 else DK * 2
    nbytes = keys * row + (B * S * H * DK + B * S * H * DV) * 2 + extra
    return Case(p, inputs, flops=2.0 * S * H * keys * (DK + DV), bytes=float(nbytes))


def signature(case: Case) -> tuple[tuple, dict]:
    i = case.inputs
    kwargs = {k: i[k] for k in ("cache_seqlens", "block_table") if k in i}
    return (i["q"], i["kv"], i["softmax_scale"]), kwargs


def _dense(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 cache (B, L, Dk) the problem describes (pages gathered, FP8 dequantized) and the
    (B, S·H, L) mask of the keys each query row sees; built outside the timed region."""
    i = case.inputs
    q, kv = i["q"], i["kv"]
    keys = dequant_latent(kv, DV) if kv.dtype == torch.float8_e4m3fn else kv
    if "block_table" in i:
        keys = keys[i["block_table"].long()].flatten(1, 2)
    B, S, H, _ = q.shape
    L = keys.shape[1]
    lens = i.get("cache_seqlens", torch.full((B,), L, device=q.device)).long()
    pos = lens[:, None] - S + torch.arange(S, device=q.device).repeat_interleave(H)[None, :]  # (B, S·H)
    return keys, torch.arange(L, device=q.device)[None, None, :] <= pos[:, :, None]


def _math(case: Case):
    q, scale = case.inputs["q"], case.inputs["softmax_scale"]
    kv, visible = _dense(case)
    B, S, H, _ = q.shape

    def run():
        rows = q.reshape(B, S * H, DK).float()  # every head attends to the same keys: one wide MQA head
        scores = torch.bmm(rows, kv.float().transpose(1, 2)) * scale  # (B, S·H, L)
        p = scores.masked_fill(~visible, float("-inf")).softmax(-1).to(kv.dtype)
        return torch.bmm(p, kv[..., :DV]).view(B, S, H, DV)

    return run


def _sdpa(case: Case):
    q, scale = case.inputs["q"], case.inputs["softmax_scale"]
    kv, visible = _dense(case)
    B, S, H, _ = q.shape
    rows, mask = q.reshape(B, 1, S * H, DK), visible[:, None]  # (B, 1, S·H, L): one mask per sequence
    k, v = kv[:, None], kv[:, None, :, :DV]

    def run():
        return F.scaled_dot_product_attention(rows, k, v, attn_mask=mask, scale=scale).view(B, S, H, DV)

    return run


F_ = FLASHMLA_DECODE
_GRID = [(L, H, S) for S in F_["q_tokens"] for H in F_["heads"] for L in F_["cache_len"]]
SETS = {
    "tiny": [problem("tiny", 2, 64, 4, 1), problem("tiny", 2, 40, 4, 2), problem("tiny", 3, 48, 2, 2, ragged=True),
             problem("tiny", 2, 128, 2, 1, paged=True), problem("tiny", 2, 128, 2, 2, paged=True, fp8=True)],
    "check": [problem("check", 16, 1024, 16, 2), problem("check", 8, 4096, 128, 1),
              problem("check", 16, 1024, 16, 2, paged=True, fp8=True)],
    "quick": [problem("quick", 128, 4096, 128, 1), problem("quick", 128, 8192, 16, 2),
              problem("quick", 128, 8192, 16, 1, paged=True), problem("quick", 128, 8192, 16, 1, paged=True, fp8=True)],
    "flashmla-decode": [problem("flashmla-decode", F_["batch"], L, H, S) for L, H, S in _GRID],
    "flashmla-ragged": [problem("flashmla-ragged", F_["batch"], L, H, 1, ragged=True)
                        for H in F_["heads"] for L in F_["cache_len"]],
    "flashmla-paged": [problem("flashmla-paged", F_["batch"], L, H, S, paged=True) for L, H, S in _GRID],
    "flashmla-fp8": [problem("flashmla-fp8", F_["batch"], L, H, S, paged=True, fp8=True) for L, H, S in _GRID],
}

register(Op(
    name=OP,
    summary="MLA decode attention, absorbed form (FlashMLA shapes: equal, ragged, paged and FP8 caches)",
    make_case=make_case,
    signature=signature,
    reference=reference.mla_decode,
    shape_sets=SETS,
    compare=close(1e-4),
    kernel="mla_decode",
    baselines=(
        Impl("torch math", _math, note="bmm + float32 softmax + bmm on the dense bf16 cache, one wide MQA head"),
        Impl("torch sdpa", _sdpa, note="F.scaled_dot_product_attention on the dense bf16 cache, one wide MQA head"),
        flash_mla_impl(DV),
    ),
    baseline_order=("torch sdpa", "torch math"),
    truth="reference",
    compute="bf16",
))
