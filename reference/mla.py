"""DeepSeek-V3 Multi-head Latent Attention (MLA): RMSNorm, YaRN RoPE, KV cache, the layer.

Legend:
    B batch, S query length (the new tokens), T key length (cached prefix + new tokens),
    H heads (``n_heads``), D model dim (``dim``), Q q-LoRA rank (``q_lora_rank``),
    C kv latent width (``kv_lora_rank``), Dn no-position q/k head dim (``qk_nope_head_dim``),
    R rotary head dim (``qk_rope_head_dim``), Dk = Dn + R (``qk_head_dim``),
    Dv value head dim (``v_head_dim``).

The layer (DeepSeek-V3 ``inference/model.py``, class ``MLA``)::

    q            = wq(x)  or  wq_b(q_norm(wq_a(x)))            (B, S, H·Dk)
    q_nope, q_pe = split(q, [Dn, R]);  q_pe = rope(q_pe)       (B, S, H, Dn), (B, S, H, R)
    kv, k_pe     = split(wkv_a(x), [C, R]); k_pe = rope(k_pe)   (B, S, C), (B, S, R) shared by heads
    k_nope, v    = split(wkv_b(kv_norm(kv)), [Dn, Dv])          (B, S, H, Dn), (B, S, H, Dv)
    o            = softmax(q·kᵀ · softmax_scale + causal) · v   k = [k_nope, k_pe]
    out          = wo(o)                                        (B, S, D)

Two forms compute the same thing:

* ``"naive"`` caches the per-head ``k`` (B, T, H, Dk) and ``v`` (B, T, H, Dv).
* ``"absorb"`` caches only the normalised latent ``kv`` (B, T, C) and the rotated ``pe``
  (B, T, R). ``wkv_b`` viewed as (H, Dn + Dv, C) splits into W_uk (H, Dn, C) and
  W_uv (H, Dv, C); q_nope·W_uk is a query in latent space, and W_uv is applied after the
  attention-weighted sum of latents: ``q·kᵀ = (q_nope·W_uk)·kvᵀ + q_pe·peᵀ`` and
  ``o = (p·kv)·W_uvᵀ``.

Positions: query ``i`` of a call sits at absolute position ``start_pos + i`` and sees the keys
at positions ``<= start_pos + i`` (correct for any ``start_pos``, so chunked prefill works).

Precision: everything runs in ``x.dtype`` except the attention scores and the softmax, which
run in float32 at least (float64 stays float64); the probabilities are cast back to
``x.dtype`` before they weight the values, as DeepSeek does. RMSNorm and RoPE also compute
in float32 at least.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import nn

from ._checks import accumulate_dtype as _acc_dtype
from ._checks import check_float_tensor as _check_float
from ._checks import check_int as _check_int
from .config import ModelArgs
from .fp8 import FP8_DTYPE, dequant

__all__ = [
    "ATTN_IMPLS",
    "KVCache",
    "MLA",
    "RMSNorm",
    "apply_rotary_emb",
    "precompute_freqs_cis",
    "rms_norm",
    "yarn_correction_range",
]

ATTN_IMPLS = ("naive", "absorb")


# --------------------------------------------------------------------------- RMSNorm
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(mean(x², -1) + eps) · weight``, in float32 (float64 for float64 x).

    x: (..., N) float; weight: (N,). Returns x.dtype.

    Example::

        y = rms_norm(torch.randn(2, 5, 16), torch.ones(16))
    """
    _check_float("x", x)
    _check_float("weight", weight)
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"weight: expected shape ({x.shape[-1]},) to match x's last dim, "
                         f"got {tuple(weight.shape)}")
    acc = _acc_dtype(x.dtype)
    xf = x.to(acc)
    inv_rms = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)  # (..., 1)
    return (xf * inv_rms * weight.to(acc)).to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, with a learnable ``weight`` (initialised to ones)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.dim = _check_int("dim", dim, 1)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


