"""Drop-in MLA layer: DeepSeek-V3's Multi-head Latent Attention with a KV cache.

moela has no attention kernel yet: the attention math is the reference's (naive or absorbed
form, YaRN RoPE, latent cache, chunked prefill and decode; ``moela.reference.mla``). What this
module adds is the precision: with ``args.dtype == "fp8"`` every projection (``wq``/``wq_a``,
``wq_b``, ``wkv_a``, ``wkv_b``, ``wo``) is an :class:`~moela.model.linear.FP8Linear` holding
e4m3 weights and 128×128 ``weight_scale_inv`` blocks (DeepSeek's fp8 checkpoint), activations
quantized on the fly; the absorbed form dequantizes ``wkv_b`` as DeepSeek does.
"""

from __future__ import annotations

from moela.reference import MLA as _ReferenceMLA
from moela.reference import KVCache, ModelArgs

from .quantize import quantize_linears_

__all__ = ["MLA", "KVCache"]


class MLA(_ReferenceMLA):
    """``MLA(args, attn_impl="absorb")``; ``forward(x (B, S, D), start_pos=0, cache=None)``.

    Example::

        attn = MLA(ModelArgs.from_name("tiny")).bfloat16()
        cache = attn.new_cache(batch=1)
        y = attn(x[:, :8], 0, cache)      # prefill 8 tokens
        y = attn(x[:, 8:9], 8, cache)     # decode the 9th
    """

    def __init__(self, args: ModelArgs, attn_impl: str = "absorb"):
        super().__init__(args, attn_impl)
        if args.dtype == "fp8":
            quantize_linears_(self, args)
