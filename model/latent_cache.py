"""The latent caches MLA decodes over, in FlashMLA's layouts: contiguous or paged, bf16 or FP8.

Legend: B sequences, T_max positions per sequence, C kv_lora_rank (the latent), R rope dim,
W the row width: C + R values, or FlashMLA's FP8 row of C + 4·C/128 + 2·R bytes (656 for
DeepSeek's 512 + 64), P page size (64), NP pages in the pool.

- :class:`LatentCache`: one (B, T_max, W) buffer, position t of sequence b in row [b, t].
- :class:`PagedLatentCache`: a pool (NP, P, W) of pages; ``block_table`` (B, T_max / P) int32
  maps each sequence's blocks of P positions to pages and ``cache_seqlens`` (B,) int32 holds its
  length, both on the device, where the decode kernel reads them. Pages come from a host-side
  free list as sequences grow (:meth:`~PagedLatentCache.reserve`, or any write) and go back on
  :meth:`~PagedLatentCache.free`.

The switch ``fp8=True`` (default False: the model's dtype) stores the latent as e4m3 with one
float32 scale per 128 columns, quantized when written by ``quant_act`` (128-wide blocks; the
kernels' or the reference's, bit for bit the same), and the rope part in bf16; the decode kernel
dequantizes while it reads (``bf16(e4m3 · scale)``), and so does every read here. An FP8 cache
computes in bf16.

Both are :class:`~moela.reference.KVCache` s (tensors "kv" and "pe"), so the reference layer's
code runs on them: :meth:`update` writes the new positions and returns the prefix in the
compute dtype (views for a contiguous bf16 cache, dequantized or gathered copies otherwise);
:meth:`write` only writes; :meth:`decode_inputs` is what ``mla_decode`` takes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moela.reference import KVCache, quant_act
from moela.reference._checks import check_int, check_tensor
from moela.reference.fp8 import FP8_DTYPE
from moela.reference.mla_decode import FP8_LATENT_BLOCK, dequant_latent, fp8_latent_width

__all__ = ["LatentCache", "PagedLatentCache", "PAGE_SIZE"]

#: FlashMLA's page size (the decode kernel takes multiples of it).
PAGE_SIZE = 64

QuantAct = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def _row_width(kv_lora_rank: int, rope_dim: int, fp8: bool) -> int:
    return fp8_latent_width(kv_lora_rank + rope_dim, kv_lora_rank) if fp8 else kv_lora_rank + rope_dim


def _check_layout(kv_lora_rank: int, rope_dim: int, dtype: torch.dtype, fp8: bool) -> None:
    check_int("kv_lora_rank", kv_lora_rank, 1)
    check_int("rope_dim", rope_dim, 0)
    if fp8 and kv_lora_rank % FP8_LATENT_BLOCK:
        raise ValueError(f"kv_lora_rank: an FP8 cache needs a multiple of {FP8_LATENT_BLOCK}, got {kv_lora_rank}")
    if fp8 and dtype != torch.bfloat16:
        raise ValueError(f"dtype: an FP8 cache computes in bfloat16 (its rope part and the dequantized latent), "
                         f"got {dtype}")


class _Rows:
    """A row layout over storage (..., W): views and the conversions to and from (kv, pe)."""

    def __init__(self, kv_lora_rank: int, fp8: bool, quant: QuantAct | None):
        self.kv_lora_rank, self.fp8, self.quant = kv_lora_rank, fp8, quant or quant_act

    def parts(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(latent (..., C), scales (..., C/128) float32 or None, rope (..., R)) views of ``rows``."""
        C = self.kv_lora_rank
        if not self.fp8:
            return rows[..., :C], None, rows[..., C:]
        raw, nb = rows.view(torch.uint8), C // FP8_LATENT_BLOCK
        return rows[..., :C], raw[..., C:C + 4 * nb].view(torch.float32), raw[..., C + 4 * nb:].view(torch.bfloat16)

    def encode(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The stored latent (and its scales) of kv (..., C)."""
        return self.quant(kv, FP8_LATENT_BLOCK) if self.fp8 else (kv, None)

    def decode(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(kv (..., C), pe (..., R)) in the compute dtype."""
        if self.fp8:
            rows = dequant_latent(rows, self.kv_lora_rank)
        return rows[..., :self.kv_lora_rank], rows[..., self.kv_lora_rank:]


def _position_index(positions: torch.Tensor, b: int, s: int, max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence, position) index tensors (B, S) of S new tokens of sequences [0, B) starting at
    ``positions`` (B,), clamped into [0, max_seq_len - 1]."""
    check_tensor("positions", positions, dtypes=(torch.int32, torch.int64), shape=(b,))
    pos = (positions.long()[:, None] + torch.arange(s, device=positions.device)).clamp(0, max_seq_len - 1)
    return torch.arange(b, device=positions.device)[:, None].expand(b, s), pos


class LatentCache(KVCache):
    """The absorbed form's cache in the decode kernel's layout: ``latent`` (B, T_max, W).

    A float ``latent`` holds the latent ``kv`` in its first C columns and the rope key ``pe`` in
    the last R, and ``cache["kv"]``, ``cache["pe"]`` are views of it; a float8_e4m3fn ``latent``
    holds FlashMLA's FP8 rows (see the module docstring), ``quant_act`` quantizing what is
    written. Build one with :meth:`zeros` or ``moela.model.MLA.new_cache``.
    """

    def __init__(self, latent: torch.Tensor, kv_lora_rank: int, *, quant: QuantAct | None = None):
        check_tensor("latent", latent, ndim=3)
        fp8 = latent.dtype == FP8_DTYPE
        width = latent.shape[-1]
        rope2 = width - fp8_latent_width(kv_lora_rank, kv_lora_rank) if fp8 else width - kv_lora_rank
        if not (0 < kv_lora_rank < width) or (fp8 and (kv_lora_rank % FP8_LATENT_BLOCK or rope2 < 0 or rope2 % 4)):
            raise ValueError(f"kv_lora_rank: {kv_lora_rank} does not split latent rows of width {width} "
                             f"({'FP8 rows' if fp8 else 'kv | pe'})")
        self.rows = _Rows(kv_lora_rank, fp8, quant)
        values, _, rope = self.rows.parts(latent)
        super().__init__({"kv": values, "pe": rope})
        self.latent = latent
        self.kv_lora_rank = kv_lora_rank

    @classmethod
    def zeros(cls, batch: int, max_seq_len: int, kv_lora_rank: int, rope_dim: int, *,
              dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None, fp8: bool = False,
              quant: QuantAct | None = None) -> LatentCache:
        """A zero-filled cache of ``batch`` sequences of ``max_seq_len`` positions (fp8: FlashMLA's rows)."""
        check_int("batch", batch, 1)
        check_int("max_seq_len", max_seq_len, 1)
        _check_layout(kv_lora_rank, rope_dim, dtype, fp8)
        width = _row_width(kv_lora_rank, rope_dim, fp8)
        latent = torch.zeros(batch, max_seq_len, width, dtype=FP8_DTYPE if fp8 else dtype, device=device)
        return cls(latent, kv_lora_rank, quant=quant)

    @property
    def fp8(self) -> bool:
        return self.rows.fp8

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (what update() returns and the layer computes in)."""
        return torch.bfloat16 if self.fp8 else self.latent.dtype

    def __getitem__(self, name: str) -> torch.Tensor:
        """The whole stored tensor ``name`` (B, T_max, ...) in the compute dtype (FP8: dequantized)."""
        if not self.fp8:
            return super().__getitem__(name)
        kv, pe = self.rows.decode(self.latent)
        return {"kv": kv, "pe": pe}[name]

    def write(self, start_pos: int, *, kv: torch.Tensor, pe: torch.Tensor) -> int:
        """Store kv (B, S, C) and pe (B, S, R) at positions [start_pos, start_pos + S) of sequences
        [0, B); returns start_pos + S."""
        b, end = self.check_update(start_pos, kv=kv, pe=pe)
        if not self.fp8:  # (through the views, as KVCache.update: autograd records the copies)
            self.tensors["kv"][:b, start_pos:end] = kv
            self.tensors["pe"][:b, start_pos:end] = pe
            return end
        with torch.no_grad():  # quantized: nothing to differentiate
            values, scales, rope = self.rows.parts(self.latent[:b, start_pos:end])
            latent, latent_scales = self.rows.encode(kv)
            values.copy_(latent)
            scales.copy_(latent_scales)
            rope.copy_(pe)
        return end

    def write_at(self, positions: torch.Tensor, *, kv: torch.Tensor, pe: torch.Tensor) -> None:
        """Store kv (B, S, C) and pe (B, S, R) of sequence b at positions ``positions[b] + [0, S)``
        (positions (B,) on the device: a batch whose sequences have different lengths, no host
        read). Positions are clamped into [0, T_max - 1]: a row past the end writes the last
        position (the caller keeps its lengths within the cache)."""
        b, s = kv.shape[:2]
        rows, cols = _position_index(positions, b, s, self.max_seq_len)
        with torch.no_grad():
            values, scales, rope = self.rows.parts(self.latent)
            latent, latent_scales = self.rows.encode(kv)
            values[rows, cols] = latent.to(values.dtype)
            if scales is not None:
                scales[rows, cols] = latent_scales
            rope[rows, cols] = pe.to(rope.dtype)

    def update(self, start_pos: int, **new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`write`, then the prefixes kv (B, T, C), pe (B, T, R) in the compute dtype."""
        end = self.write(start_pos, **new)
        b = new["kv"].shape[0]
        if not self.fp8:
            return self.tensors["kv"][:b, :end], self.tensors["pe"][:b, :end]
        return self.rows.decode(self.latent[:b, :end])

    def decode_inputs(self, batch: int, end: int | None) -> dict[str, torch.Tensor | None]:
        """``mla_decode``'s cache arguments for sequences [0, batch) holding ``end`` positions
        (None: the whole buffer, the lengths given to the kernel as ``cache_seqlens``)."""
        return {"kv": self.latent[:batch, :end], "cache_seqlens": None, "block_table": None}

    def __repr__(self) -> str:
        return (f"LatentCache(latent={tuple(self.latent.shape)} {self.latent.dtype}, kv_lora_rank={self.kv_lora_rank}, "
                f"device={self.device})")


class PagedLatentCache(KVCache):
    """A paged latent cache (FlashMLA's): a pool of ``num_pages`` pages of ``page_size`` rows.

    ``block_table`` (batch, ceil(max_seq_len / page_size)) int32 and ``cache_seqlens`` (batch,)
    int32 live on the device; block j of sequence b is page ``block_table[b, j]`` (-1: none yet).
    Pages are taken from a free list (lowest id first) when a sequence grows past its pages
    (:meth:`reserve`, called by every write) and returned by :meth:`free`; an empty free list
    raises. The host keeps each sequence's page list and length, so growing never reads the
    device. ``tensors`` holds meta tensors of the logical (batch, max_seq_len, ...) shapes.

    Example::

        cache = attn.new_paged_cache(num_pages=1024, batch=8)   # or PagedLatentCache(...)
        y = attn(x[:, :100], 0, cache)                          # prefill: pages for 100 tokens
        y = attn(x[:, 100:101], 100, cache)                     # decode over the block table
        cache.free(3)                                           # sequence 3's pages back to the pool
    """

    def __init__(self, num_pages: int, batch: int, max_seq_len: int, kv_lora_rank: int, rope_dim: int, *,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None, fp8: bool = False,
                 page_size: int = PAGE_SIZE, quant: QuantAct | None = None):
        check_int("num_pages", num_pages, 1)
        check_int("batch", batch, 1)
        check_int("max_seq_len", max_seq_len, 1)
        check_int("page_size", page_size, 1)
        _check_layout(kv_lora_rank, rope_dim, dtype, fp8)
        self.rows = _Rows(kv_lora_rank, fp8, quant)
        self.kv_lora_rank, self.page_size, self._dtype, self.num_pages = kv_lora_rank, page_size, dtype, num_pages
        width = _row_width(kv_lora_rank, rope_dim, fp8)
        # one page more than asked: page num_pages is the sink that writes at positions without a
        # page land in (a block table never names it, so nothing reads it)
        self.pool = torch.zeros(num_pages + 1, page_size, width, dtype=FP8_DTYPE if fp8 else dtype, device=device)
        max_blocks = -(-max_seq_len // page_size)
        self.block_table = torch.full((batch, max_blocks), -1, dtype=torch.int32, device=self.pool.device)
        self.cache_seqlens = torch.zeros(batch, dtype=torch.int32, device=self.pool.device)
        self.tensors = {"kv": torch.empty(batch, max_seq_len, kv_lora_rank, device="meta"),
                        "pe": torch.empty(batch, max_seq_len, rope_dim, device="meta")}
        self._pages: list[list[int]] = [[] for _ in range(batch)]
        self._lens = [0] * batch
        self._free = list(range(num_pages - 1, -1, -1))  # pop() takes the lowest id

    # ----------------------------------------------------------------- pages
    @property
    def fp8(self) -> bool:
        return self.rows.fp8

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (what update() returns and the layer computes in)."""
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self.pool.device

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def pages(self, seq: int) -> list[int]:
        """The pages of sequence ``seq``, in order (a copy)."""
        return list(self._pages[self._check_seq(seq)])

    def seq_len(self, seq: int) -> int:
        """Positions written for sequence ``seq`` (the host's copy of ``cache_seqlens[seq]``)."""
        return self._lens[self._check_seq(seq)]

    def _check_seq(self, seq: int) -> int:
        check_int("seq", seq, 0)
        if seq >= self.batch_size:
            raise ValueError(f"seq: expected a sequence in [0, {self.batch_size}), got {seq}")
        return seq

    def reserve(self, seq: int, length: int) -> None:
        """Give sequence ``seq`` pages for its first ``length`` positions (no device read)."""
        self._check_seq(seq)
        check_int("length", length, 0)
        if length > self.max_seq_len:
            raise ValueError(f"length: {length} positions run past the cache's max_seq_len {self.max_seq_len}")
        have, need = len(self._pages[seq]), -(-length // self.page_size)
        if need <= have:
            return
        if need - have > len(self._free):
            raise RuntimeError(f"PagedLatentCache: sequence {seq} needs {need - have} more pages for {length} "
                               f"positions, {len(self._free)} of {self.num_pages} are free")
        new = [self._free.pop() for _ in range(need - have)]
        self._pages[seq] += new
        self.block_table[seq, have:need] = torch.tensor(new, dtype=torch.int32)

    def written(self, seq: int, length: int) -> None:
        """Record on the host that sequence ``seq`` now holds ``length`` positions, written on the
        device (:meth:`write_at`, a captured decode step); its pages must exist (:meth:`reserve`)."""
        self._check_seq(seq)
        check_int("length", length, 0)
        if -(-length // self.page_size) > len(self._pages[seq]):
            raise ValueError(f"length: sequence {seq} has pages for {len(self._pages[seq]) * self.page_size} "
                             f"positions, got {length} (reserve them first)")
        self._lens[seq] = length

    def free(self, seq: int) -> None:
        """Return sequence ``seq``'s pages to the pool; its length becomes 0."""
        self._check_seq(seq)
        self._free += reversed(self._pages[seq])
        self._pages[seq] = []
        self._lens[seq] = 0
        self.block_table[seq] = -1
        self.cache_seqlens[seq] = 0

    def reset(self) -> None:
        """Free every sequence (the pages keep their bytes; nothing reads them)."""
        for seq in range(self.batch_size):
            self.free(seq)

    # ----------------------------------------------------------------- reading and writing
    def _rows(self, b: int, positions: torch.Tensor) -> torch.Tensor:
        """Flat pool rows (b, len(positions)) of positions of sequences [0, b) (their pages exist)."""
        pages = self.block_table[:b, positions // self.page_size].long()
        return pages * self.page_size + positions % self.page_size

    def write(self, start_pos: int, *, kv: torch.Tensor, pe: torch.Tensor) -> int:
        """Store kv (B, S, C) and pe (B, S, R) at positions [start_pos, start_pos + S) of sequences
        [0, B), taking pages as needed; their lengths become start_pos + S. Returns it."""
        b, end = self.check_update(start_pos, kv=kv, pe=pe)
        for seq in range(b):
            self.reserve(seq, end)
        rows = self._rows(b, torch.arange(start_pos, end, device=self.device)).flatten()
        with torch.no_grad():  # the pool keeps values, not graphs (update() returns the new ones with theirs)
            values, scales, rope = self.rows.parts(self.pool.flatten(0, 1))
            latent, latent_scales = self.rows.encode(kv)
            values[rows] = latent.flatten(0, 1).to(values.dtype)
            if scales is not None:
                scales[rows] = latent_scales.flatten(0, 1)
            rope[rows] = pe.flatten(0, 1).to(rope.dtype)
        self._lens[:b] = [end] * b
        self.cache_seqlens[:b] = end
        return end

    def write_at(self, positions: torch.Tensor, *, kv: torch.Tensor, pe: torch.Tensor) -> None:
        """Store kv (B, S, C) and pe (B, S, R) of sequence b at positions ``positions[b] + [0, S)``
        through the block table, all on the device (no host read, no page taken: :meth:`reserve`
        them first, and record the lengths with :meth:`written`). A position past the cache is
        clamped to its last; a position whose block has no page writes the sink page."""
        b, s = kv.shape[:2]
        seq, pos = _position_index(positions, b, s, self.max_seq_len)
        page = self.block_table[seq, pos // self.page_size].long()
        page = torch.where((page >= 0) & (page < self.num_pages), page, self.num_pages)
        rows = page * self.page_size + pos % self.page_size  # (B, S) flat pool rows
        with torch.no_grad():
            values, scales, rope = self.rows.parts(self.pool.flatten(0, 1))
            latent, latent_scales = self.rows.encode(kv)
            values[rows] = latent.to(values.dtype)
            if scales is not None:
                scales[rows] = latent_scales
            rope[rows] = pe.to(rope.dtype)

    def update(self, start_pos: int, **new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`write`, then the prefixes kv (B, T, C), pe (B, T, R) gathered from the pages (a
        bf16 cache: the new positions are the given tensors, so their gradients flow)."""
        end = self.write(start_pos, **new)
        b = new["kv"].shape[0]
        rows = self._rows(b, torch.arange(end, device=self.device))
        kv, pe = self.rows.decode(self.pool.flatten(0, 1)[rows])
        if self.fp8:
            return kv, pe
        return (torch.cat([kv[:, :start_pos], new["kv"].to(kv.dtype)], 1),
                torch.cat([pe[:, :start_pos], new["pe"].to(pe.dtype)], 1))

    def __getitem__(self, name: str) -> torch.Tensor:
        """The logical (batch, max_seq_len, ...) tensor ``name`` in the compute dtype (zeros where a
        sequence has no page)."""
        if name not in self.tensors:
            raise KeyError(name)
        t = torch.arange(self.max_seq_len, device=self.device)
        pages = self.block_table[:, t // self.page_size].long()
        rows = self.pool[pages.clamp_min(0), t % self.page_size]  # (batch, max_seq_len, W)
        kv, pe = self.rows.decode(rows)
        out = {"kv": kv, "pe": pe}[name]
        return torch.where((pages >= 0)[..., None], out, 0)

    def decode_inputs(self, batch: int, end: int | None) -> dict[str, torch.Tensor | None]:
        """``mla_decode``'s cache arguments for sequences [0, batch) (their lengths: ``cache_seqlens``)."""
        return {"kv": self.pool, "cache_seqlens": self.cache_seqlens[:batch], "block_table": self.block_table[:batch]}

    def __repr__(self) -> str:
        return (f"PagedLatentCache(pool={tuple(self.pool.shape)} {self.pool.dtype}, batch={self.batch_size}, "
                f"max_seq_len={self.max_seq_len}, free_pages={self.free_pages}, device={self.device})")
