"""MLA decode attention in the absorbed form (FlashMLA's problem), in Triton (``moela.reference.mla_decode``).

Legend: B batch, S new query tokens per sequence, H query heads, L cache length, Dk key width
(kv_lora_rank + rope dim: 512 + 64 for DeepSeek), Dv = ``v_dim`` value width (the first Dv
columns of a key), R = S·H query rows per sequence (row r = token r // H, head r % H), P the
number of parts the schedule cuts the work into.

One op with FlashMLA's ``flash_mla_with_kvcache`` contract: the cache layout is a property of
the ``kv`` argument, not another computation, so contiguous or paged (``block_table``, pages of
64 tokens or a multiple) and bf16 or FP8 (``kv`` float8_e4m3fn in FlashMLA's 656-byte rows)
are optional arguments of ``mla_decode`` with one reference, one kernel (constexpr switches) and
one test file; ``return_lse=True`` adds FlashMLA's second output. Separate ops would multiply
the API by the layouts without changing the math. FlashMLA's ``tile_scheduler_metadata`` and
``num_splits`` are not arguments: every call schedules on the device (a few microseconds).

Three kernels per call, no host sync (one CUDA graph replays any lengths):

1. ``_mla_decode_schedule_kernel`` (FlashMLA's ``get_mla_metadata``, on the device): sequence b
   costs ``ceil(len_b / 64) + OVERHEAD`` units (its 64-key blocks and a fixed cost); the units
   of all sequences, laid end to end, are cut into P equal parts (P from shapes and the SM
   count: :func:`num_parts_for`), and a sequence's key blocks inside one part form a piece.
   Pieces get distinct slots (``b + part``: at most B + P - 1), each with its key range.
2. ``_mla_decode_fwd_kernel``, grid (slots · cdiv(R, BLOCK_H),): a program attends one BLOCK_H
   tile of query rows over one piece, streaming its keys past the tile in BLOCK_N blocks (each
   key byte feeds BLOCK_H rows). A key block is one tile of its first Dv columns (keys and
   values at once: the B operand of q·kᵀ and of p·v) and one of the rope columns; FP8 rows are
   dequantized in registers (``bf16(e4m3 · scale)``, the reference's rounding) before the same
   bf16 dots. Float32 online softmax in the exp2 domain; p is rounded to the keys' dtype before
   p·v. A sequence in one piece is written to ``out`` (and ``lse``) directly; otherwise the
   piece's normalised partial o and log2-sum-exp2 go to its slot.
3. ``_mla_decode_combine_kernel``, grid (B, cdiv(R, 16)): merges the pieces of split
   sequences; a sequence without keys gets zeros (lse -inf).

One program per piece, not FlashMLA's one persistent CTA per SM walking its sequences: a loop
over sequences around the key loop costs Triton ~75 registers (spills), and the hardware's
block scheduler balances equal-sized pieces as well.

Configs (:data:`CONFIGS`, :func:`config_for`) come from the sm_90 compile (registers, spills,
shared memory, CTAs per SM; ``tests/kernels/test_mla_decode_sm90.py`` checks them), keyed on R
and the cache kind. Bounds: ``cache_seqlens`` is clamped into [0, L] and a page id outside the
pool holds no key (masked, never read), the reference's rule; ``validate=True`` raises instead.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from moela import knobs
from moela.reference.fp8 import FP8_DTYPE
from moela.reference.mla_decode import (
    FP8_LATENT_BLOCK,
    check_mla_decode,
    validate_block_table,
    validate_seqlens,
)

from ._common import cdiv, kernel_dtype, next_power_of_2, parse_config
from .factory import kernel_op
from .tl_helpers import dot_precision

__all__ = ["mla_decode", "num_parts_for", "config_for", "smem_bytes", "CONFIGS", "KERNEL_DTYPES", "PAGE_ALIGN"]

#: Input dtypes of the kernels (float32 softmax and accumulation for all).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Keys per schedule unit; page sizes must be multiples of it (every key block lies in one page).
PAGE_ALIGN = 64
_BLOCK_S = PAGE_ALIGN
#: Shared memory per SM and per block on sm_90, and what the driver reserves per block.
_SMEM_PER_SM, _SMEM_PER_BLOCK, _SMEM_RESERVED = 228 * 1024, 227 * 1024, 1024
_COMBINE_ROWS = 16
_LOG2E = 1.4426950408889634
_LN2 = tl.constexpr(0.6931471805599453)


# ----------------------------------------------------------------------------------------
# Configs: measured in an sm_90 compile (see tests/kernels/test_mla_decode_sm90.py)
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Choice:
    """One config of the decode kernel, with what the sm_90 compile reports at Dk=576, Dv=512
    (``tests/kernels/test_mla_decode_sm90.py`` recompiles each and checks these numbers)."""

    kind: str  # the cache: "16-bit" (bf16/fp16), "fp8" or "fp32"
    max_rows: int  # chosen for R = S·H up to this (the first of its kind that covers R)
    block_h: int
    block_n: int
    num_warps: int
    num_stages: int
    regs: int  # registers per thread (ptxas); no spills
    ctas_per_sm: int  # resident CTAs per SM from the registers and :func:`smem_bytes`

    @property
    def config(self) -> triton.Config:
        return triton.Config({"BLOCK_H": self.block_h, "BLOCK_N": self.block_n}, num_warps=self.num_warps,
                             num_stages=self.num_stages)


#: The configs, per kind in increasing max_rows. 16-bit caches: 16 and 32-row tiles (mma.sync,
#: the q tile and two 16-key stages in shared memory) for few heads, 2-4 CTAs per SM; a 64-row
#: tile (wgmma, 8 warps sharing the 64 × 512 float32 accumulator: 1 CTA per SM by registers) for
#: many heads. FP8 caches: blocks prefetched into registers and dequantized there (64-row tiles
#: spill). float32: one spill-free tile.
CONFIGS: tuple[Choice, ...] = (
    Choice("16-bit", 16, 16, 16, 4, 3, regs=128, ctas_per_sm=4),  # 55 KB shared
    Choice("16-bit", 32, 32, 16, 4, 3, regs=255, ctas_per_sm=2),  # 73 KB
    Choice("16-bit", 1 << 30, 64, 32, 8, 2, regs=253, ctas_per_sm=1),  # 144 KB
    Choice("fp8", 16, 16, 16, 4, 1, regs=215, ctas_per_sm=2),  # 36 KB
    Choice("fp8", 1 << 30, 32, 32, 8, 1, regs=221, ctas_per_sm=1),  # 72 KB
    Choice("fp32", 1 << 30, 16, 16, 8, 2, regs=230, ctas_per_sm=1),  # 104 KB
)


def smem_bytes(kind: str, block_h: int, block_n: int, num_stages: int, block_dv: int = 512, block_dr: int = 64) -> int:
    """Shared memory the decode kernel takes (Triton 3.6's allocation, as an sm_90 compile reports it).

    The larger of the main loop's buffers and the epilogue's float32 o tile (BLOCK_H × BLOCK_DV,
    converted through shared memory before the store). The main loop holds the q tile and:
    16-bit caches, num_stages - 1 key blocks (mma.sync, with the p tile) or num_stages blocks
    (wgmma, BLOCK_H >= 64); FP8, the dequantized bf16 block; float32, the key block twice
    (operand and layout conversion) and num_stages - 1 rope blocks.
    """
    width = block_dv + block_dr
    size = 4 if kind == "fp32" else 2
    q = block_h * width * size
    if kind == "fp8":
        loop = q + block_n * width * 2
    elif kind == "fp32":
        loop = q + 2 * block_n * block_dv * 4 + (num_stages - 1) * block_n * block_dr * 4
    elif block_h >= 64:
        loop = q + num_stages * block_n * width * 2
    else:
        loop = q + (num_stages - 1) * block_n * width * 2 + block_h * block_n * 2
    return max(loop, block_h * block_dv * 4)


def _cache_kind(dtype: torch.dtype, fp8: bool) -> str:
    return "fp8" if fp8 else ("fp32" if dtype == torch.float32 else "16-bit")


def config_for(rows: int, dtype: torch.dtype, fp8: bool) -> Choice:
    """The config for R = ``rows`` query rows per sequence, the queries' dtype and the cache kind."""
    mine = [c for c in CONFIGS if c.kind == _cache_kind(dtype, fp8)]
    return next((c for c in mine if rows <= c.max_rows), mine[-1])


def _overhead(block_h: int) -> int:
    """A piece's fixed cost in 64-key blocks: its q tile, partial write and pipeline fill."""
    return 1 + cdiv(block_h, 32)


def num_parts_for(B: int, tiles: int, L: int, num_sms: int = 132, ctas_per_sm: int = 2) -> int:
    """Parts of the schedule (the units of all sequences are cut into this many equal ranges),
    from shapes and the SM count only (no host sync): parts × head tiles = the CTAs resident on
    all SMs at once (``ctas_per_sm`` each), at most one part per 64-key block of the cache
    (B · ceil(L / 64)). The grid then has B + parts - 1 slots × tiles programs."""
    most = B * cdiv(L, _BLOCK_S)
    return max(1, min(ctas_per_sm * num_sms // max(tiles, 1), most))


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------


@triton.jit
def _seq_len(seqlens_ptr, b, valid, L, HAS_SEQLENS: tl.constexpr):
    """Keys held by sequences ``b`` (clamped into [0, L] before narrowing; 0 where not valid)."""
    if HAS_SEQLENS:
        n = tl.load(seqlens_ptr + b, mask=valid, other=0)
        n = tl.minimum(tl.maximum(n, 0), L).to(tl.int32)
    else:
        n = tl.where(valid, L, 0)
    return n


@triton.jit
def _mla_decode_schedule_kernel(
    seqlens_ptr, sched_ptr, B, L, num_parts, num_slots,
    HAS_SEQLENS: tl.constexpr, BLOCK_S: tl.constexpr, OVERHEAD: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_SLOT: tl.constexpr,
):
    """Balanced work pieces from the lengths, FlashMLA's ``get_mla_metadata`` on the device.

    Sequence b costs ``cost_b = nblk_b + OVERHEAD`` units (``nblk_b = ceil(len_b / BLOCK_S)``
    key blocks plus its fixed cost; 0 without keys) and takes units [E_b - cost_b, E_b) of
    the sequences laid end to end (E the inclusive prefix sum), its key blocks the last nblk_b
    of them, from K_b = E_b - nblk_b. The units are cut into P parts of T = ceil(E_{B-1} / P);
    a piece is the key blocks of one sequence inside one part. Sequence b's pieces are the
    parts first_b = K_b // T .. (E_b - 1) // T, numbered from ``slot0_b = b + first_b``, which
    increases with b, so the pieces of all sequences take distinct slots < B + P - 1.

    ``sched`` (int32): per slot s (num_slots = B + P - 1 of them) its sequence, first and end
    key ([0, NS), [NS, 2NS), [2NS, 3NS); an unused slot: sequence 0 and no keys), then per
    sequence slot0_b and its number of pieces ([3NS, 3NS + B), [3NS + B, 3NS + 2B)).

    grid: (cdiv(num_slots, BLOCK_SLOT),); program 0 also writes the per-sequence entries.
    """
    pid = tl.program_id(0)
    offs_b = tl.arange(0, BLOCK_B)
    total = 0
    for b0 in range(0, B, BLOCK_B):
        nblk = tl.cdiv(_seq_len(seqlens_ptr, b0 + offs_b, b0 + offs_b < B, L, HAS_SEQLENS), BLOCK_S)
        total += tl.sum(tl.where(nblk > 0, nblk + OVERHEAD, 0), 0)
    T = tl.maximum(tl.cdiv(total, num_parts), 1)
    slots = pid * BLOCK_SLOT + tl.arange(0, BLOCK_SLOT)
    slot_ok = slots < num_slots
    # the sequence of each slot and its units (exactly one sequence matches a used slot)
    seq = tl.zeros((BLOCK_SLOT,), dtype=tl.int32)
    k_start = tl.zeros((BLOCK_SLOT,), dtype=tl.int32)
    k_end = tl.zeros((BLOCK_SLOT,), dtype=tl.int32)
    n_keys = tl.zeros((BLOCK_SLOT,), dtype=tl.int32)
    carry = 0
    for b0 in range(0, B, BLOCK_B):
        b = b0 + offs_b
        b_ok = b < B
        n = _seq_len(seqlens_ptr, b, b_ok, L, HAS_SEQLENS)
        nblk = tl.cdiv(n, BLOCK_S)
        ends = carry + tl.cumsum(tl.where(nblk > 0, nblk + OVERHEAD, 0), 0)
        starts = ends - nblk
        slot0 = b + starts // T
        pieces = tl.where(nblk > 0, (ends - 1) // T - starts // T + 1, 0)
        tl.store(sched_ptr + 3 * num_slots + b, slot0, mask=b_ok & (pid == 0))
        tl.store(sched_ptr + 3 * num_slots + B + b, pieces, mask=b_ok & (pid == 0))
        mine = (slot0[None, :] <= slots[:, None]) & (slots[:, None] < (slot0 + pieces)[None, :]) & b_ok[None, :]
        seq += tl.sum(tl.where(mine, b[None, :], 0), 1)
        k_start += tl.sum(tl.where(mine, starts[None, :], 0), 1)
        k_end += tl.sum(tl.where(mine, ends[None, :], 0), 1)
        n_keys += tl.sum(tl.where(mine, n[None, :], 0), 1)
        carry += tl.sum(tl.where(nblk > 0, nblk + OVERHEAD, 0), 0)
    part = slots - seq
    lo = tl.maximum(part * T, k_start)
    hi = tl.minimum(part * T + T, k_end)
    key_lo = tl.where(hi > lo, (lo - k_start) * BLOCK_S, 0)
    key_hi = tl.where(hi > lo, tl.minimum((hi - k_start) * BLOCK_S, n_keys), 0)
    tl.store(sched_ptr + slots, seq, mask=slot_ok)
    tl.store(sched_ptr + num_slots + slots, key_lo, mask=slot_ok)
    tl.store(sched_ptr + 2 * num_slots + slots, key_hi, mask=slot_ok)


@triton.jit
def _key_block(bt_ptr, b, n0, key_end, num_pages, page_size, stride_btb, BLOCK_N: tl.constexpr, PAGED: tl.constexpr):
    """Keys [n0, n0 + BLOCK_N) of sequence b: (page, row in the page (int64), held). BLOCK_N divides
    the page size, so a block lies in one page; a page id outside [0, num_pages) holds no key
    (its rows are not read). Contiguous cache: page = sequence, row = key."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < key_end
    if PAGED:
        blk = n0 // page_size
        page = tl.load(bt_ptr + b * stride_btb + blk, mask=n0 < key_end, other=-1)
        page_ok = (page >= 0) & (page < num_pages)
        return tl.where(page_ok, page, 0).to(tl.int64), (offs_n - blk * page_size).to(tl.int64), n_ok & page_ok
    else:
        return b, offs_n.to(tl.int64), n_ok


@triton.jit
def _fp8_block(kv_ptr, kvs_ptr, kvr_ptr, page, key_row, n_ok, V_DIM, DR,
               stride_kp, stride_kl, stride_sp, stride_sl, stride_rp, stride_rl,
               BLOCK_DV: tl.constexpr, BLOCK_DR: tl.constexpr, SCALE_BLOCK: tl.constexpr):
    """One block of FP8 cache rows: e4m3 values (BLOCK_N, BLOCK_DV), float32 scales (BLOCK_N, NB),
    bf16 rope (BLOCK_N, BLOCK_DR); zeros for rows not held."""
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_dr = tl.arange(0, BLOCK_DR)
    offs_blk = tl.arange(0, BLOCK_DV // SCALE_BLOCK)
    vals = tl.load((kv_ptr + page * stride_kp + key_row * stride_kl)[:, None] + offs_dv[None, :],
                   mask=n_ok[:, None] & (offs_dv < V_DIM)[None, :], other=0.0)
    scales = tl.load((kvs_ptr + page * stride_sp + key_row * stride_sl)[:, None] + offs_blk[None, :],
                     mask=n_ok[:, None] & (offs_blk * SCALE_BLOCK < V_DIM)[None, :], other=0.0)
    rope = tl.load((kvr_ptr + page * stride_rp + key_row * stride_rl)[:, None] + offs_dr[None, :],
                   mask=n_ok[:, None] & (offs_dr < DR)[None, :], other=0.0)
    return vals, scales, rope


@triton.jit
def _dequant(vals, scales, BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr, SCALE_BLOCK: tl.constexpr):
    """bf16(e4m3 · scale of its SCALE_BLOCK columns), the product in float32 rounded once."""
    wide = tl.broadcast_to(scales[:, :, None], (BLOCK_N, BLOCK_DV // SCALE_BLOCK, SCALE_BLOCK))
    return (vals.to(tl.float32) * tl.reshape(wide, (BLOCK_N, BLOCK_DV))).to(tl.bfloat16)


@triton.jit
def _attend_block(q_main, q_rope, kv_main, k_rope, visible, m_i, l_i, acc, scale_log2,
                  HAS_ROPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One online-softmax step over a key block (exp2 domain): returns (m, l, acc)."""
    qk = tl.dot(q_main, tl.trans(kv_main), input_precision=DOT_PRECISION)
    if HAS_ROPE:
        qk = tl.dot(q_rope, tl.trans(k_rope), acc=qk, input_precision=DOT_PRECISION)
    qk = tl.where(visible, qk * scale_log2, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw no key yet: p = 0, alpha = 0
    p = tl.exp2(qk - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(kv_main.dtype), kv_main, acc=acc * alpha[:, None], input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _mla_decode_fwd_kernel(
    q_ptr, kv_ptr, kvs_ptr, kvr_ptr, bt_ptr, seqlens_ptr, sched_ptr,
    out_ptr, lse_ptr, part_o_ptr, part_lse_ptr,
    B, H, S, L, V_DIM, DR, num_pages, page_size, num_slots, scale_log2,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kp, stride_kl, stride_kd,
    stride_sp, stride_sl,
    stride_rp, stride_rl, stride_rd,
    stride_btb,
    stride_ob, stride_os, stride_oh, stride_od,
    stride_lb, stride_ls, stride_lh,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DR: tl.constexpr,
    SCALE_BLOCK: tl.constexpr,
    HAS_ROPE: tl.constexpr, HAS_SEQLENS: tl.constexpr, PAGED: tl.constexpr, FP8: tl.constexpr,
    WRITE_LSE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Attention of one BLOCK_H tile of query rows over one piece (a sequence's keys in one part).

    kv_ptr: the first Dv columns of each key (FP8: e4m3 bytes, columns contiguous), kvs_ptr:
    FP8 scales (float32, one per SCALE_BLOCK columns), kvr_ptr: the DR rope columns; each
    addressed as ``page·stride_?p + row·stride_?l`` (``_key_block``). bf16/fp16/fp32 blocks are
    loaded where they are used and software-pipelined by Triton (num_stages); FP8 blocks are
    loaded one block ahead into registers (their first user is the dequantization, not a dot).

    grid: (num_slots · cdiv(S·H, BLOCK_H),). Program (slot · tiles + t) owns rows
    [t·BLOCK_H, (t+1)·BLOCK_H) of the slot's piece (``_mla_decode_schedule_kernel``): a
    sequence in one piece is written to out (and lse); otherwise, and for an unused slot, the
    normalised partial o and log2-sum-exp2 go to partial slot ``slot``.
    """
    pid = tl.program_id(0)
    R = S * H
    tiles = tl.cdiv(R, BLOCK_H)
    slot = pid // tiles
    row0 = (pid % tiles) * BLOCK_H
    rows = row0 + tl.arange(0, BLOCK_H)
    row_ok = rows < R
    tok = rows // H
    head = rows % H
    b = tl.load(sched_ptr + slot).to(tl.int64)
    key_lo = tl.load(sched_ptr + num_slots + slot)
    key_hi = tl.load(sched_ptr + 2 * num_slots + slot)
    pieces = tl.load(sched_ptr + 3 * num_slots + B + b)
    seq_len = _seq_len(seqlens_ptr, b, True, L, HAS_SEQLENS)
    limit = seq_len - S + tok  # the last key each row sees (causal among the new tokens)
    key_end = tl.minimum(key_hi, seq_len - S + (tl.minimum(row0 + BLOCK_H, R) - 1) // H + 1)

    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < V_DIM
    offs_dr = tl.arange(0, BLOCK_DR)
    dr_ok = offs_dr < DR
    q_rows = q_ptr + b * stride_qb + tok.to(tl.int64) * stride_qs + head.to(tl.int64) * stride_qh
    q_main = tl.load(q_rows[:, None] + offs_dv[None, :] * stride_qd, mask=row_ok[:, None] & dv_ok[None, :], other=0.0)
    q_rope = q_main
    if HAS_ROPE:
        q_rope = tl.load(q_rows[:, None] + (V_DIM + offs_dr)[None, :] * stride_qd,
                         mask=row_ok[:, None] & dr_ok[None, :], other=0.0)
    m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_DV), dtype=tl.float32)
    if FP8:
        page, key_row, n_ok = _key_block(bt_ptr, b, key_lo, key_end, num_pages, page_size, stride_btb, BLOCK_N, PAGED)
        vals, scales, rope = _fp8_block(kv_ptr, kvs_ptr, kvr_ptr, page, key_row, n_ok, V_DIM, DR, stride_kp,
                                        stride_kl, stride_sp, stride_sl, stride_rp, stride_rl, BLOCK_DV, BLOCK_DR,
                                        SCALE_BLOCK)
        for n0 in range(key_lo, key_end, BLOCK_N):
            cur_vals, cur_scales, cur_rope, cur_ok = vals, scales, rope, n_ok
            page, key_row, n_ok = _key_block(bt_ptr, b, n0 + BLOCK_N, key_end, num_pages, page_size, stride_btb,
                                             BLOCK_N, PAGED)
            vals, scales, rope = _fp8_block(kv_ptr, kvs_ptr, kvr_ptr, page, key_row, n_ok, V_DIM, DR, stride_kp,
                                            stride_kl, stride_sp, stride_sl, stride_rp, stride_rl, BLOCK_DV, BLOCK_DR,
                                            SCALE_BLOCK)
            visible = ((n0 + tl.arange(0, BLOCK_N))[None, :] <= limit[:, None]) & cur_ok[None, :]
            kv_main = _dequant(cur_vals, cur_scales, BLOCK_N, BLOCK_DV, SCALE_BLOCK)
            m_i, l_i, acc = _attend_block(q_main, q_rope, kv_main, cur_rope, visible, m_i, l_i, acc, scale_log2,
                                          HAS_ROPE, DOT_PRECISION)
    else:
        for n0 in range(key_lo, key_end, BLOCK_N):
            page, key_row, n_ok = _key_block(bt_ptr, b, n0, key_end, num_pages, page_size, stride_btb, BLOCK_N, PAGED)
            kv_main = tl.load((kv_ptr + page * stride_kp + key_row * stride_kl)[:, None] + offs_dv[None, :] * stride_kd,
                              mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
            k_rope = kv_main
            if HAS_ROPE:
                k_rope = tl.load((kvr_ptr + page * stride_rp + key_row * stride_rl)[:, None]
                                 + offs_dr[None, :] * stride_rd, mask=n_ok[:, None] & dr_ok[None, :], other=0.0)
            visible = ((n0 + tl.arange(0, BLOCK_N))[None, :] <= limit[:, None]) & n_ok[None, :]
            m_i, l_i, acc = _attend_block(q_main, q_rope, kv_main, k_rope, visible, m_i, l_i, acc, scale_log2,
                                          HAS_ROPE, DOT_PRECISION)

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    lse2 = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    if (pieces == 1) & (key_hi > 0):  # the sequence's only piece: the final output
        o_ptrs = (out_ptr + b * stride_ob + tok.to(tl.int64)[:, None] * stride_os
                  + head.to(tl.int64)[:, None] * stride_oh + offs_dv[None, :] * stride_od)
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dv_ok[None, :])
        if WRITE_LSE:
            tl.store(lse_ptr + b * stride_lb + tok * stride_ls + head * stride_lh, lse2 * _LN2, mask=row_ok)
    else:  # partials (slots, R, V_DIM) and (slots, R), float32 contiguous
        part = slot.to(tl.int64) * R + rows
        tl.store(part_o_ptr + part[:, None] * V_DIM + offs_dv[None, :], o, mask=row_ok[:, None] & dv_ok[None, :])
        tl.store(part_lse_ptr + part, lse2, mask=row_ok)


@triton.jit
def _mla_decode_combine_kernel(
    sched_ptr, part_o_ptr, part_lse_ptr, out_ptr, lse_ptr,
    B, H, S, V_DIM, num_slots,
    stride_ob, stride_os, stride_oh, stride_od,
    stride_lb, stride_ls, stride_lh,
    BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr, WRITE_LSE: tl.constexpr,
):
    """o = Σ_p 2^(lse_p - m) · o_p / Σ_p 2^(lse_p - m) over the pieces p of a split sequence.

    grid: (B, cdiv(S·H, BLOCK_R)). A sequence in one piece was written by the decode kernel; a
    sequence without keys (no piece) gets zeros (lse -inf), as does a row that sees no key.
    """
    b = tl.program_id(0).to(tl.int64)
    R = S * H
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < V_DIM
    slot0 = tl.load(sched_ptr + 3 * num_slots + b)
    pieces = tl.load(sched_ptr + 3 * num_slots + B + b)
    if pieces != 1:
        m = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
        for s in range(slot0, slot0 + pieces):
            m = tl.maximum(m, tl.load(part_lse_ptr + s * R + rows, mask=row_ok, other=float("-inf")))
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        denom = tl.zeros((BLOCK_R,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_R, BLOCK_DV), dtype=tl.float32)
        for s in range(slot0, slot0 + pieces):
            part = s * R + rows
            w = tl.exp2(tl.load(part_lse_ptr + part, mask=row_ok, other=float("-inf")) - m_safe)  # 0 for -inf
            denom += w
            acc += w[:, None] * tl.load(part_o_ptr + part[:, None].to(tl.int64) * V_DIM + offs_dv[None, :],
                                        mask=row_ok[:, None] & dv_ok[None, :], other=0.0)
        o = acc / tl.where(denom > 0, denom, 1.0)[:, None]
        tok = rows // H
        head = rows % H
        o_ptrs = (out_ptr + b * stride_ob + tok.to(tl.int64)[:, None] * stride_os
                  + head.to(tl.int64)[:, None] * stride_oh + offs_dv[None, :] * stride_od)
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dv_ok[None, :])
        if WRITE_LSE:
            lse = tl.where(denom > 0, (m_safe + tl.log2(tl.where(denom > 0, denom, 1.0))) * _LN2, float("-inf"))
            tl.store(lse_ptr + b * stride_lb + tok * stride_ls + head * stride_lh, lse, mask=row_ok)


# ----------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # the interpreter: an H100/H200's count, so CPU runs schedule as the GPU would


def _domain(q, kv, softmax_scale, *, v_dim=512, cache_seqlens=None, block_table=None, return_lse=False,
            validate=False) -> None:
    kernel_dtype("mla_decode", "q", q, KERNEL_DTYPES)
    if block_table is not None and kv.shape[1] % PAGE_ALIGN:
        raise ValueError(f"kv: the Triton mla_decode kernel takes pages of a multiple of {PAGE_ALIGN} tokens, got "
                         f"page size {kv.shape[1]} (moela.reference.mla_decode computes it)")
    if kv.dtype == FP8_DTYPE and (kv.stride(-1) != 1 or any(s % 4 for s in kv.stride()[:-1])):
        raise ValueError(f"kv: the Triton mla_decode kernel reads FP8 rows with contiguous columns and 4-byte "
                         f"aligned rows (float32 scales), got strides {kv.stride()}")


def _cache_parts(kv: Tensor, v_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """(values, scales, rope) views of the cache: FP8 rows -> e4m3, float32, bf16 views; else kv twice."""
    if kv.dtype != FP8_DTYPE:
        return kv, kv, kv[..., v_dim:]
    if kv.storage_offset() % 4:  # (checked here, at run time: compiled graphs do not trace offsets)
        raise ValueError(f"kv: the Triton mla_decode kernel reads FP8 rows 4-byte aligned (float32 scales), got "
                         f"a view at byte offset {kv.storage_offset()}")
    nb = v_dim // FP8_LATENT_BLOCK
    raw = kv.view(torch.uint8)
    return (kv[..., :v_dim], raw[..., v_dim:v_dim + 4 * nb].view(torch.float32),
            raw[..., v_dim + 4 * nb:].view(torch.bfloat16))


def _pinned(config: dict | None, kind: str, block_dv: int, block_dr: int) -> Choice | None:
    """A config from ``config={"config": triton.Config}`` or MOELA_MLA_DECODE_CONFIG (CTAs per SM
    from its shared memory alone, at most 4), or None."""
    tile = (config or {}).get("config")
    if tile is None:
        spec = knobs.get(knobs.config_knob("mla_decode"))
        tile = parse_config(spec, knobs.config_knob("mla_decode")) if spec else None
    if tile is None:
        return None
    bh, bn = tile.kwargs.get("BLOCK_H"), tile.kwargs.get("BLOCK_N")
    if not isinstance(bh, int) or not isinstance(bn, int) or bh < 16 or bn < 16 or bn > _BLOCK_S or _BLOCK_S % bn \
            or bh & (bh - 1):
        raise ValueError(f"config: expected BLOCK_H a power of two >= 16 and BLOCK_N in 16, 32, 64, got {tile}")
    smem = smem_bytes(kind, bh, bn, tile.num_stages, block_dv, block_dr)
    if smem > _SMEM_PER_BLOCK:
        raise ValueError(f"config: {tile} takes {smem} bytes of shared memory, more than {_SMEM_PER_BLOCK}")
    ctas = min(4, _SMEM_PER_SM // (smem + _SMEM_RESERVED))
    return Choice("pinned", 0, bh, bn, tile.num_warps, tile.num_stages, 0, ctas)


def _schedule(seqlens: Tensor | None, B: int, L: int, num_parts: int, overhead: int, device: torch.device) -> Tensor:
    """The work pieces (``_mla_decode_schedule_kernel``'s int32 layout, B + num_parts - 1 slots)."""
    slots = B + num_parts - 1
    sched = torch.empty(3 * slots + 2 * B, dtype=torch.int32, device=device)
    block_slot = min(128, next_power_of_2(slots))
    _mla_decode_schedule_kernel[(cdiv(slots, block_slot),)](
        sched if seqlens is None else seqlens, sched, B, L, num_parts, slots,
        HAS_SEQLENS=seqlens is not None, BLOCK_S=_BLOCK_S, OVERHEAD=overhead,
        BLOCK_B=min(64, next_power_of_2(B)), BLOCK_SLOT=block_slot,
    )
    return sched


@kernel_op("mla_decode", contract=check_mla_decode, domain=_domain)
def mla_decode(out, q: Tensor, kv: Tensor, softmax_scale: float, *, v_dim: int = 512,
               cache_seqlens: Tensor | None = None, block_table: Tensor | None = None, return_lse: bool = False,
               validate: bool = False, config=None) -> list[Tensor]:
    """MLA decode attention, absorbed form: o (B, S, H, v_dim) in q's dtype (and lse (B, S, H) float32).

    q: (B, S, H, Dk) fp16/bf16/fp32 (Dk = kv_lora_rank + rope dim, 576 for DeepSeek), query i
    at position len_b - S + i; kv: the latent cache (one head for all H), keys all Dk columns,
    values the first ``v_dim``: (B, L, Dk), or with ``block_table`` (B, max_blocks) int32 a page
    pool (num_pages, page_size, Dk) with page_size a multiple of 64 (FlashMLA's 64); an FP8
    cache is float8_e4m3fn in FlashMLA's rows (v_dim e4m3 values, v_dim/128 float32 scales,
    bf16 rope: 656 bytes for 512 + 64) and takes bf16 queries.

    cache_seqlens: optional (B,) int32/int64 lengths (FlashMLA's): sequence b holds its first
    ``cache_seqlens[b]`` keys, in [S, L], its queries the last S of them; read on the device
    only, so one CUDA graph serves every step. Out-of-range lengths are clamped into [0, L],
    page ids outside the pool hold no key (never read); ``validate`` raises instead (a host
    sync). A row that sees no key gets zeros (lse -inf). ``return_lse``: also the natural-log
    log-sum-exp of the scaled scores, FlashMLA's second output, (B, S, H) float32.

    ``mla_decode.launch(..., config={"num_parts": n, "config": triton.Config(...)})`` pins the
    schedule's part count (default :func:`num_parts_for`) and the tile config (default
    :func:`config_for`; ``MOELA_MLA_DECODE_CONFIG`` pins it too).

    >>> q = torch.randn(2, 1, 16, 576, dtype=torch.bfloat16, device="cuda")
    >>> kv = torch.randn(2, 4096, 576, dtype=torch.bfloat16, device="cuda")
    >>> mla_decode(q, kv, 576 ** -0.5).shape
    torch.Size([2, 1, 16, 512])
    >>> pool = torch.randn(100, 64, 576, dtype=torch.bfloat16, device="cuda")   # 100 pages of 64 tokens
    >>> table = torch.randint(0, 100, (2, 64), dtype=torch.int32, device="cuda")  # up to 4096 tokens each
    >>> lens = torch.tensor([17, 4000], dtype=torch.int32, device="cuda")
    >>> o, lse = mla_decode(q, pool, 576 ** -0.5, cache_seqlens=lens, block_table=table, return_lse=True)
    """
    o_out, lse_out = out if return_lse else (out, None)
    B, S, H, Dk = q.shape
    paged, fp8 = block_table is not None, kv.dtype == FP8_DTYPE
    L = block_table.shape[1] * kv.shape[1] if paged else kv.shape[1]
    if validate:
        if cache_seqlens is not None:
            validate_seqlens(cache_seqlens, S, L)
        if paged:
            validate_block_table(block_table, kv.shape[0], kv.shape[1], cache_seqlens)
    R = S * H
    if B * R == 0:
        return
    block_dv, block_dr = max(16, next_power_of_2(v_dim)), max(16, next_power_of_2(Dk - v_dim))
    choice = _pinned(config, _cache_kind(q.dtype, fp8), block_dv, block_dr) or config_for(R, q.dtype, fp8)
    tiles = cdiv(R, choice.block_h)
    num_parts = (config or {}).get("num_parts")
    if num_parts is None:
        num_parts = num_parts_for(B, tiles, L, _num_sms(q.device), choice.ctas_per_sm)
    if isinstance(num_parts, bool) or not isinstance(num_parts, int) or num_parts < 1:
        raise ValueError(f"num_parts: expected a positive int, got {num_parts!r}")

    dev = q.device
    seqlens = cache_seqlens.contiguous() if cache_seqlens is not None else None
    sched = _schedule(seqlens, B, L, num_parts, _overhead(choice.block_h), dev)
    slots = B + num_parts - 1
    has_seqlens = seqlens is not None
    seqlens = seqlens if has_seqlens else q  # (an unread placeholder)
    part_o = torch.empty(slots, R, v_dim, dtype=torch.float32, device=dev)
    part_lse = torch.empty(slots, R, dtype=torch.float32, device=dev)
    lse_arg = lse_out if lse_out is not None else part_lse
    lse_strides = lse_out.stride() if lse_out is not None else (0, 0, 0)
    values, scales, rope = _cache_parts(kv, v_dim)
    table = block_table if paged else sched
    _mla_decode_fwd_kernel[(slots * tiles,)](
        q, values, scales, rope, table, seqlens, sched, o_out, lse_arg, part_o, part_lse,
        B, H, S, L, v_dim, Dk - v_dim, kv.shape[0], kv.shape[1], slots, float(softmax_scale) * _LOG2E,
        *q.stride(), values.stride(0), values.stride(1), values.stride(2),
        scales.stride(0), scales.stride(1), rope.stride(0), rope.stride(1), rope.stride(2),
        table.stride(0) if paged else 0, *o_out.stride(), *lse_strides,
        BLOCK_H=choice.block_h, BLOCK_N=choice.block_n, BLOCK_DV=block_dv,
        BLOCK_DR=block_dr, SCALE_BLOCK=FP8_LATENT_BLOCK,
        HAS_ROPE=Dk > v_dim, HAS_SEQLENS=has_seqlens, PAGED=paged, FP8=fp8,
        WRITE_LSE=lse_out is not None, DOT_PRECISION=dot_precision(q.dtype),
        num_warps=choice.num_warps, num_stages=choice.num_stages,
    )
    _mla_decode_combine_kernel[(B, cdiv(R, _COMBINE_ROWS))](
        sched, part_o, part_lse, o_out, lse_arg, B, H, S, v_dim, slots, *o_out.stride(), *lse_strides,
        BLOCK_R=_COMBINE_ROWS, BLOCK_DV=block_dv, WRITE_LSE=lse_out is not None,
    )
