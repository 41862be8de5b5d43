"""MLA decode attention in the absorbed form: the definition behind ``moela.kernels.mla_decode``.

Legend: B batch, S new query tokens per sequence, H query heads, L cache length (keys a
sequence may hold), Dk key width (kv_lora_rank + rope dim: 512 + 64 for DeepSeek), Dv =
``v_dim`` value width (the first Dv columns of a key), P page size, NP pages in a pool.

    o[b, i, h]   = Σ_t softmax_t(scale · q[b, i, h] · k[b, t]ᵀ) · k[b, t, :Dv]   over visible t
    lse[b, i, h] = log Σ_t exp(scale · q[b, i, h] · k[b, t]ᵀ)                   (natural log)

Key t of sequence b is visible to query i iff ``t <= len_b - S + i`` (the new tokens are the
last S of the sequence, causal among themselves) and its page is valid. ``len_b = L``, or
``cache_seqlens[b]`` clamped into [0, L] (a fixed-size cache whose sequences hold their first
len_b keys). A query that sees no key gets ``o = 0`` and ``lse = -inf`` (so merging its
``(o, lse)`` with another chunk's by the usual weights ignores it).

Where the keys live (FlashMLA's cache layouts, one contract):

- contiguous: ``kv (B, L, Dk)``, ``k[b, t] = kv[b, t]``;
- paged: ``block_table (B, max_blocks)`` int32 and a page pool ``kv (NP, P, Dk)``; key t of
  sequence b is row ``t % P`` of page ``block_table[b, t // P]``, and L = max_blocks · P. A
  page id outside [0, NP) holds no key: its keys are not visible (``validate=True`` raises);
  pages may be shared between sequences and appear in any order;
- FP8 (``kv`` of dtype float8_e4m3fn, either of the above): each key row is FlashMLA's
  ``W = Dv + 4·Dv/128 + 2·(Dk - Dv)`` bytes (656 for 512 + 64): Dv e4m3 latent values, Dv/128
  float32 scales (one per 128 columns), Dk - Dv bfloat16 rope values; the key is
  ``bf16(e4m3 · scale)`` followed by the rope values (:func:`dequant_latent`). q is bf16.
  :func:`quant_latent` writes it (``quant_act`` with 128-wide blocks).

Scores and softmax are float32 (float64 for float64 inputs) and the probabilities are rounded
to the keys' dtype before the product with the values, as FlashMLA does: every head attends
to the same latent keys, so the S·H query rows of a sequence form one wide multi-query head.
"""

from __future__ import annotations

import torch

from ._checks import (
    FLOAT_DTYPES,
    INT_DTYPES,
    TensorSpec,
    accumulate_dtype,
    check_bool,
    check_float,
    check_has_values,
    check_int,
    check_same_device,
    check_tensor,
)
from .fp8 import FP8_DTYPE, quant_act

__all__ = [
    "mla_decode", "check_mla_decode", "validate_seqlens", "validate_block_table", "quant_latent", "dequant_latent",
    "fp8_latent_width", "FP8_LATENT_BLOCK",
]

#: Columns per float32 scale of the FP8 cache's latent part.
FP8_LATENT_BLOCK = 128


