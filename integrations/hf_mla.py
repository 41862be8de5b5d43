"""moela's absorbed MLA as the forward of transformers' ``DeepseekV3Attention``/``DeepseekV2Attention``.

Legend: B batch, S new tokens, T keys (the cache's length: cached prefix + new tokens, or a
``StaticCache``'s whole buffer), H heads, Dn/R/Dv no-position/rotary/value head dims, C the
latent width (``kv_lora_rank``), W = C + R one cached row.

:func:`mla_forward` runs on the module's own parameters (``q_proj`` or ``q_a_proj``/
``q_a_layernorm``/``q_b_proj``, ``kv_a_proj_with_mqa``, ``kv_a_layernorm``, ``kv_b_proj``,
``o_proj``) and its model's rotary embedding, then attends in the absorbed form: ``kv_b_proj``
splits into W_uk (H, Dn, C), folded into the queries, and W_uv (H, Dv, C), applied after the
attention-weighted sum of latents, so only the latent is ever cached.

The cache: transformers 5 already caches DeepSeek's latent in its ``Cache`` (keys: the latent,
values: the rotary key). Here each layer stores one row per token, ``[latent | rotary key]``
(B, 1, T, W), as the keys (the values are empty, (B, 1, T, 0)): the layout the decode kernel
reads in place, inside HF's own ``Cache``, so ``get_seq_length``, positions, masks, beam
reordering, cropping and ``StaticCache`` work unchanged. A cache filled by a patched model
belongs to it (an unpatched model cannot read it).

Three paths, each honouring the 4-D ``attention_mask`` that transformers builds for
``attn_implementation`` "sdpa" (bool, True = visible, or None when causal order alone decides)
or "eager" (additive float):

- decode kernel: ``moela.kernels.mla_decode`` over the cached rows when the backend is the
  kernels', no mask was needed (no padding), at most ``DECODE_MAX_TOKENS`` new tokens and no
  gradient to record; the causal alignment goes through ``cache_seqlens``;
- SDPA prefill: longer steps or no cache, 16-bit, kernels backend: per-head keys and values
  expanded from the latent, ``F.scaled_dot_product_attention`` with the mask;
- the absorbed math otherwise (the references' formulation, every mask, differentiable):
  scores in float32 (float64 for float64) over the W columns of each row, probabilities cast
  to the cache's dtype before they weight the latents; a query row that sees no key gets zeros.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import einsum

from moela.model.backend import ops_for
from moela.model.mla import DECODE_MAX_TOKENS
from moela.reference.fp8 import FP8_DTYPE, dequant

__all__ = ["mla_forward", "rope_for"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SDPA_DTYPES = (torch.float16, torch.bfloat16)


def rope_for(attn: torch.nn.Module) -> Callable:
    """The rotary embedding of ``attn``'s modeling file, as ``rope(q (B, H, S, R), k (B, 1, S, R),
    position_embeddings) -> (q, k)``: DeepSeek-V3's cos/sin (interleaved pairs or halves, from
    ``config.rope_interleave``) or DeepSeek-V2's complex ``freqs_cis``."""
    modeling = sys.modules[type(attn).__module__]
    if hasattr(modeling, "apply_rotary_pos_emb_interleave"):  # deepseek_v3
        interleave = getattr(attn.config, "rope_interleave", True)
        fn = modeling.apply_rotary_pos_emb_interleave if interleave else modeling.apply_rotary_pos_emb

        def rope_v3(q, k, position_embeddings):
            cos, sin = position_embeddings
            return fn(q, k, cos, sin)

        return rope_v3

    def rope_v2(q, k, position_embeddings):
        return modeling.apply_rotary_emb(q, k, position_embeddings)

    return rope_v2


