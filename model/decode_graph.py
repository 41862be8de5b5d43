"""A Transformer's one-token decode step captured in CUDA graphs, one per batch-size bucket.

Legend: B active sequences this step, Bk the bucket (the smallest captured size >= B), T_max
the caches' positions, V the vocabulary.

Everything a step reads or writes lives in static buffers: the tokens (Bk, 1), the positions
(Bk,) int32 of the next token of every slot, the logits (Bk, V), the caches. The captured step
(``Transformer.decode_step``) writes each active sequence's key at its position, attends over
its ``position + 1`` keys (``mla_decode`` with ``cache_seqlens`` read on the device), and
advances the positions of the active slots on the device; the padding rows of a bucket write
their slot's last cache row (a row any sequence writes before it reads it) and do not advance.
No host sync and no allocation happen in the step, so one graph per bucket serves every length.
The host keeps a copy of the lengths to refuse a step past T_max and, for a paged cache, to
reserve pages before each replay (``PagedLatentCache.reserve``: the block table changes outside
the graph, the pool stays put).

On a CPU (no CUDA graphs) the same step runs eagerly on the same static buffers: the tests pin
the contract there. Use::

    caches = model.new_caches(batch=8)
    graph = model.decode_graph(caches, batch_sizes=(1, 2, 4, 8))
    graph.set_lengths([17, 5, 9])           # slots 0-2 hold prefills of these lengths
    logits = graph.step(next_tokens)        # (3, V), a view of a static buffer: copy to keep it
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from moela.reference import KVCache
from moela.reference._checks import check_int, check_tensor

from .latent_cache import LatentCache, PagedLatentCache

__all__ = ["DecodeGraph", "DEFAULT_BUCKETS"]

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class DecodeGraph:
    """One-token decode steps of ``model`` (a ``moela.model.Transformer``) over ``caches``.

    Args:
        model: the Transformer (absorbed MLA); put it in eval mode.
        caches: one ``LatentCache`` or ``PagedLatentCache`` per layer, each of at least
            ``max(batch_sizes)`` sequences (slot b of the graph is sequence b of every cache).
        batch_sizes: the buckets captured.
        capture: CUDA graphs (default: when the caches are on a GPU); False runs eagerly.
    """

    def __init__(self, model: nn.Module, caches: Sequence[KVCache], batch_sizes: Sequence[int] = DEFAULT_BUCKETS,
                 *, capture: bool | None = None):
        if not isinstance(caches, (list, tuple)) or not caches:
            raise TypeError(f"caches: expected a list of caches, one per layer, got {type(caches).__name__}")
        for i, c in enumerate(caches):
            if not isinstance(c, (LatentCache, PagedLatentCache)):
                raise TypeError(f"caches[{i}]: expected a LatentCache or PagedLatentCache, got {type(c).__name__}")
        if not batch_sizes:
            raise ValueError("batch_sizes: expected at least one bucket")
        self.buckets = tuple(sorted({check_int("batch_sizes", b, 1) for b in batch_sizes}))
        slots = min(c.batch_size for c in caches)
        if self.buckets[-1] > slots:
            raise ValueError(f"batch_sizes: the largest bucket {self.buckets[-1]} exceeds the caches' "
                             f"{slots} sequences")
        self.model, self.caches = model, list(caches)
        self.device = caches[0].device
        self.capture = self.device.type == "cuda" if capture is None else bool(capture)
        if self.capture and self.device.type != "cuda":
            raise ValueError(f"capture: CUDA graphs need the caches on a GPU, they are on {self.device}")
        self.max_seq_len = min(c.max_seq_len for c in caches)
        n = self.buckets[-1]
        self.tokens = torch.zeros(n, 1, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(n, dtype=torch.int32, device=self.device)
        self.active = torch.zeros((), dtype=torch.int32, device=self.device)
        self.lengths = [0] * n  # the host's copy of the active slots' lengths
        self._slot = torch.arange(n, dtype=torch.int32, device=self.device)
        self._logits: dict[int, torch.Tensor] = {}
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}

    # ------------------------------------------------------------------ state
    def set_lengths(self, lengths: Sequence[int]) -> None:
        """Slots [0, len(lengths)) hold sequences of these lengths (their next token's position)."""
        lengths = [check_int("lengths", n, 0) for n in lengths]
        if len(lengths) > len(self.lengths):
            raise ValueError(f"lengths: {len(lengths)} sequences, the graph has {len(self.lengths)} slots")
        if any(n >= self.max_seq_len for n in lengths):
            raise ValueError(f"lengths: a sequence is full (max_seq_len {self.max_seq_len}), got {max(lengths)}")
        self.lengths[:len(lengths)] = lengths
        self.positions[:len(lengths)].copy_(torch.tensor(lengths, dtype=torch.int32))

    # ------------------------------------------------------------------ the step
    def _run(self, bucket: int) -> None:
        """The captured work of one bucket: every read and write in static buffers."""
        live = self._slot[:bucket] < self.active
        pos = torch.where(live, self.positions[:bucket], self.max_seq_len - 1)
        logits = self.model.decode_step(self.tokens[:bucket], pos, self.caches)
        self._logits[bucket].copy_(logits[:, -1])
        for c in self.caches:  # a paged cache's device lengths follow (its readers take them from there)
            if isinstance(c, PagedLatentCache):
                c.cache_seqlens[:bucket] = torch.where(live, pos + 1, c.cache_seqlens[:bucket])
        self.positions[:bucket] += live.to(torch.int32)

    def _prepare(self, bucket: int) -> None:
        if bucket in self._logits:
            return
        vocab = self.model.head.out_features
        dtype = self.model.head.weight.dtype
        self._logits[bucket] = torch.zeros(bucket, vocab, dtype=dtype, device=self.device)
        if not self.capture:
            return
        saved = self.positions.clone()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream), torch.no_grad():
            self.active.fill_(0)  # warm-up runs (autotuning, compiling) advance nothing
            for _ in range(2):
                self._run(bucket)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            self._run(bucket)
        self.positions.copy_(saved)
        self._graphs[bucket] = graph

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Decode one token for each of the sequences in slots [0, B): tokens (B,) or (B, 1) ->
        logits (B, V), a view of a static buffer the next step overwrites."""
        check_tensor("tokens", tokens, ndim=(1, 2), dtypes=(torch.int32, torch.int64))
        b = tokens.shape[0]
        if tokens.ndim == 2 and tokens.shape[1] != 1:
            raise ValueError(f"tokens: expected one token per sequence, got shape {tuple(tokens.shape)}")
        if b == 0 or b > self.buckets[-1]:
            raise ValueError(f"tokens: expected 1 to {self.buckets[-1]} sequences, got {b}")
        if max(self.lengths[:b]) + 1 > self.max_seq_len:
            raise ValueError(f"tokens: a sequence would pass max_seq_len {self.max_seq_len}")
        bucket = next(k for k in self.buckets if k >= b)
        for c in self.caches:  # pages for the new positions, outside the graph
            if isinstance(c, PagedLatentCache):
                for seq in range(b):
                    c.reserve(seq, self.lengths[seq] + 1)
        self._prepare(bucket)
        self.tokens[:b].copy_(tokens.reshape(b, 1))
        self.active.fill_(b)
        if self.capture:
            self._graphs[bucket].replay()
        else:
            with torch.no_grad():
                self._run(bucket)
        for seq in range(b):
            self.lengths[seq] += 1
            for c in self.caches:
                if isinstance(c, PagedLatentCache):
                    c.written(seq, self.lengths[seq])
        return self._logits[bucket][:b]
