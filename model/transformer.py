"""A small DeepSeek-V3-style Transformer for end-to-end checks: embed -> blocks -> norm -> head.

Names follow DeepSeek's checkpoints (``embed``, ``layers.N.attn_norm``, ``layers.N.attn``,
``layers.N.ffn_norm``, ``layers.N.ffn``, ``norm``, ``head``): the first ``n_dense_layers``
blocks use a dense SwiGLU MLP of width ``inter_dim``, the others the MoE layer. With
``args.dtype == "fp8"`` every projection and expert holds e4m3 weights with 128×128
``weight_scale_inv`` blocks (DeepSeek's fp8 checkpoints); with ``args.train_fp8`` they train in
FP8 from floating master weights. The embedding, norms, gate and head stay in the floating dtype
(as in DeepSeek-V3's FP8 training).
"""

from __future__ import annotations

import torch
from torch import nn

from moela.reference import MLP, KVCache, ModelArgs, RMSNorm

from .decode_graph import DEFAULT_BUCKETS, DecodeGraph
from .mla import MLA
from .moe import MoE
from .quantize import quantize_linears_, uses_fp8_linears

__all__ = ["Block", "Transformer"]


class Block(nn.Module):
    """Pre-norm block: ``x + attn(attn_norm(x))`` then ``x + ffn(ffn_norm(x))``."""

    def __init__(self, layer_id: int, args: ModelArgs, attn_impl: str = "absorb"):
        super().__init__()
        self.layer_id = layer_id
        self.attn_norm = RMSNorm(args.dim)
        self.attn = MLA(args, attn_impl)
        self.ffn_norm = RMSNorm(args.dim)
        if layer_id < args.n_dense_layers:
            self.ffn = MLP(args.dim, args.inter_dim)
            if uses_fp8_linears(args):
                quantize_linears_(self.ffn, args)
        else:
            self.ffn = MoE(args)

    def forward(self, x: torch.Tensor, start_pos: int = 0, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), start_pos, cache)
        return x + self.ffn(self.ffn_norm(x))

    def decode(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """A device-side decode step (``MLA.decode``: sequences at different positions)."""
        x = x + self.attn.decode(self.attn_norm(x), positions, cache)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    """``Transformer(args)(tokens (B, S) int, start_pos=0, caches=None) -> logits (B, S, vocab)``."""

    def __init__(self, args: ModelArgs, attn_impl: str = "absorb"):
        super().__init__()
        self.args = args
        self.embed = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(i, args, attn_impl) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim)
        self.head = nn.Linear(args.dim, args.vocab_size, bias=False)

    def new_caches(self, batch: int, max_seq_len: int | None = None) -> list[KVCache]:
        """One KV cache per layer, in the layers' form, dtype and device."""
        return [layer.attn.new_cache(batch, max_seq_len) for layer in self.layers]

    def forward(
        self, tokens: torch.Tensor, start_pos: int = 0, caches: list[KVCache] | None = None
    ) -> torch.Tensor:
        if tokens.ndim != 2 or tokens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"tokens: expected a (B, S) int32/int64 tensor, got {tuple(tokens.shape)} {tokens.dtype}")
        device = self.embed.weight.device
        if tokens.device != device:
            raise ValueError(f"tokens: expected device {device} (the embedding's), got {tokens.device}")
        if caches is not None and len(caches) != len(self.layers):
            raise ValueError(f"caches: expected {len(self.layers)} caches (one per layer), got {len(caches)}")
        h = self.embed(tokens)
        for i, layer in enumerate(self.layers):
            h = layer(h, start_pos, None if caches is None else caches[i])
        return self.head(self.norm(h))

    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, caches: list[KVCache]) -> torch.Tensor:
        """tokens (B, S) at positions ``positions[b] + [0, S)`` of their sequences -> logits (B, S, vocab).

        The device-side decode step (``MLA.decode``): the sequences of the batch may sit at
        different positions, which are read on the device only; nothing reads a value on the
        host, so the step can be captured in a CUDA graph (:meth:`decode_graph`) or compiled with
        ``torch.compile(mode="reduce-overhead")``. The caches come from :meth:`new_caches`
        (``LatentCache``) or ``layer.attn.new_paged_cache`` (pages reserved for the new positions).
        """
        if tokens.ndim != 2 or tokens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"tokens: expected a (B, S) int32/int64 tensor, got {tuple(tokens.shape)} {tokens.dtype}")
        if not isinstance(caches, (list, tuple)) or len(caches) != len(self.layers):
            raise ValueError(f"caches: expected {len(self.layers)} caches (one per layer), got "
                             f"{len(caches) if isinstance(caches, (list, tuple)) else type(caches).__name__}")
        h = self.embed(tokens)
        for layer, cache in zip(self.layers, caches, strict=True):
            h = layer.decode(h, positions, cache)
        return self.head(self.norm(h))

    def decode_graph(self, caches: list[KVCache], batch_sizes: tuple[int, ...] = DEFAULT_BUCKETS, *,
                     capture: bool | None = None) -> DecodeGraph:
        """A :class:`~moela.model.decode_graph.DecodeGraph` of one-token decode steps over ``caches``,
        captured once per batch-size bucket (CUDA graphs; on a CPU it runs eagerly, same contract)."""
        return DecodeGraph(self, caches, batch_sizes, capture=capture)