# --------------------------------------------------------------------------- RoPE with YaRN
def yarn_correction_range(args: ModelArgs) -> tuple[int, int]:
    """The rotary dims ``(low, high)`` between which YaRN blends (DeepSeek's rule).

    A frequency pair ``i`` (of R/2) turns ``original_seq_len · θ_i / 2π`` times over the
    original context. Pair ``i`` makes ``n`` turns at ``i = R·ln(L / (2π·n)) / (2·ln base)``;
    ``low`` is that dim for ``beta_fast`` turns (floored), ``high`` for ``beta_slow`` turns
    (ceiled), clamped to ``[0, R - 1]``. Pairs ``<= low`` keep their frequency, pairs
    ``>= high`` are divided by ``rope_factor``, pairs in between are blended linearly.
    """
    r, base, length = args.qk_rope_head_dim, args.rope_theta, args.original_seq_len

    def dim_for_turns(turns: float) -> float:
        return r * math.log(length / (turns * 2 * math.pi)) / (2 * math.log(base))

    low = math.floor(dim_for_turns(args.beta_fast))
    high = math.ceil(dim_for_turns(args.beta_slow))
    return max(low, 0), min(high, r - 1)


def precompute_freqs_cis(
    args: ModelArgs,
    seqlen: int | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``exp(i · t · θ_j)`` for positions t < seqlen and the R/2 rotary frequencies θ_j.

    θ_j = rope_theta^(-2j/R); under YaRN (``args.uses_yarn``) the low frequencies are divided by
    ``rope_factor``, blended over :func:`yarn_correction_range`, and the values have magnitude
    ``args.rope_attention_factor`` (Hugging Face's YaRN ``attention_factor``; 1 in DeepSeek's configs).
    With ``dtype=torch.float32`` (the default) the values are DeepSeek's, op for op; float64
    gives a complex128 table for float64 references.

    Returns: (seqlen, R/2) complex64 (complex128 for dtype float64). ``seqlen`` defaults to
    ``args.max_seq_len``; the YaRN decision is ``args.uses_yarn`` whatever ``seqlen``.
    """
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype: expected torch.float32 or torch.float64, got {dtype}")
    seqlen = args.max_seq_len if seqlen is None else _check_int("seqlen", seqlen, 0)
    r = args.qk_rope_head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, r, 2, dtype=dtype, device=device) / r))  # (R/2,)
    if args.uses_yarn:
        low, high = yarn_correction_range(args)
        span = (high - low) if high != low else 0.001  # DeepSeek nudges an empty range by 0.001
        ramp = ((torch.arange(r // 2, dtype=dtype, device=device) - low) / span).clamp(0, 1)
        keep = 1 - ramp  # share of the original frequency: 1 for fast pairs, 0 for slow ones
        freqs = freqs / args.rope_factor * (1 - keep) + freqs * keep
    angles = torch.outer(torch.arange(seqlen, dtype=dtype, device=device), freqs)  # (seqlen, R/2)
    magnitude = args.rope_attention_factor if args.uses_yarn else 1.0
    return torch.polar(torch.full_like(angles, magnitude), angles)


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs ``(x[..., 2j], x[..., 2j+1])`` of x by ``freqs_cis``.

    x: (B, S, H, R) float; freqs_cis: (S, R/2) complex, one row per position of x, or
    (B, S, R/2): one row per sequence and position (a batch whose sequences sit at different
    positions). Computes in complex64 (complex128 for float64 x) and returns x.dtype.

    Example::

        f = precompute_freqs_cis(args)[start_pos : start_pos + S]
        q_pe = apply_rotary_emb(q_pe, f)
    """
    _check_float("x", x)
    if x.ndim != 4:
        raise ValueError(f"x: expected a 4-D tensor (B, S, H, R), got shape {tuple(x.shape)}")
    b, s, _, r = x.shape
    if r % 2:
        raise ValueError(f"x: the rotary dim R must be even, got shape {tuple(x.shape)}")
    if not isinstance(freqs_cis, torch.Tensor) or not freqs_cis.is_complex():
        raise TypeError(f"freqs_cis: expected a complex tensor, got {getattr(freqs_cis, 'dtype', freqs_cis)}")
    if freqs_cis.shape not in ((s, r // 2), (b, s, r // 2)):
        raise ValueError(f"freqs_cis: expected shape ({s}, {r // 2}) or ({b}, {s}, {r // 2}) for x of shape "
                         f"{tuple(x.shape)}, got {tuple(freqs_cis.shape)}")
    acc = _acc_dtype(x.dtype)
    xc = torch.complex(x[..., 0::2].to(acc), x[..., 1::2].to(acc))  # (B, S, H, R/2)
    rot = freqs_cis.to(xc.dtype)
    rot = rot[None, :, None, :] if rot.ndim == 2 else rot[:, :, None, :]  # (1 or B, S, 1, R/2)
    return torch.view_as_real(xc * rot).flatten(-2).to(x.dtype)  # (B, S, H, R)


# --------------------------------------------------------------------------- KV cache
class KVCache:
    """Named tensors of shape (batch, max_seq_len, ...) written at positions, read as prefixes.

    ``MLA.new_cache`` builds one: ``k`` (B, T_max, H, Dk) and ``v`` (B, T_max, H, Dv) for the
    naive form, ``kv`` (B, T_max, C) and ``pe`` (B, T_max, R) for the absorbed form.

    Example::

        cache = KVCache.zeros(2, 16, {"kv": (8,), "pe": (4,)})
        kv, pe = cache.update(0, kv=torch.randn(2, 5, 8), pe=torch.randn(2, 5, 4))  # (2, 5, ...)
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        if not tensors:
            raise ValueError("tensors: expected at least one named tensor")
        lead = None
        for name, t in tensors.items():
            _check_float(f"tensors[{name!r}]", t)
            if t.ndim < 2 or (lead is not None and t.shape[:2] != lead):
                raise ValueError(f"tensors[{name!r}]: expected shape ({lead or '(batch, max_seq_len)'}, ...), "
                                 f"got {tuple(t.shape)}")
            lead = t.shape[:2]
        self.tensors: dict[str, torch.Tensor] = dict(tensors)

    @classmethod
    def zeros(
        cls,
        batch: int,
        max_seq_len: int,
        shapes: Mapping[str, tuple[int, ...]],
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> KVCache:
        """A zero-filled cache: ``shapes[name]`` is the per-position shape of tensor ``name``."""
        _check_int("batch", batch, 1)
        _check_int("max_seq_len", max_seq_len, 1)
        return cls({n: torch.zeros(batch, max_seq_len, *s, dtype=dtype, device=device)
                    for n, s in shapes.items()})

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.tensors)

    @property
    def batch_size(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    @property
    def max_seq_len(self) -> int:
        return next(iter(self.tensors.values())).shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.tensors.values())).dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors.values())).device

    def __getitem__(self, name: str) -> torch.Tensor:
        """The whole stored tensor ``name`` (batch, max_seq_len, ...)."""
        return self.tensors[name]

    def update(self, start_pos: int, **new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Write every named tensor at positions ``[start_pos, start_pos + S)`` of rows ``[:B]``.

        new: one (B, S, ...) tensor per name of the cache. Returns the prefix views
        ``[:B, :start_pos + S]`` of all tensors, in the order of :attr:`names`.
        """
        b, end = self.check_update(start_pos, **new)
        for name, t in new.items():
            self.tensors[name][:b, end - t.shape[1]:end] = t
        return tuple(self.tensors[name][:b, :end] for name in self.tensors)

    def check_update(self, start_pos: int, **new: torch.Tensor) -> tuple[int, int]:
        """The checks of :meth:`update` (names, shapes, batch, positions); returns (B, start_pos + S)."""
        _check_int("start_pos", start_pos, 0)
        if set(new) != set(self.tensors):
            raise ValueError(f"update: expected tensors named {sorted(self.tensors)}, got {sorted(new)}")
        b = s = None
        for name, t in new.items():
            store = self.tensors[name]
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
            if t.ndim != store.ndim or t.shape[2:] != store.shape[2:]:
                raise ValueError(f"{name}: expected shape (B, S, {', '.join(map(str, store.shape[2:]))}), "
                                 f"got {tuple(t.shape)}")
            if b is not None and t.shape[:2] != (b, s):
                raise ValueError(f"{name}: expected (B, S) = ({b}, {s}) like the other tensors, "
                                 f"got {tuple(t.shape[:2])}")
            b, s = t.shape[:2]
        if b > self.batch_size:
            raise ValueError(f"update: batch {b} is larger than the cache's batch {self.batch_size}")
        end = start_pos + s
        if end > self.max_seq_len:
            raise ValueError(f"update: positions [{start_pos}, {end}) run past the cache's "
                             f"max_seq_len {self.max_seq_len}")
        return b, end

    def reset(self) -> None:
        """Zero every tensor."""
        for t in self.tensors.values():
            t.zero_()

    def __repr__(self) -> str:
        shapes = ", ".join(f"{n}={tuple(t.shape)}" for n, t in self.tensors.items())
        return f"KVCache({shapes}, dtype={self.dtype}, device={self.device})"


# --------------------------------------------------------------------------- the layer
class MLA(nn.Module):
    """Multi-head Latent Attention with DeepSeek-V3's parameter names.

    Parameters: ``wq`` (q_lora_rank == 0) or ``wq_a``, ``q_norm``, ``wq_b``; then ``wkv_a``,
    ``kv_norm``, ``wkv_b``, ``wo`` — bias-free ``nn.Linear`` / :class:`RMSNorm`, so a
    DeepSeek checkpoint's ``attn.*`` tensors load with ``load_state_dict``.

    attn_impl: ``"absorb"`` (latent cache, wkv_b folded into q and the output) or ``"naive"``.

    Example::

        mla = MLA(ModelArgs.from_name("tiny"))
        cache = mla.new_cache(batch=2)
        y = mla(x[:, :5], 0, cache)       # prefill 5 tokens
        y = mla(x[:, 5:6], 5, cache)      # decode one more
    """

    def __init__(self, args: ModelArgs, attn_impl: str = "absorb"):
        super().__init__()
        if not isinstance(args, ModelArgs):
            raise TypeError(f"args: expected a ModelArgs, got {type(args).__name__}")
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl: expected one of {ATTN_IMPLS}, got {attn_impl!r}")
        self.args = args
        self.attn_impl = attn_impl
        self.dim, self.n_heads = args.dim, args.n_heads
        self.q_lora_rank, self.kv_lora_rank = args.q_lora_rank, args.kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim = args.qk_nope_head_dim, args.qk_rope_head_dim
        self.qk_head_dim, self.v_head_dim = args.qk_head_dim, args.v_head_dim
        self.softmax_scale = args.softmax_scale  # qk_head_dim**-0.5, times mscale² under YaRN

        h = self.n_heads
        if self.q_lora_rank == 0:
            self.wq = nn.Linear(self.dim, h * self.qk_head_dim, bias=False)
        else:
            self.wq_a = nn.Linear(self.dim, self.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(self.q_lora_rank)
            self.wq_b = nn.Linear(self.q_lora_rank, h * self.qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(self.dim, self.kv_lora_rank + self.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(self.kv_lora_rank)
        self.wkv_b = nn.Linear(self.kv_lora_rank, h * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.wo = nn.Linear(h * self.v_head_dim, self.dim, bias=False)

    def extra_repr(self) -> str:
        return f"attn_impl={self.attn_impl!r}, n_heads={self.n_heads}, softmax_scale={self.softmax_scale:.6g}"

    # ------------------------------------------------------------------- cache
    def _cache_defaults(self, max_seq_len, dtype, device) -> tuple[int, torch.dtype, torch.device | str]:
        """A new cache's T_max, dtype and device: ``args.max_seq_len`` and the parameters' by default."""
        w = self.kv_norm.weight  # a floating-point parameter in every precision
        return (self.args.max_seq_len if max_seq_len is None else max_seq_len, w.dtype if dtype is None else dtype,
                w.device if device is None else device)

    def new_cache(
        self,
        batch: int,
        max_seq_len: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> KVCache:
        """A zeroed cache in this layer's form; dtype and device default to the parameters'.

        naive: ``k`` (batch, T_max, H, Dk), ``v`` (batch, T_max, H, Dv);
        absorb: ``kv`` (batch, T_max, C), ``pe`` (batch, T_max, R). T_max defaults to
        ``args.max_seq_len``.
        """
        max_seq_len, dtype, device = self._cache_defaults(max_seq_len, dtype, device)
        if self.attn_impl == "naive":
            shapes = {"k": (self.n_heads, self.qk_head_dim), "v": (self.n_heads, self.v_head_dim)}
        else:
            shapes = {"kv": (self.kv_lora_rank,), "pe": (self.qk_rope_head_dim,)}
        return KVCache.zeros(batch, max_seq_len, shapes, dtype=dtype, device=device)

    # ------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, start_pos: int = 0, cache: KVCache | None = None) -> torch.Tensor:
        """x: (B, S, D) at absolute positions [start_pos, start_pos + S) -> (B, S, D).

        Without a cache, the S tokens attend (causally) to each other only. With a cache,
        their keys are written at [start_pos, start_pos + S) and they attend to the cached
        prefix [0, start_pos + S).
        """
        self._check_inputs(x, start_pos, cache)
        b, s, _ = x.shape
        end_pos = start_pos + s
        acc = _acc_dtype(x.dtype)
        freqs = precompute_freqs_cis(self.args, end_pos, dtype=acc, device=x.device)[start_pos:end_pos]
        q_nope, q_pe, kv, k_pe = self._project(x, freqs)
        key_start = 0 if cache is not None else start_pos  # absolute position of key 0
        if self.attn_impl == "naive":
            o = self._attend_naive(q_nope, q_pe, kv, k_pe, start_pos, key_start, cache)
        else:
            o = self._attend_absorbed(q_nope, q_pe, kv, k_pe, start_pos, key_start, cache)
        return self.wo(rearrange(o, "b s h d -> b s (h d)"))  # (B, S, D)

    def _project(self, x: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x (B, S, D) -> q_nope (B, S, H, Dn), q_pe (B, S, H, R), the latent kv (B, S, C) and the
        rotary key k_pe (B, S, R) shared by all heads; ``freqs`` (S, R/2) or (B, S, R/2) rotates."""
        q = self.wq(x) if self.q_lora_rank == 0 else self.wq_b(self.q_norm(self.wq_a(x)))
        q = rearrange(q, "b s (h d) -> b s h d", h=self.n_heads)  # (B, S, H, Dk)
        q_nope, q_pe = torch.split(q, [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q_pe = apply_rotary_emb(q_pe, freqs)  # (B, S, H, R)
        kv, k_pe = torch.split(self.wkv_a(x), [self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        kv = self.kv_norm(kv)  # (B, S, C)
        k_pe = apply_rotary_emb(k_pe[:, :, None], freqs)[:, :, 0]  # (B, S, R)
        return q_nope, q_pe, kv, k_pe

    def _attend_naive(self, q_nope, q_pe, kv, k_pe, start_pos, key_start, cache):
        """Expand the latent to per-head k and v, then plain attention. Returns (B, S, H, Dv)."""
        h = self.n_heads
        q = torch.cat([q_nope, q_pe], dim=-1)  # (B, S, H, Dk)
        kv = rearrange(self.wkv_b(kv), "b s (h d) -> b s h d", h=h)  # (B, S, H, Dn + Dv)
        k_nope, v = torch.split(kv, [self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, :, None].expand(-1, -1, h, -1)], dim=-1)  # (B, S, H, Dk)
        if cache is not None:
            k, v = cache.update(start_pos, k=k, v=v)  # (B, T, H, Dk), (B, T, H, Dv)
        acc = _acc_dtype(q.dtype)
        scores = einsum(q.to(acc), k.to(acc), "b s h d, b t h d -> b s h t")
        p = self._softmax(scores, start_pos, key_start).to(v.dtype)  # (B, S, H, T)
        return einsum(p, v, "b s h t, b t h d -> b s h d")

    def _absorbed_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """wkv_b split per head: ``w_uk`` (H, Dn, C) folds into q, ``w_uv`` (H, Dv, C) into o."""
        w = self.wkv_b.weight  # (H·(Dn + Dv), C)
        if w.dtype == FP8_DTYPE:  # an FP8 linear (DeepSeek's fp8 checkpoints): dequantize, as DeepSeek does
            w = dequant(w, self.wkv_b.weight_scale_inv, out_dtype=dtype)
        w = rearrange(w, "(h d) c -> h d c", h=self.n_heads)  # (H, Dn + Dv, C)
        return w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim :]

    def _attend_absorbed(self, q_nope, q_pe, kv, k_pe, start_pos, key_start, cache):
        """Attention in the latent space, wkv_b folded into q and o. Returns (B, S, H, Dv)."""
        w_uk, w_uv = self._absorbed_weights(q_nope.dtype)  # (H, Dn, C), (H, Dv, C)
        q_lat = einsum(q_nope, w_uk, "b s h d, h d c -> b s h c")  # (B, S, H, C)
        if cache is not None:
            kv, k_pe = cache.update(start_pos, kv=kv, pe=k_pe)  # (B, T, C), (B, T, R)
        acc = _acc_dtype(q_lat.dtype)
        scores = (einsum(q_lat.to(acc), kv.to(acc), "b s h c, b t c -> b s h t")
                  + einsum(q_pe.to(acc), k_pe.to(acc), "b s h r, b t r -> b s h t"))
        p = self._softmax(scores, start_pos, key_start).to(kv.dtype)  # (B, S, H, T)
        o_lat = einsum(p, kv, "b s h t, b t c -> b s h c")  # (B, S, H, C)
        return einsum(o_lat, w_uv, "b s h c, h d c -> b s h d")

    def _softmax(self, scores: torch.Tensor, start_pos: int, key_start: int) -> torch.Tensor:
        """Scaled, causally masked softmax over t of scores (B, S, H, T).

        Query i is at position start_pos + i, key t at key_start + t; t is visible iff
        key_start + t <= start_pos + i. Every query sees at least its own key.
        """
        _, s, _, t = scores.shape
        q_pos = torch.arange(start_pos, start_pos + s, device=scores.device)  # (S,)
        k_pos = torch.arange(key_start, key_start + t, device=scores.device)  # (T,)
        hidden = k_pos[None, :] > q_pos[:, None]  # (S, T)
        scores = (scores * self.softmax_scale).masked_fill(hidden[None, :, None, :], float("-inf"))
        return F.softmax(scores, dim=-1)

    def _check_inputs(self, x: object, start_pos: object, cache: object) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x: expected shape (B, S, {self.dim}), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x: expected a floating-point tensor, got dtype {x.dtype}")
        w = self.kv_norm.weight
        if x.dtype != w.dtype:
            raise TypeError(f"x: expected dtype {w.dtype} (the parameters'), got {x.dtype}")
        if x.device != w.device:
            raise ValueError(f"x: expected device {w.device} (the parameters'), got {x.device}")
        _check_int("start_pos", start_pos, 0)
        end = start_pos + x.shape[1]
        if end > self.args.max_seq_len:  # before anything is allocated for those positions
            raise ValueError(f"start_pos: positions [{start_pos}, {end}) run past max_seq_len="
                             f"{self.args.max_seq_len} (the rotary table's length)")
        if cache is None:
            return
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache: expected a KVCache or None, got {type(cache).__name__}")
        want = ("k", "v") if self.attn_impl == "naive" else ("kv", "pe")
        if set(cache.names) != set(want):
            raise ValueError(f"cache: this {self.attn_impl!r} layer needs tensors {want}, got {cache.names}; "
                             "build it with MLA.new_cache")
        if cache.dtype != x.dtype:
            raise TypeError(f"cache: expected dtype {x.dtype} (x's), got {cache.dtype}")
        if cache.device != x.device:
            raise ValueError(f"cache: expected device {x.device} (x's), got {cache.device}")
        if x.shape[0] > cache.batch_size:
            raise ValueError(f"cache: x has batch {x.shape[0]} (shape {tuple(x.shape)}), more than the cache's "
                             f"{cache.batch_size} sequences")
        if end > cache.max_seq_len:
            raise ValueError(f"start_pos: positions [{start_pos}, {end}) run past the cache's "
                             f"max_seq_len {cache.max_seq_len}")