def _absorbed_weights(attn: torch.nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``kv_b_proj``'s weight per head: W_uk (H, Dn, C) and W_uv (H, Dv, C), in ``dtype``; an FP8
    ``kv_b_proj`` (e4m3 with 128×128 ``weight_scale_inv``) is dequantized, as DeepSeek does."""
    proj = attn.kv_b_proj
    w = proj.weight  # (H·(Dn + Dv), C)
    if w.dtype == FP8_DTYPE:
        block = tuple(getattr(proj, "block_size", None) or (128, 128))
        if block != (128, 128):
            raise ValueError(f"kv_b_proj.block_size: moela dequantizes 128×128 weight blocks, got {block}")
        w = dequant(w, proj.weight_scale_inv.float(), out_dtype=dtype)
    w = w.to(dtype).view(attn.num_heads, attn.qk_nope_head_dim + attn.v_head_dim, -1)
    return w[:, : attn.qk_nope_head_dim], w[:, attn.qk_nope_head_dim :]


def _check_mask(mask: object, b: int, s: int, t: int) -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.ndim != 4:
        raise TypeError(
            "attention_mask: moela's MLA takes the 4-D masks of attn_implementation 'sdpa' or 'eager', got "
            f"{type(mask).__name__}{tuple(mask.shape) if isinstance(mask, torch.Tensor) else ''}; "
            "call model.set_attn_implementation('sdpa')")
    if mask.shape[1] != 1 or mask.shape[0] not in (1, b) or mask.shape[2] != s or mask.shape[3] != t:
        raise ValueError(f"attention_mask: expected shape ({b}, 1, {s}, {t}) (batch, 1, new tokens, keys), "
                         f"got {tuple(mask.shape)}")


def _attend_math(q: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor | None, scale: float,
                 c: int) -> torch.Tensor:
    """q (B, H, S, W) in latent space, rows (B, T, W) -> o_lat (B, H, S, C)."""
    s, t = q.shape[2], rows.shape[1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = einsum(q.to(acc), rows.to(acc), "b h s w, b t w -> b h s t") * scale
    if mask is None:  # causal order alone: upper-left aligned for several tokens, every key for one
        visible = (torch.arange(t, device=q.device)[None, :] <= torch.arange(s, device=q.device)[:, None]
                   if s > 1 else None)
    elif mask.dtype == torch.bool:
        visible = mask
    else:  # an additive mask (eager)
        scores, visible = scores + mask.to(acc), None
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    p = scores.softmax(dim=-1)
    if visible is not None:  # a row that sees no key (a padding query): zeros, as torch's SDPA
        p = torch.where(visible.any(dim=-1, keepdim=True), p, 0)
    return einsum(p.to(rows.dtype), rows[..., :c], "b h s t, b t c -> b h s c")


def _attend_sdpa(q_nope, q_rot, rows, mask, scale, w_uk, w_uv, c):
    """Per-head keys and values expanded from the latent, then SDPA. Returns (B, H, S, Dv)."""
    kv, k_rot = rows[..., :c], rows[..., c:]
    k_nope = einsum(kv, w_uk, "b t c, h d c -> b h t d")
    v = einsum(kv, w_uv, "b t c, h d c -> b h t d")
    k = torch.cat([k_nope, k_rot[:, None].expand(-1, k_nope.shape[1], -1, -1)], dim=-1)  # (B, H, T, Dn + R)
    q = torch.cat([q_nope, q_rot], dim=-1)  # (B, H, S, Dn + R)
    causal = mask is None and q.shape[2] > 1  # upper-left aligned, as transformers' SDPA path
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)


def mla_forward(self: torch.nn.Module, hidden_states: torch.Tensor, position_embeddings=None,
                attention_mask: torch.Tensor | None = None, cache=None, **kwargs) -> tuple[torch.Tensor, None]:
    """The patched forward of a DeepseekV2/V3 attention module ``self`` (bound per instance):
    hidden_states (B, S, D) -> (out (B, S, D), None); ``cache`` is transformers' ``Cache``."""
    state = self._moela
    if cache is None:
        cache = kwargs.pop("past_key_values", None)
    if self.training and self.attention_dropout:
        raise ValueError(f"attention_dropout: moela's MLA has no attention dropout, got {self.attention_dropout} "
                         "in training mode")
    b, s, _ = hidden_states.shape
    h, dn, r, c = self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.kv_lora_rank

    if self.q_lora_rank is None:
        q = self.q_proj(hidden_states)
    else:
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
    q = q.view(b, s, h, dn + r).transpose(1, 2)  # (B, H, S, Dn + R)
    q_nope, q_rot = torch.split(q, [dn, r], dim=-1)
    kv, k_rot = torch.split(self.kv_a_proj_with_mqa(hidden_states), [c, r], dim=-1)
    kv = self.kv_a_layernorm(kv).view(b, 1, s, c)
    q_rot, k_rot = state.rope(q_rot, k_rot.view(b, 1, s, r), position_embeddings)
    rows = torch.cat([kv, k_rot.to(kv.dtype)], dim=-1)  # (B, 1, S, W): one cached row per token
    if cache is not None:
        rows, _ = cache.update(rows, rows.new_empty(b, 1, s, 0), self.layer_idx, kwargs=kwargs)
    rows = rows[:, 0]  # (B, T, W)
    t = rows.shape[1]
    _check_mask(attention_mask, b, s, t)

    ops = ops_for(state.backend, hidden_states.device)
    on_kernels = ops.__name__ == "moela.kernels"
    w_uk, w_uv = _absorbed_weights(self, q_nope.dtype)
    if on_kernels and (cache is None or s > DECODE_MAX_TOKENS) and q_nope.dtype in _SDPA_DTYPES:
        o = _attend_sdpa(q_nope, q_rot, rows, attention_mask, self.scaling, w_uk, w_uv, c)  # (B, H, S, Dv)
        o = o.transpose(1, 2)
    else:
        q_lat = torch.cat([einsum(q_nope, w_uk, "b h s d, h d c -> b h s c"), q_rot.to(q_nope.dtype)], dim=-1)
        needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q_lat, rows, w_uv))
        if (on_kernels and attention_mask is None and s <= DECODE_MAX_TOKENS and not needs_grad
                and rows.dtype in _KERNEL_DTYPES and q_lat.dtype == rows.dtype):
            lens = None if s == 1 or t == s else torch.full((b,), s, dtype=torch.int32, device=rows.device)
            o_lat = ops.mla_decode(q_lat.transpose(1, 2), rows, self.scaling, v_dim=c, cache_seqlens=lens)
            o = einsum(o_lat, w_uv, "b s h c, h d c -> b s h d")
        else:
            o_lat = _attend_math(q_lat, rows, attention_mask, self.scaling, c)  # (B, H, S, C)
            o = einsum(o_lat, w_uv, "b h s c, h d c -> b s h d")
    return self.o_proj(o.reshape(b, s, -1)), None
