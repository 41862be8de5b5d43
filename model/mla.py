"""Drop-in MLA layer: DeepSeek-V3's Multi-head Latent Attention with a KV cache.

The layer is the reference's (naive or absorbed form, YaRN RoPE, latent cache, chunked prefill
and decode; ``moela.reference.mla``) with three additions:

- Decode on the kernels: in the absorbed form, a step of at most ``DECODE_MAX_TOKENS`` new
  tokens per sequence over a cache runs its attention through ``moela.kernels.mla_decode``
  (FlashMLA's problem: one latent head shared by all query heads) when ``args.backend`` picks
  the kernels ("triton", or "auto" on CUDA) and no gradient is recorded. The caches this module
  builds are in the kernel's layouts (``moela.model.latent_cache``): :meth:`MLA.new_cache`, a
  :class:`LatentCache` (the latent ``kv`` and the rotary key ``pe`` side by side in one
  (batch, T_max, C + R) buffer), and :meth:`MLA.new_paged_cache`, a :class:`PagedLatentCache`
  (FlashMLA's 64-token pages, block table and lengths on the device, pages allocated as
  sequences grow). ``fp8=True`` on either stores FlashMLA's FP8 rows (e4m3 latent quantized when
  written, one float32 scale per 128 columns, bf16 rope: 656 bytes a token for DeepSeek); the
  default keeps the model's dtype. Other short steps over a cache (the reference layer's two
  buffers, or a step that records gradients) run the reference's absorbed attention over the
  cache's (dequantized) prefix, O(S·H·T) for S new tokens.
- Prefill on SDPA: a longer step, or a forward without a cache (training), in bf16/fp16 with
  the kernels backend expands the latent into per-head keys and values (``wkv_b``, as DeepSeek's and vLLM's
  prefill do) and runs ``F.scaled_dot_product_attention`` (causal, or a mask for a chunk after
  a cached prefix; torch picks a memory-efficient backend: keys 192 wide, values 128): memory
  linear in the sequence instead of the reference's float32 (B, S, H, T) score tensor.
  Differentiable. A chunk after a cached prefix re-expands the whole prefix.
- Precision: with ``args.dtype == "fp8"`` every projection (``wq``/``wq_a``, ``wq_b``,
  ``wkv_a``, ``wkv_b``, ``wo``) is an :class:`~moela.model.linear.FP8Linear` holding e4m3
  weights and 128×128 ``weight_scale_inv`` blocks (DeepSeek's fp8 checkpoint), activations
  quantized on the fly; the absorbed form dequantizes ``wkv_b`` as DeepSeek does. With
  ``args.train_fp8`` they are trainable FP8Linear layers over floating master weights (FP8
  forward and backward GEMMs); the attention itself, and the absorbed form's use of ``wkv_b``'s
  weight, stay in the floating dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import einsum

from moela.reference import MLA as _ReferenceMLA
from moela.reference import KVCache, ModelArgs, precompute_freqs_cis
from moela.reference._checks import accumulate_dtype as _acc_dtype
from moela.reference._checks import check_tensor

from .backend import ops_for
from .latent_cache import PAGE_SIZE, LatentCache, PagedLatentCache
from .quantize import quantize_linears_, uses_fp8_linears

__all__ = ["MLA", "KVCache", "LatentCache", "PagedLatentCache", "DECODE_MAX_TOKENS"]

#: The most new tokens per sequence a step may have to run on the decode kernel (decode, and
#: speculative/multi-token-prediction steps); longer steps are prefill chunks.
DECODE_MAX_TOKENS = 16

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SDPA_DTYPES = (torch.float16, torch.bfloat16)


class MLA(_ReferenceMLA):
    """``MLA(args, attn_impl="absorb")``; ``forward(x (B, S, D), start_pos=0, cache=None)``.

    Example::

        attn = MLA(ModelArgs.from_name("tiny")).bfloat16()
        cache = attn.new_cache(batch=1)
        y = attn(x[:, :8], 0, cache)      # prefill 8 tokens
        with torch.no_grad():
            y = attn(x[:, 8:9], 8, cache)  # decode the 9th (moela.kernels.mla_decode on CUDA)
    """

    def __init__(self, args: ModelArgs, attn_impl: str = "absorb"):
        super().__init__(args, attn_impl)
        if uses_fp8_linears(args):
            quantize_linears_(self, args)

    def new_cache(
        self,
        batch: int,
        max_seq_len: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        *,
        fp8: bool = False,
    ) -> KVCache:
        """A zeroed cache; absorbed form: a :class:`LatentCache` (one (batch, T_max, W) buffer the
        decode kernel reads in place; ``fp8=True``: FlashMLA's FP8 rows, computing in bf16).
        Otherwise as the reference's ``new_cache``."""
        if self.attn_impl != "absorb":
            if fp8:
                raise ValueError("fp8: an FP8 cache holds the absorbed form's latent; this layer is 'naive'")
            return super().new_cache(batch, max_seq_len, dtype, device)
        max_seq_len, dtype, device = self._cache_defaults(max_seq_len, dtype, device)
        return LatentCache.zeros(batch, max_seq_len, self.kv_lora_rank, self.qk_rope_head_dim, dtype=dtype,
                                 device=device, fp8=fp8, quant=self._quant_act(device))

    def new_paged_cache(
        self,
        num_pages: int,
        batch: int,
        max_seq_len: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        *,
        fp8: bool = False,
        page_size: int = PAGE_SIZE,
    ) -> PagedLatentCache:
        """A :class:`PagedLatentCache` of ``num_pages`` pages (absorbed form only): ``batch``
        sequences of up to ``max_seq_len`` positions (default ``args.max_seq_len``) take pages as
        they grow; ``fp8=True``: FlashMLA's FP8 rows."""
        if self.attn_impl != "absorb":
            raise ValueError("new_paged_cache: a paged cache holds the absorbed form's latent; this layer is 'naive'")
        max_seq_len, dtype, device = self._cache_defaults(max_seq_len, dtype, device)
        return PagedLatentCache(num_pages, batch, max_seq_len, self.kv_lora_rank, self.qk_rope_head_dim, dtype=dtype,
                                device=device, fp8=fp8, page_size=page_size, quant=self._quant_act(device))

    def _quant_act(self, device: torch.device | str):
        """The FP8 caches' quantizer: the kernels' quant_act on the kernels backend (bit for bit the reference's)."""
        return ops_for(self.args.backend, torch.device(device)).quant_act

    def _decode_kernel(self, q_nope, q_pe, kv, k_pe, cache: KVCache | None):
        """``moela.kernels.mla_decode`` when this step may run on it, else None."""
        if not isinstance(cache, (LatentCache, PagedLatentCache)):  # no cache, or the reference's two buffers
            return None
        if q_nope.shape[1] > DECODE_MAX_TOKENS or cache.dtype not in _KERNEL_DTYPES:
            return None
        if any(t.dtype != cache.dtype for t in (q_nope, q_pe, kv, k_pe)):  # autocast: the reference's math
            return None
        if torch.is_grad_enabled() and any(  # the kernel has no backward: whatever feeds it must need no grad
                t.requires_grad for t in (q_nope, q_pe, kv, k_pe, self.wkv_b.weight)):
            return None
        ops = ops_for(self.args.backend, q_nope.device)  # the references have no decode kernel: their math
        if ops.__name__ != "moela.kernels":
            return None
        return ops.mla_decode

    def _prefill_on_sdpa(self, q_nope, q_pe, kv, k_pe, cache: KVCache | None) -> bool:
        """Prefill (a step longer than a decode step) or no cache, the kernels backend, 16-bit."""
        if cache is not None and q_nope.shape[1] <= DECODE_MAX_TOKENS:
            return False  # a short step over a cache: expanding the prefix would cost far more than attending
        if q_nope.dtype not in _SDPA_DTYPES or any(t.dtype != q_nope.dtype for t in (q_pe, kv, k_pe)):
            return False  # float32/64: the reference's exact math (SDPA's fast fp32 kernels may use TF32)
        return ops_for(self.args.backend, q_nope.device).__name__ == "moela.kernels"

    def _attend_sdpa(self, q_nope, q_pe, kv, k_pe, start_pos, key_start, cache):
        """Per-head keys and values from the latent, then F.scaled_dot_product_attention.

        Query i sits at start_pos + i, key t at key_start + t (0 with a cache: the prefix);
        t is visible iff key_start + t <= start_pos + i. Returns (B, S, H, Dv).
        """
        if cache is not None:
            kv, k_pe = cache.update(start_pos, kv=kv, pe=k_pe)  # (B, T, C), (B, T, R): prefix + new
        w_uk, w_uv = self._absorbed_weights(q_nope.dtype)  # (H, Dn, C), (H, Dv, C)
        k_nope = einsum(kv, w_uk, "b t c, h d c -> b h t d")
        v = einsum(kv, w_uv, "b t c, h d c -> b h t d")
        k = torch.cat([k_nope, k_pe[:, None].expand(-1, self.n_heads, -1, -1)], dim=-1)  # (B, H, T, Dk)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)  # (B, H, S, Dk)
        s, t = q.shape[2], k.shape[2]
        if start_pos == key_start and s == t:  # the S tokens attend causally to each other only
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
        else:  # a chunk after a cached prefix: bottom-right aligned causal mask
            q_pos = torch.arange(start_pos, start_pos + s, device=q.device)
            visible = torch.arange(key_start, key_start + t, device=q.device)[None, :] <= q_pos[:, None]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=self.softmax_scale)
        return o.transpose(1, 2)  # (B, S, H, Dv)

    def _attend_absorbed(self, q_nope, q_pe, kv, k_pe, start_pos, key_start, cache):
        if self._prefill_on_sdpa(q_nope, q_pe, kv, k_pe, cache):
            return self._attend_sdpa(q_nope, q_pe, kv, k_pe, start_pos, key_start, cache)
        mla_decode = self._decode_kernel(q_nope, q_pe, kv, k_pe, cache)
        if mla_decode is not None:
            w_uk, w_uv = self._absorbed_weights(q_nope.dtype)  # (H, Dn, C), (H, Dv, C)
            q_lat = einsum(q_nope, w_uk, "b s h d, h d c -> b s h c")  # (B, S, H, C)
            if q_lat.dtype != cache.dtype:  # autocast inside the projections
                mla_decode = None
        if mla_decode is None:
            return super()._attend_absorbed(q_nope, q_pe, kv, k_pe, start_pos, key_start, cache)
        end = cache.write(start_pos, kv=kv, pe=k_pe)  # (FP8: quantized as it is written)
        inputs = cache.decode_inputs(q_nope.shape[0], end)
        q = torch.cat([q_lat, q_pe], dim=-1)  # (B, S, H, C + R), the kernel's query
        o_lat = mla_decode(q, inputs["kv"], self.softmax_scale, v_dim=self.kv_lora_rank,
                           cache_seqlens=inputs["cache_seqlens"], block_table=inputs["block_table"])  # (B, S, H, C)
        return einsum(o_lat, w_uv, "b s h c, h d c -> b s h d")

    # ------------------------------------------------------------------ device-side decode
    def decode(self, x: torch.Tensor, positions: torch.Tensor, cache: LatentCache | PagedLatentCache
               ) -> torch.Tensor:
        """A decode step of a batch whose sequences sit at different positions, all on the device.

        x: (B, S, D), S <= ``DECODE_MAX_TOKENS`` new tokens per sequence; positions: (B,) int32/int64
        on x's device, the position of each sequence's first new token (its length before the
        step); cache: a :class:`LatentCache` or :class:`PagedLatentCache` of at least B sequences
        (a paged one with the pages reserved). The keys are written at ``positions[b] + [0, S)``
        and the attention runs on ``mla_decode`` with lengths ``positions + S`` read on the
        device: no host read, no allocation that depends on values, so the step can be captured
        in a CUDA graph and replayed as the lengths grow. Returns (B, S, D); no gradient.
        """
        self._check_decode(x, positions, cache)
        b, s, _ = x.shape
        acc = _acc_dtype(x.dtype)
        table = self._rotary_table(acc, x.device)  # (max_seq_len, R/2)
        idx = (positions.long()[:, None] + torch.arange(s, device=x.device)).clamp(0, table.shape[0] - 1)
        with torch.no_grad():
            q_nope, q_pe, kv, k_pe = self._project(x, table[idx])  # rotated at each sequence's positions
            cache.write_at(positions, kv=kv.to(cache.dtype), pe=k_pe.to(cache.dtype))
            w_uk, w_uv = self._absorbed_weights(cache.dtype)  # (H, Dn, C), (H, Dv, C)
            q_lat = einsum(q_nope.to(cache.dtype), w_uk, "b s h d, h d c -> b s h c")  # (B, S, H, C)
            q = torch.cat([q_lat, q_pe.to(cache.dtype)], dim=-1)  # (B, S, H, C + R)
            inputs = cache.decode_inputs(b, None)
            lens = (positions + s).to(torch.int32)
            o_lat = ops_for(self.args.backend, x.device).mla_decode(
                q, inputs["kv"], self.softmax_scale, v_dim=self.kv_lora_rank, cache_seqlens=lens,
                block_table=inputs["block_table"])  # (B, S, H, C)
            o = einsum(o_lat, w_uv, "b s h c, h d c -> b s h d").to(x.dtype)
            return self.wo(o.flatten(2))

    def _rotary_table(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The rotary factors of every position up to ``args.max_seq_len`` (computed once per dtype and device)."""
        tables = self.__dict__.setdefault("_rotary_tables", {})
        key = (dtype, device)
        if key not in tables:
            tables[key] = precompute_freqs_cis(self.args, dtype=dtype, device=device)
        return tables[key]

    def _check_decode(self, x: object, positions: object, cache: object) -> None:
        if self.attn_impl != "absorb":
            raise ValueError("decode: the device-side decode step runs the absorbed form; this layer is 'naive'")
        check_tensor("x", x, ndim=3)
        if x.shape[-1] != self.dim:
            raise ValueError(f"x: expected shape (B, S, {self.dim}), got {tuple(x.shape)}")
        if not 1 <= x.shape[1] <= DECODE_MAX_TOKENS:
            raise ValueError(f"x: a decode step takes 1 to {DECODE_MAX_TOKENS} new tokens per sequence, "
                             f"got shape {tuple(x.shape)}")
        if not isinstance(cache, (LatentCache, PagedLatentCache)):
            raise TypeError(f"cache: expected a LatentCache or PagedLatentCache (MLA.new_cache / new_paged_cache), "
                            f"got {type(cache).__name__}")
        check_tensor("positions", positions, dtypes=(torch.int32, torch.int64), shape=(x.shape[0],))
        for name, dev in (("positions", positions.device), ("cache", cache.device)):
            if dev != x.device:
                raise ValueError(f"{name}: expected device {x.device} (x's), got {dev}")
        if x.shape[0] > cache.batch_size:
            raise ValueError(f"cache: holds {cache.batch_size} sequences, x has {x.shape[0]}")
