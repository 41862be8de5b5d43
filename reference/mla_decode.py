"""MLA decode attention in the absorbed form: the definition behind ``moela.kernels.mla_decode``.

Legend: B batch, S new query tokens per sequence, H query heads, L cache length, Dk key width
(kv_lora_rank + rope dim: 512 + 64 for DeepSeek), Dv = ``v_dim`` value width (the first Dv
columns of the cache).

    o[b, i, h] = softmax_t(scale · q[b, i, h] · kv[b, t]ᵀ, t <= len_b - S + i) · kv[b, t, :Dv]

with ``len_b = L``, or ``cache_seqlens[b]`` clamped into [0, L] (a fixed-size cache buffer whose
sequences hold their first len_b keys; ``validate=True`` raises on lengths outside [S, L]). Rows
of kv at or past len_b are never used, whatever they hold (NaN included). A query row that sees
no key gets zeros. Scores and softmax are float32 (float64 for float64
inputs) and the probabilities are rounded to the cache dtype before the product with the values,
as FlashMLA does: every head attends to the same latent keys, so the rows of a sequence form one
wide multi-query head.
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

__all__ = ["mla_decode", "check_mla_decode", "validate_seqlens"]


def check_mla_decode(q: object, kv: object, softmax_scale: object, *, v_dim: object = 512,
                     cache_seqlens: object = None, validate: object = False) -> TensorSpec:
    """The contract of ``mla_decode``: q (B, S, H, Dk), kv (B, L, Dk) of q's float dtype, S <= L,
    1 <= v_dim <= Dk, a finite softmax_scale, cache_seqlens (B,) int32/int64 or None, one device;
    returns the (B, S, H, v_dim) output's spec."""
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("kv", kv, ndim=3, dtypes=(q.dtype,))
    B, S, H, Dk = q.shape
    if kv.shape[0] != B or kv.shape[2] != Dk:
        raise ValueError(f"kv: expected shape ({B}, L, {Dk}) (q is {tuple(q.shape)}), got {tuple(kv.shape)}")
    if S > kv.shape[1]:
        raise ValueError(f"q: expected at most L={kv.shape[1]} new tokens (kv includes them), got S={S}")
    check_int("v_dim", v_dim, 1)
    if v_dim > Dk:
        raise ValueError(f"v_dim: expected 1 <= v_dim <= Dk={Dk}, got {v_dim}")
    check_float("softmax_scale", softmax_scale)
    if cache_seqlens is not None:
        check_tensor("cache_seqlens", cache_seqlens, dtypes=INT_DTYPES, shape=(B,))
    check_same_device(q=q, kv=kv, cache_seqlens=cache_seqlens)
    check_bool("validate", validate)
    return TensorSpec((B, S, H, v_dim), q.dtype)


def validate_seqlens(cache_seqlens: torch.Tensor, S: int, L: int) -> None:
    """Raise ValueError unless every ``S <= cache_seqlens[b] <= L`` (reads the values: a sync)."""
    check_has_values("cache_seqlens", cache_seqlens, "validate=True")
    bad = (cache_seqlens < S) | (cache_seqlens > L)
    if bool(bad.any()):
        b = int(bad.nonzero()[0, 0])
        raise ValueError(f"cache_seqlens: expected lengths in [S={S}, L={L}] (the new tokens are in the cache), "
                         f"got {int(cache_seqlens[b])} for sequence {b}")


def mla_decode(q: torch.Tensor, kv: torch.Tensor, softmax_scale: float, *, v_dim: int = 512,
               cache_seqlens: torch.Tensor | None = None, validate: bool = False) -> torch.Tensor:
    """MLA decode attention over a latent cache (see the module docstring): o (B, S, H, v_dim) in q's dtype.

    Args:
        q: (B, S, H, Dk) queries; query i of sequence b sits at position len_b - S + i.
        kv: (B, L, Dk) the latent cache, new tokens included: keys are all Dk columns, values
            the first ``v_dim``.
        softmax_scale: multiplies q·kᵀ before the softmax.
        cache_seqlens: optional (B,) lengths, clamped into [0, L] (``validate``: raise instead).
    """
    check_mla_decode(q, kv, softmax_scale, v_dim=v_dim, cache_seqlens=cache_seqlens, validate=validate)
    B, S, H, Dk = q.shape
    L = kv.shape[1]
    if validate and cache_seqlens is not None:
        validate_seqlens(cache_seqlens, S, L)
    acc = accumulate_dtype(q.dtype)
    lens = (torch.full((B,), L, device=q.device) if cache_seqlens is None
            else cache_seqlens.to(torch.int64).clamp(0, L))
    pos = lens[:, None] - S + torch.arange(S, device=q.device).repeat_interleave(H)[None, :]  # (B, S·H)
    visible = torch.arange(L, device=q.device)[None, None, :] <= pos[:, :, None]  # (B, S·H, L)
    rows = q.reshape(B, S * H, Dk).to(acc)
    scores = torch.bmm(rows, kv.to(acc).transpose(1, 2)) * softmax_scale
    p = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    p = torch.where(visible.any(-1, keepdim=True), p, 0).to(q.dtype)  # a row that sees no key: zeros
    in_cache = torch.arange(L, device=q.device)[None, :, None] < lens[:, None, None]  # (B, L, 1)
    values = kv[..., :v_dim].masked_fill(~in_cache, 0)  # rows past len_b hold no data (0·NaN would be NaN)
    return torch.bmm(p, values).view(B, S, H, v_dim)