def fp8_latent_width(dk: int, v_dim: int) -> int:
    """Bytes of one FP8 cache row: Dv e4m3 values, Dv/128 float32 scales, Dk - Dv bf16 rope values."""
    return v_dim + 4 * (v_dim // FP8_LATENT_BLOCK) + 2 * (dk - v_dim)


def check_mla_decode(q: object, kv: object, softmax_scale: object, *, v_dim: object = 512,
                     cache_seqlens: object = None, block_table: object = None, return_lse: object = False,
                     validate: object = False) -> TensorSpec | tuple[TensorSpec, TensorSpec]:
    """The contract of ``mla_decode`` (see the module docstring); never reads values.

    q (B, S, H, Dk) float; kv (B, L, Dk), or (NP, P, Dk) with block_table (B, max_blocks)
    int32, of q's dtype, or float8_e4m3fn with FlashMLA's row width and q bf16 (v_dim a
    multiple of 128); S <= L; 1 <= v_dim <= Dk; a finite softmax_scale; cache_seqlens (B,)
    int32/int64 or None; one device. Returns the spec of o (B, S, H, v_dim) in q's dtype, and
    with ``return_lse`` also of lse (B, S, H) float32 (float64 for float64 q).
    """
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    B, S, H, Dk = q.shape
    check_int("v_dim", v_dim, 1)
    if v_dim > Dk:
        raise ValueError(f"v_dim: expected 1 <= v_dim <= Dk={Dk}, got {v_dim}")
    check_tensor("kv", kv, ndim=3, dtypes=(q.dtype, FP8_DTYPE))
    if kv.dtype == FP8_DTYPE:
        if q.dtype != torch.bfloat16:
            raise TypeError(f"q: an FP8 cache (kv float8_e4m3fn) takes bfloat16 queries, got {q.dtype}")
        if v_dim % FP8_LATENT_BLOCK:
            raise ValueError(f"v_dim: an FP8 cache needs a multiple of {FP8_LATENT_BLOCK}, got {v_dim}")
        width, layout = fp8_latent_width(Dk, v_dim), f"FlashMLA's FP8 row for Dk={Dk}, v_dim={v_dim}"
    else:
        width, layout = Dk, "q's Dk"
    if block_table is None:
        if kv.shape[0] != B or kv.shape[2] != width:
            raise ValueError(f"kv: expected shape ({B}, L, {width}) ({layout}; q is {tuple(q.shape)}), "
                             f"got {tuple(kv.shape)}")
        L = kv.shape[1]
    else:
        check_tensor("block_table", block_table, ndim=2, dtypes=(torch.int32,))
        if block_table.shape[0] != B:
            raise ValueError(f"block_table: expected shape ({B}, max_blocks) (q's batch), "
                             f"got {tuple(block_table.shape)}")
        if kv.shape[1] < 1 or kv.shape[2] != width:
            raise ValueError(f"kv: expected a page pool (num_pages, page_size >= 1, {width}) ({layout}), "
                             f"got {tuple(kv.shape)}")
        L = block_table.shape[1] * kv.shape[1]
    if S > L:
        raise ValueError(f"q: expected at most L={L} new tokens (the cache includes them), got S={S}")
    check_float("softmax_scale", softmax_scale)
    if cache_seqlens is not None:
        check_tensor("cache_seqlens", cache_seqlens, dtypes=INT_DTYPES, shape=(B,))
    check_same_device(q=q, kv=kv, cache_seqlens=cache_seqlens, block_table=block_table)
    check_bool("return_lse", return_lse)
    check_bool("validate", validate)
    o = TensorSpec((B, S, H, v_dim), q.dtype)
    return (o, TensorSpec((B, S, H), accumulate_dtype(q.dtype))) if return_lse else o


def validate_seqlens(cache_seqlens: torch.Tensor, S: int, L: int) -> None:
    """Raise ValueError unless every ``S <= cache_seqlens[b] <= L`` (reads the values: a sync)."""
    check_has_values("cache_seqlens", cache_seqlens, "validate=True")
    bad = (cache_seqlens < S) | (cache_seqlens > L)
    if bool(bad.any()):
        b = int(bad.nonzero()[0, 0])
        raise ValueError(f"cache_seqlens: expected lengths in [S={S}, L={L}] (the new tokens are in the cache), "
                         f"got {int(cache_seqlens[b])} for sequence {b}")


def validate_block_table(block_table: torch.Tensor, num_pages: int, page_size: int,
                         cache_seqlens: torch.Tensor | None) -> None:
    """Raise ValueError unless every page a sequence uses (its first ``ceil(len_b / P)`` entries;
    all of them without ``cache_seqlens``) is in [0, num_pages) (reads the values: a sync)."""
    B, max_blocks = block_table.shape
    used = torch.arange(max_blocks, device=block_table.device)[None, :].expand(B, -1)
    if cache_seqlens is not None:
        lens = cache_seqlens.to(torch.int64).clamp(0, max_blocks * page_size)
        used = used < ((lens + page_size - 1) // page_size)[:, None]
    else:
        used = torch.ones_like(used, dtype=torch.bool)
    bad = used & ((block_table < 0) | (block_table >= num_pages))
    if bool(bad.any()):
        b, j = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"block_table: expected page ids in [0, {num_pages}) (the pool's pages), got "
                         f"{int(block_table[b, j])} at [{b}, {j}]")


def quant_latent(latent: torch.Tensor, v_dim: int = 512) -> torch.Tensor:
    """FlashMLA's FP8 cache rows from keys: latent (..., Dk) bf16 -> (..., W) float8_e4m3fn.

    The first ``v_dim`` columns are quantized by ``quant_act`` (128-wide blocks, one float32
    scale each); the rope columns keep their bf16 bits.
    """
    check_tensor("latent", latent, dtypes=(torch.bfloat16,))
    Dk = latent.shape[-1]
    check_int("v_dim", v_dim, 1)
    if v_dim > Dk or v_dim % FP8_LATENT_BLOCK:
        raise ValueError(f"v_dim: expected a multiple of {FP8_LATENT_BLOCK} <= Dk={Dk}, got {v_dim}")
    values, scales = quant_act(latent[..., :v_dim], FP8_LATENT_BLOCK)
    rope = latent[..., v_dim:].contiguous()
    return torch.cat([values.view(torch.uint8), scales.view(torch.uint8), rope.view(torch.uint8)], -1).view(FP8_DTYPE)


def _split_fp8(kv: torch.Tensor, v_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views of FP8 cache rows (..., W): values (..., Dv) e4m3, scales (..., Dv/128) f32, rope (..., R) bf16."""
    nb = v_dim // FP8_LATENT_BLOCK
    raw = kv.view(torch.uint8)
    return (raw[..., :v_dim].view(FP8_DTYPE), raw[..., v_dim:v_dim + 4 * nb].view(torch.float32),
            raw[..., v_dim + 4 * nb:].view(torch.bfloat16))


def dequant_latent(kv: torch.Tensor, v_dim: int = 512) -> torch.Tensor:
    """Keys from FlashMLA's FP8 cache rows: kv (..., W) float8_e4m3fn -> (..., Dk) bf16, the latent
    ``bf16(e4m3 · scale)`` (float32 product, rounded once) followed by the rope values."""
    check_tensor("kv", kv, dtypes=(FP8_DTYPE,))
    check_int("v_dim", v_dim, 1)
    nb = v_dim // FP8_LATENT_BLOCK
    rope2 = kv.shape[-1] - v_dim - 4 * nb
    if v_dim % FP8_LATENT_BLOCK or rope2 < 0 or rope2 % 2:
        raise ValueError(f"kv: rows of {kv.shape[-1]} bytes are no FP8 cache rows for v_dim={v_dim}")
    raw = kv.contiguous()
    values, scales, rope = _split_fp8(raw, v_dim)
    latent = (values.float() * scales.repeat_interleave(FP8_LATENT_BLOCK, -1)).to(torch.bfloat16)
    return torch.cat([latent, rope], -1)


def _keys(kv: torch.Tensor, block_table: torch.Tensor | None, B: int, v_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys (B, L, Dk) each sequence addresses and whether each exists (B, L) (a valid page)."""
    keys = dequant_latent(kv, v_dim) if kv.dtype == FP8_DTYPE else kv
    if block_table is None:
        return keys, torch.ones(keys.shape[:2], dtype=torch.bool, device=kv.device)
    num_pages, page_size = keys.shape[:2]
    valid = (block_table >= 0) & (block_table < num_pages)  # (B, max_blocks)
    if num_pages == 0:  # nothing to gather from: every page id is invalid
        keys = keys.new_zeros(1, *keys.shape[1:])
    pages = block_table.long().clamp(0, max(num_pages - 1, 0))
    return keys[pages].flatten(1, 2), valid.repeat_interleave(page_size, dim=1)


def mla_decode(q: torch.Tensor, kv: torch.Tensor, softmax_scale: float, *, v_dim: int = 512,
               cache_seqlens: torch.Tensor | None = None, block_table: torch.Tensor | None = None,
               return_lse: bool = False, validate: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """MLA decode attention over a latent cache (see the module docstring).

    Args:
        q: (B, S, H, Dk) queries; query i of sequence b sits at position len_b - S + i.
        kv: the latent cache, new tokens included: (B, L, Dk), or a page pool (NP, P, Dk) with
            ``block_table``; float8_e4m3fn rows in FlashMLA's FP8 layout for an FP8 cache.
        softmax_scale: multiplies q·kᵀ before the softmax.
        v_dim: the value width (the first v_dim columns of a key).
        cache_seqlens: optional (B,) lengths, clamped into [0, L] (``validate``: raise instead).
        block_table: optional (B, max_blocks) int32 page ids (paged cache).
        return_lse: also return the log-sum-exp of the scaled scores, (B, S, H) float32.
        validate: raise ValueError on lengths outside [S, L] or used page ids outside the pool
            (reads values: a host sync).

    Returns:
        o (B, S, H, v_dim) in q's dtype, or ``(o, lse)`` with ``return_lse``.
    """
    check_mla_decode(q, kv, softmax_scale, v_dim=v_dim, cache_seqlens=cache_seqlens, block_table=block_table,
                     return_lse=return_lse, validate=validate)
    B, S, H, Dk = q.shape
    keys, exists = _keys(kv, block_table, B, v_dim)  # (B, L, Dk), (B, L)
    L = keys.shape[1]
    if validate:
        if cache_seqlens is not None:
            validate_seqlens(cache_seqlens, S, L)
        if block_table is not None:
            validate_block_table(block_table, kv.shape[0], kv.shape[1], cache_seqlens)
    acc = accumulate_dtype(q.dtype)
    lens = (torch.full((B,), L, device=q.device) if cache_seqlens is None
            else cache_seqlens.to(torch.int64).clamp(0, L))
    t = torch.arange(L, device=q.device)
    exists = exists & (t[None, :] < lens[:, None])  # the keys a sequence holds
    keys = torch.where(exists[..., None], keys, 0)  # others carry no weight, whatever they hold (NaN too)
    pos = lens[:, None] - S + torch.arange(S, device=q.device).repeat_interleave(H)[None, :]  # (B, S·H)
    visible = (t[None, None, :] <= pos[:, :, None]) & exists[:, None, :]  # (B, S·H, L)
    rows = q.reshape(B, S * H, Dk).to(acc)
    scores = (torch.bmm(rows, keys.to(acc).transpose(1, 2)) * softmax_scale).masked_fill(~visible, float("-inf"))
    seen = visible.any(-1, keepdim=True)
    p = torch.where(seen, scores.softmax(-1), 0).to(keys.dtype)  # a row that sees no key: zeros
    o = torch.bmm(p, keys[..., :v_dim]).view(B, S, H, v_dim).to(q.dtype)
    if not return_lse:
        return o
    return o, torch.logsumexp(scores, -1).view(B, S, H)  # -inf where nothing is visible
