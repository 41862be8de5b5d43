"""MLA decode attention in the absorbed form (FlashMLA's problem), in Triton (``moela.reference.mla_decode``).

Legend: B batch, S new query tokens per sequence, H query heads, L cache length, Dk key width
(kv_lora_rank + rope dim: 512 + 64 for DeepSeek), Dv = ``v_dim`` value width (the first Dv
columns of the cache), R = S·H query rows per sequence (row r = token r // H, head r % H).

    o[b, i, h] = softmax_t(scale · q[b, i, h] · kv[b, t]ᵀ, t <= L - S + i) · kv[b, t, :Dv]

One latent KV head is shared by all H query heads, so the R query rows of a sequence form one
wide MQA head: a program owns a BLOCK_H tile of those rows and streams the cache past it in
BLOCK_N key blocks, so each cache byte loaded feeds BLOCK_H rows (the arithmetic intensity).
A key block is loaded once as two tiles, its first Dv columns (keys and values at once: the
same tile is the B operand of q·kᵀ and of p·v) and the remaining Dk - Dv rope columns. The
softmax is float32 with online (flash) rescaling in the exp2 domain; p is cast to the cache's
dtype before p·v (as FlashMLA and the harness's torch truth do); the Dv-wide accumulator stays
in registers (BLOCK_H × Dv float32: 64 × 512 over 8 warps is 128 registers a thread).

Split-K (flash-decoding): when B·cdiv(R, 64) tiles cannot fill the SMs, the cache is cut into
NUM_SPLITS chunks (multiples of 128 keys); each program writes its chunk's normalised partial
output and log-sum-exp in float32 and ``_mla_decode_combine_kernel`` merges them. The split
count comes from shapes and the SM count only (no host sync, CUDA-graph and compile friendly).

Configs (``_configs``): 64-row tiles for wgmma's M=64 with 8 warps (two warpgroups share the
512-wide accumulator), 16/32-row tiles for few heads; keyed on (H, S, Dk, Dv), never on B or L.
``cache_seqlens`` values are clamped into [0, L] on the device before use.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from moela.reference.mla_decode import check_mla_decode, validate_seqlens

from ._common import autotune, cdiv, kernel_dtype, next_power_of_2
from .factory import kernel_op
from .tl_helpers import SMEM_BUDGET, dot_precision

__all__ = ["mla_decode", "num_splits_for", "KERNEL_DTYPES"]

#: Input dtypes of the kernels (float32 softmax and accumulation for all).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Split-K: chunks are multiples of this many keys (>= every config's BLOCK_N), at most this many splits.
_SPLIT_ALIGN = 128
_MAX_SPLITS = 64
#: The row tile the split heuristic assumes (wgmma's M), whatever config autotuning picks.
_NOMINAL_BLOCK_H = 64
_LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------
# Configs: from a function, keyed on (H, S, Dk, Dv), one config under the interpreter.
# ----------------------------------------------------------------------------------------


def _cfg(bh: int, bn: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_H": bh, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


def _configs() -> list[triton.Config]:
    """configs[0] is the default (and the interpreter's). Shared memory at Dk=576 bf16:
    q tile BLOCK_H·576·2 plus stages·BLOCK_N·576·2 of cache."""
    return [
        _cfg(64, 32, 8, 3),  # 72 KB q + 108 KB cache; two warpgroups split the 64×512 accumulator
        _cfg(64, 64, 8, 2),  # 72 KB + 144 KB
        _cfg(64, 16, 4, 4),  # 4 warps: 256 accumulator registers a thread, may spill
        _cfg(32, 64, 4, 2),  # S·H = 32 (H=16, S=2) without idle rows
        _cfg(16, 64, 4, 3),  # S·H = 16: mma.sync tiles, more programs
        _cfg(16, 32, 4, 4),
        _cfg(16, 16, 4, 2),  # fp32
    ]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Keep configs whose q tile plus cache pipeline fit the shared-memory budget; for fp32 also
    at most 64 accumulator floats a thread."""
    size = named_args["q_ptr"].element_size()
    width = kwargs.get("BLOCK_DV", 512) + kwargs.get("BLOCK_DR", 64)

    def smem(c: triton.Config) -> int:
        k = c.kwargs
        return (k["BLOCK_H"] + c.num_stages * k["BLOCK_N"]) * width * size

    def fits(c: triton.Config) -> bool:
        acc = c.kwargs["BLOCK_H"] * kwargs.get("BLOCK_DV", 512)
        return smem(c) <= SMEM_BUDGET and (size == 2 or acc <= 64 * 32 * c.num_warps)

    return [c for c in configs if fits(c)] or [min(configs, key=smem)]


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------


@triton.jit
def _mla_decode_fwd_kernel(
    q_ptr, kv_ptr, seqlens_ptr, out_ptr, part_o_ptr, part_lse_ptr,
    H, S, L, Dk, V_DIM, scale_log2, chunk,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_kl, stride_kd,
    stride_ob, stride_os, stride_oh, stride_od,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DR: tl.constexpr,
    HAS_ROPE: tl.constexpr, HAS_SEQLENS: tl.constexpr, NUM_SPLITS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Attention of one BLOCK_H tile of query rows over one cache chunk.

    HAS_SEQLENS: sequence b holds ``seqlens[b]`` keys (clamped into [0, L]) instead of L; its
    queries sit at the last S of them. Chunks past a sequence's end hold no key of it.

    grid: (B * cdiv(S·H, BLOCK_H), NUM_SPLITS). Program (b·tiles + t, s) owns rows
    [t·BLOCK_H, (t+1)·BLOCK_H) of sequence b and keys [s·chunk, (s+1)·chunk). With one split it
    writes o in out's dtype; with more, the normalised partial o and the log2-sum-exp2 of its
    scores (float32, -inf where a row sees no key of the chunk) for the combine kernel.
    """
    pid = tl.program_id(0)
    split = tl.program_id(1)
    R = S * H
    tiles = tl.cdiv(R, BLOCK_H)
    b = pid // tiles
    rows = (pid % tiles) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = rows < R
    tok = rows // H
    head = rows % H
    if HAS_SEQLENS:  # this sequence's length; out-of-range values never address memory
        seq_len = tl.minimum(tl.maximum(tl.load(seqlens_ptr + b), 0), L).to(tl.int32)  # clamped before narrowing
    else:
        seq_len = L
    limit = seq_len - S + tok  # the last key each row sees (causal among the new tokens)

    key_start = split * chunk
    last_tok = (tl.minimum((pid % tiles) * BLOCK_H + BLOCK_H, R) - 1) // H
    key_end = tl.minimum(tl.minimum(key_start + chunk, seq_len), seq_len - S + last_tok + 1)

    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < V_DIM
    q_rows = q_ptr + b.to(tl.int64) * stride_qb + tok.to(tl.int64) * stride_qs + head.to(tl.int64) * stride_qh
    q_main = tl.load(q_rows[:, None] + offs_dv[None, :] * stride_qd, mask=row_ok[:, None] & dv_ok[None, :], other=0.0)
    if HAS_ROPE:
        offs_dr = V_DIM + tl.arange(0, BLOCK_DR)
        dr_ok = offs_dr < Dk
        q_rope = tl.load(q_rows[:, None] + offs_dr[None, :] * stride_qd, mask=row_ok[:, None] & dr_ok[None, :],
                         other=0.0)

    kv_base = kv_ptr + b.to(tl.int64) * stride_kb
    m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_DV), dtype=tl.float32)
    for n0 in range(key_start, key_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < key_end
        kv_rows = kv_base + offs_n.to(tl.int64)[:, None] * stride_kl
        kv_main = tl.load(kv_rows + offs_dv[None, :] * stride_kd, mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
        qk = tl.dot(q_main, tl.trans(kv_main), input_precision=DOT_PRECISION)
        if HAS_ROPE:
            k_rope = tl.load(kv_rows + offs_dr[None, :] * stride_kd, mask=n_ok[:, None] & dr_ok[None, :], other=0.0)
            qk = tl.dot(q_rope, tl.trans(k_rope), acc=qk, input_precision=DOT_PRECISION)
        visible = (offs_n[None, :] <= limit[:, None]) & n_ok[None, :]
        qk = tl.where(visible, qk * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw no key yet: p = 0, alpha = 0
        p = tl.exp2(qk - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(kv_main.dtype), kv_main, acc=acc, input_precision=DOT_PRECISION)
        m_i = m_new

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if NUM_SPLITS == 1:
        o_ptrs = (out_ptr + b.to(tl.int64) * stride_ob + tok.to(tl.int64)[:, None] * stride_os
                  + head.to(tl.int64)[:, None] * stride_oh + offs_dv[None, :] * stride_od)
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dv_ok[None, :])
    else:
        # partials: o (B, R, NUM_SPLITS, V_DIM) and lse (B, R, NUM_SPLITS), contiguous float32
        part = (b.to(tl.int64) * R + rows) * NUM_SPLITS + split
        tl.store(part_o_ptr + part[:, None] * V_DIM + offs_dv[None, :], o, mask=row_ok[:, None] & dv_ok[None, :])
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + part, lse, mask=row_ok)


@triton.jit
def _mla_decode_combine_kernel(
    part_o_ptr, part_lse_ptr, out_ptr,
    H, S, V_DIM,
    stride_ob, stride_os, stride_oh, stride_od,
    NUM_SPLITS: tl.constexpr, BLOCK_SPLITS: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """o = Σ_s 2^(lse_s - max) · o_s / Σ_s 2^(lse_s - max) for one query row.

    grid: (B * S·H,). A row that saw no key at all (every lse -inf: only with a cache_seqlens
    entry below S) gets zeros.
    """
    pid = tl.program_id(0)
    R = S * H
    b = pid // R
    r = pid % R
    lse_ptrs = part_lse_ptr + pid.to(tl.int64) * NUM_SPLITS
    offs_s = tl.arange(0, BLOCK_SPLITS)
    lse = tl.load(lse_ptrs + offs_s, mask=offs_s < NUM_SPLITS, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # no key anywhere: every weight below is 0
    denom = tl.sum(tl.exp2(lse - m), 0)
    denom = tl.where(denom > 0, denom, 1.0)
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < V_DIM
    o = tl.zeros((BLOCK_DV,), dtype=tl.float32)
    base = part_o_ptr + pid.to(tl.int64) * NUM_SPLITS * V_DIM
    for s in range(NUM_SPLITS):
        w_s = tl.exp2(tl.load(lse_ptrs + s) - m) / denom  # 0 for a split the row sees no key of
        o += w_s * tl.load(base + s * V_DIM + offs_dv, mask=dv_ok, other=0.0)
    o_ptrs = (out_ptr + b.to(tl.int64) * stride_ob + (r // H).to(tl.int64) * stride_os
              + (r % H).to(tl.int64) * stride_oh + offs_dv * stride_od)
    tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=dv_ok)


_fwd_tuned = autotune("mla_decode", _configs(), key=["H", "S", "Dk", "V_DIM"],
                      prune_configs_by={"early_config_prune": _prune})(_mla_decode_fwd_kernel)


# ----------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # the interpreter: an H100/H200's count, so CPU runs split as the GPU would


def num_splits_for(B: int, R: int, L: int, num_sms: int = 132) -> int:
    """Split-K count from shapes only: the fewest splits whose tiles (B·cdiv(R, 64) per split)
    fill the SMs' last wave to >= 85%, at most one split per 128 keys and 64 splits."""
    tiles = B * cdiv(R, _NOMINAL_BLOCK_H)
    most = max(1, min(_MAX_SPLITS, cdiv(L, _SPLIT_ALIGN)))
    if tiles == 0:
        return 1
    best, best_eff = 1, 0.0
    for s in range(1, most + 1):
        work = tiles * s
        eff = work / (cdiv(work, num_sms) * num_sms)
        if eff >= 0.85:
            return s
        if eff > best_eff + 1e-9:
            best, best_eff = s, eff
    return best


def _domain(q, kv, softmax_scale, *, v_dim=512, cache_seqlens=None, validate=False) -> None:
    kernel_dtype("mla_decode", "q", q, KERNEL_DTYPES)


@kernel_op("mla_decode", contract=check_mla_decode, domain=_domain)
def mla_decode(out, q: Tensor, kv: Tensor, softmax_scale: float, *, v_dim: int = 512,
               cache_seqlens: Tensor | None = None, validate: bool = False, config=None) -> Tensor:
    """MLA decode attention, absorbed form: o (B, S, H, v_dim) in q's dtype.

    q: (B, S, H, Dk) fp16/bf16/fp32 (Dk = kv_lora_rank + rope dim, 576 for DeepSeek), query i
    at position L - S + i; kv: (B, L, Dk) the latent cache (one head for all H), keys all Dk
    columns, values the first ``v_dim``. Query i sees keys 0..L-S+i; float32 softmax.

    cache_seqlens: optional (B,) int32/int64 lengths (FlashMLA's ``cache_seqlens``): sequence b
    holds its first ``cache_seqlens[b]`` keys, in [S, L], and its queries sit at the last S of
    them, so kv can be a fixed-size cache buffer whose shape stays the same from step to step
    (one CUDA graph, one compilation); the values are read on the device only. ``validate``
    checks them (a host sync). Out-of-range lengths are clamped into [0, L] (never out of
    bounds); a row that then sees no key gets zeros.

    ``mla_decode.launch(..., config={"num_splits": n, "config": triton.Config(...)})`` pins the
    split-K count (default ``num_splits_for``: shapes and the SM count) and the tile config.

    >>> q = torch.randn(2, 1, 16, 576, dtype=torch.bfloat16, device="cuda")
    >>> kv = torch.randn(2, 4096, 576, dtype=torch.bfloat16, device="cuda")
    >>> mla_decode(q, kv, 576 ** -0.5).shape
    torch.Size([2, 1, 16, 512])
    >>> lens = torch.tensor([17, 4000], dtype=torch.int32, device="cuda")  # two sequences of a batch
    >>> mla_decode(q, kv, 576 ** -0.5, cache_seqlens=lens).shape
    torch.Size([2, 1, 16, 512])
    """
    B, S, H, Dk = q.shape
    L = kv.shape[1]
    if validate and cache_seqlens is not None:
        validate_seqlens(cache_seqlens, S, L)
    R = S * H
    if B * R == 0:
        return
    num_splits = (config or {}).get("num_splits")
    tile = (config or {}).get("config")
    if num_splits is None:
        num_splits = num_splits_for(B, R, L, _num_sms(q.device))
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits: expected a positive int, got {num_splits!r}")
    chunk = cdiv(cdiv(L, num_splits), _SPLIT_ALIGN) * _SPLIT_ALIGN
    num_splits = cdiv(L, chunk)  # no empty trailing splits
    if num_splits > 1:
        part_o = torch.empty(B, R, num_splits, v_dim, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(B, R, num_splits, dtype=torch.float32, device=q.device)
    else:
        part_o = part_lse = out  # unused
    block_dv = max(16, next_power_of_2(v_dim))
    block_dr = max(16, next_power_of_2(Dk - v_dim))
    kernel = _fwd_tuned if tile is None else _mla_decode_fwd_kernel

    def grid(meta: dict) -> tuple[int, int]:
        return (B * cdiv(R, meta["BLOCK_H"]), num_splits)

    kernel[grid](
        q, kv, q if cache_seqlens is None else cache_seqlens.contiguous(), out, part_o, part_lse,
        H, S, L, Dk, v_dim, float(softmax_scale) * _LOG2E, chunk,
        *q.stride(), *kv.stride(), *out.stride(),
        BLOCK_DV=block_dv, BLOCK_DR=block_dr, HAS_ROPE=Dk > v_dim, HAS_SEQLENS=cache_seqlens is not None,
        NUM_SPLITS=num_splits,
        DOT_PRECISION=dot_precision(q.dtype), **({} if tile is None else tile.all_kwargs()),
    )
    if num_splits > 1:
        _mla_decode_combine_kernel[(B * R,)](
            part_o, part_lse, out, H, S, v_dim, *out.stride(),
            NUM_SPLITS=num_splits, BLOCK_SPLITS=next_power_of_2(num_splits), BLOCK_DV=block_dv,
        )
