"""The launches ``profiling audit`` compiles: every Triton kernel's arguments at DeepSeek shapes.

One entry per audit target (a kernel's autotuner, or a kernel launched without one), keyed by
the target's name (``moela.profiling.audit``: the kernel function's name without ``_`` and
``_kernel``, plus ``/key`` for an autotuner kept in a dict under ``key``). Each entry lists
launches; the first is the representative one (the test suite compiles only it), the others
make up the full sweep. A launch gives every kernel parameter by name, as the kernel's launcher
passes it at that shape: tensors on the meta device (their dtype, strides and storage offset
decide the pointer types and the divisibility attributes Triton specialises on, as on a GPU),
Python ints and floats, constexprs; the autotuner's config adds its block sizes. ``options``
are the launch options the launcher passes (``num_warps`` of an untuned launch,
``enable_fp_fusion=False``).

Legend: T tokens, D model dim, I expert hidden dim, E experts, k experts per token, M rows
after dispatch (T·k), N×K a weight, B = 128 the FP8 block.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import triton

from .shapes import DEEPGEMM_DENSE, DEEPGEMM_GROUPED, FLASHMLA_DECODE, V2_LITE, V3

__all__ = ["Launch", "LAUNCHES", "launches"]

BF16, F32, I32, E4M3 = torch.bfloat16, torch.float32, torch.int32, torch.float8_e4m3fn
B = 128  # FP8 scale block
D, I, E, TOPK = V3.dim, V3.moe_inter_dim, V3.n_routed_experts, V3.n_activated_experts
PREFILL_T, DECODE_T = 4096, 128  # tokens per GPU of a prefill chunk and of a decode step


@dataclass(frozen=True)
class Launch:
    """One launch: ``args`` every kernel parameter the launcher passes (config keys excluded)."""

    label: str
    args: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)


def _t(*shape: int, dtype: torch.dtype = BF16) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def _col_major(rows: int, cols: int) -> torch.Tensor:
    """(rows, cols) float32 with strides (1, rows): the FP8 GEMMs' activation-scale layout."""
    return _t(cols, rows, dtype=F32).t()


def _strides(names: str, t: torch.Tensor) -> dict[str, int]:
    return dict(zip(names.split(), t.stride(), strict=True))


def _m_bucket(M: int) -> int:
    """The kernels' autotune key of a row count (``kernels._common.m_bucket``)."""
    return max(16, triton.next_power_of_2(M))


_NO_FMA = dict(enable_fp_fusion=False)


# ---------------------------------------------------------------------------- grouped GEMM (bf16)
def _grouped_fwd(label: str, M: int, E: int, N: int, K: int, dx: bool = False) -> Launch:
    """Forward ``xs (M, K) · w[e]ᵀ``; ``dx``: the dX launch, w read transposed (``w.transpose(1, 2)``)."""
    xs, out = _t(M, K), _t(M, N)
    w = _t(E, K, N).transpose(1, 2) if dx else _t(E, N, K)
    return Launch(label, dict(
        x_ptr=xs, w_ptr=w, offsets_ptr=_t(E, dtype=I32), out_ptr=out, M=M, N=N, K=K, E=E,
        **_strides("stride_xm stride_xk", xs), **_strides("stride_we stride_wn stride_wk", w),
        **_strides("stride_om stride_on", out), M_BUCKET=_m_bucket(M),
        BLOCK_E=triton.next_power_of_2(E + 1), DOT_PRECISION="tf32"))


def _grouped_dw(label: str, M: int, E: int, N: int, K: int) -> Launch:
    xs, dy, dw = _t(M, K), _t(M, N), _t(E, N, K)
    return Launch(label, dict(
        x_ptr=xs, dy_ptr=dy, offsets_ptr=_t(E, dtype=I32), dw_ptr=dw, M=M, N=N, K=K, E=E,
        **_strides("stride_xm stride_xk", xs), **_strides("stride_dym stride_dyn", dy),
        **_strides("stride_dwe stride_dwn stride_dwk", dw), BLOCK_E=triton.next_power_of_2(E + 1),
        DOT_PRECISION="tf32", COMPENSATED=False))


def _deepgemm_grouped(build, rows_per_group: Callable[[int], bool]) -> list[Launch]:
    return [build(f"{label} n{n} k{k}", g * m, g, n, k) for label, g, m, n, k in DEEPGEMM_GROUPED
            if rows_per_group(m)]


def _v3_moe(build, T: int) -> list[Launch]:
    """The V3 expert GEMMs of T tokens, all E experts on one GPU: up/gate (N = 2I, K = D), down."""
    return [build(f"V3 T={T} up n{2 * I} k{D}", T * TOPK, E, 2 * I, D),
            build(f"V3 T={T} down n{D} k{I}", T * TOPK, E, D, I)]


# ---------------------------------------------------------------------------- grouped GEMM, Hopper-native (TMA)
_SMS = 132  # H100/H200: the persistent grids' size (kernels._common.num_sms)


def _grouped_tma(label: str, M: int, E: int, N: int, K: int, dx: bool = False) -> Launch:
    """``kernels.grouped_gemm_tma``'s forward (dX: w[e] stored (K, N), the forward's w as it is)."""
    xs, out = _t(M, K), _t(M, N)
    w = _t(E, K, N) if dx else _t(E, N, K)
    return Launch(label, dict(
        x_ptr=xs, w_ptr=w, offsets_ptr=_t(E, dtype=I32), table_ptr=_t(7, E + 1, dtype=I32), out_ptr=out,
        M=M, N=N, K=K, E=E, stride_xm=xs.stride(0), stride_we=w.stride(0), stride_wr=w.stride(1),
        stride_om=out.stride(0), M_BUCKET=_m_bucket(M), W_KN=dx, BLOCK_E=triton.next_power_of_2(E + 1),
        NUM_SMS=_SMS))


def _grouped_dw_tma(label: str, M: int, E: int, N: int, K: int) -> Launch:
    xs, dy, dw = _t(M, K), _t(M, N), _t(E, N, K)
    return Launch(label, dict(
        x_ptr=xs, dy_ptr=dy, table_ptr=_t(7, E + 1, dtype=I32), dw_ptr=dw, M=M, N=N, K=K, E=E,
        stride_xm=xs.stride(0), stride_dym=dy.stride(0), stride_dwe=dw.stride(0), stride_dwn=dw.stride(1),
        NUM_SMS=_SMS))


def _masked(label: str, E: int, max_m: int, N: int, K: int, tma: bool = True, dtype: torch.dtype = BF16) -> Launch:
    """``kernels.grouped_gemm_masked``: x (E, max_m, K), w (E, N, K), out (E, max_m, N)."""
    x, w, out = _t(E, max_m, K, dtype=dtype), _t(E, N, K, dtype=dtype), _t(E, max_m, N, dtype=dtype)
    common = dict(x_ptr=x, w_ptr=w, masked_m_ptr=_t(E, dtype=I32), out_ptr=out, E=E, MAX_M=max_m, N=N, K=K,
                  M_BUCKET=_m_bucket(max_m))
    if tma:
        return Launch(label, dict(common, stride_xe=x.stride(0), stride_xm=x.stride(1), stride_we=w.stride(0),
                                  stride_wn=w.stride(1), stride_oe=out.stride(0), stride_om=out.stride(1),
                                  NUM_SMS=_SMS))
    return Launch(label, dict(common, **_strides("stride_xe stride_xm stride_xk", x),
                              **_strides("stride_we stride_wn stride_wk", w),
                              **_strides("stride_oe stride_om stride_on", out),
                              DOT_PRECISION="ieee" if dtype == F32 else "tf32"))


def _masked_sets(tma: bool) -> list[Launch]:
    """DeepGEMM's masked 4 × 256 (N=7168, K=2048), and one rank's 32 experts of V3 decode at 8-way
    expert parallelism in DeepEP's low-latency layout (max_m = 8 ranks × DECODE_T tokens)."""
    local, max_m = E // 8, 8 * DECODE_T
    out = [_masked("deepgemm masked 4x256 n7168 k2048", 4, 256, 7168, 2048, tma),
           _masked(f"V3 EP8 decode T={DECODE_T} up n{2 * I} k{D}", local, max_m, 2 * I, D, tma),
           _masked(f"V3 EP8 decode T={DECODE_T} down n{D} k{I}", local, max_m, D, I, tma)]
    return out if tma else out + [_masked("float32 4x256 n7168 k2048", 4, 256, 7168, 2048, False, F32)]


def _schedule(E: int, M: int) -> Launch:
    return Launch(f"E={E} M={M}", dict(offsets_ptr=_t(E, dtype=I32), table_ptr=_t(7, E + 1, dtype=I32), M=M, E=E,
                                       BLOCK_E=triton.next_power_of_2(E + 1)))


# ---------------------------------------------------------------------------- FP8 GEMMs
def _fp8_gemm(label: str, M: int, N: int, K: int) -> Launch:
    a, a_s, b, b_s, c = _t(M, K, dtype=E4M3), _col_major(M, K // B), _t(N, K, dtype=E4M3), \
        _t(triton.cdiv(N, B), K // B, dtype=F32), _t(M, N)
    return Launch(label, dict(
        a_ptr=a, as_ptr=a_s, b_ptr=b, bs_ptr=b_s, c_ptr=c, bias_ptr=a_s, M=M, N=N, K=K,
        **_strides("stride_am stride_ak", a), **_strides("stride_asm stride_ask", a_s),
        **_strides("stride_bn stride_bk", b), **_strides("stride_bsn stride_bsk", b_s),
        **_strides("stride_cm stride_cn", c), SCALE_BLOCK=B, HAS_BIAS=False))


def _deepgemm_dense(m: int) -> list[Launch]:
    return [_fp8_gemm(f"{m}x{n}x{k}", m, n, k) for n, k in DEEPGEMM_DENSE["nk"]]


def _fp8_grouped(label: str, M: int, E: int, N: int, K: int) -> Launch:
    x, x_s, w, w_s, c = _t(M, K, dtype=E4M3), _t(M, K // B, dtype=F32), _t(E, N, K, dtype=E4M3), \
        _t(E, triton.cdiv(N, B), K // B, dtype=F32), _t(M, N)
    return Launch(label, dict(
        x_ptr=x, xs_ptr=x_s, w_ptr=w, ws_ptr=w_s, offsets_ptr=_t(E, dtype=I32), c_ptr=c, M=M, N=N, K=K, E=E,
        **_strides("stride_xm stride_xk", x), **_strides("stride_xsm stride_xsk", x_s),
        **_strides("stride_we stride_wn stride_wk", w), **_strides("stride_wse stride_wsn stride_wsk", w_s),
        **_strides("stride_cm stride_cn", c), M_BUCKET=_m_bucket(M), SCALE_BLOCK=B,
        BLOCK_E=triton.next_power_of_2(E + 1)))


_SPLIT_K_WS, _SPLIT_K_COUNTERS = 2**22, 2**12  # kernels.fp8_gemm.split_k_buffers: powers of two, the decode need


def _fp8_gemm_tma(label: str, M: int, N: int, K: int) -> Launch:
    """The Hopper kernel, with the split-K workspace (float32) and tile counters (int32) its launcher passes."""
    a, a_s, b, b_s, c = _t(M, K, dtype=E4M3), _col_major(M, K // B), _t(N, K, dtype=E4M3), \
        _t(triton.cdiv(N, B), K // B, dtype=F32), _t(M, N)
    return Launch(label, dict(
        a_ptr=a, as_ptr=a_s, b_ptr=b, bs_ptr=b_s, c_ptr=c, bias_ptr=a_s, ws_ptr=_t(_SPLIT_K_WS, dtype=F32),
        counters_ptr=_t(_SPLIT_K_COUNTERS, dtype=I32), M=M, N=N, K=K, stride_am=K,
        **_strides("stride_asm stride_ask", a_s), stride_bn=K, **_strides("stride_bsn stride_bsk", b_s),
        **_strides("stride_cm stride_cn", c), M_BUCKET=_m_bucket(M), ws_size=_SPLIT_K_WS,
        counters_size=_SPLIT_K_COUNTERS, SCALE_BLOCK=B, HAS_BIAS=False, SCALE_TMA=True))


def _deepgemm_dense_tma(m: int) -> list[Launch]:
    return [_fp8_gemm_tma(f"{m}x{n}x{k}", m, n, k) for n, k in DEEPGEMM_DENSE["nk"]]


def _decode_dense_tma() -> list[Launch]:
    """DeepGEMM's dense grid at M = 64 (its 64x2112x7168 first: the representative launch), and at
    M = 1 and 16: the small class's split-K configs."""
    return [*_deepgemm_dense_tma(64), *(_fp8_gemm_tma(f"{m}x{n}x{k}", m, n, k)
                                       for m in (1, 16) for n, k in DEEPGEMM_DENSE["nk"])]


def _fp8_grouped_tma(label: str, M: int, E: int, N: int, K: int) -> Launch:
    x, x_s, w_s, c = _t(M, K, dtype=E4M3), _col_major(M, K // B), _t(E, triton.cdiv(N, B), K // B, dtype=F32), _t(M, N)
    return Launch(label, dict(
        x_ptr=x, xs_ptr=x_s, w_ptr=_t(E * N, K, dtype=E4M3), ws_ptr=w_s, offsets_ptr=_t(E, dtype=I32), c_ptr=c,
        M=M, N=N, K=K, E=E, stride_xm=K, **_strides("stride_xsm stride_xsk", x_s), stride_wn=K,
        **_strides("stride_wse stride_wsn stride_wsk", w_s), **_strides("stride_cm stride_cn", c),
        M_BUCKET=_m_bucket(M), SCALE_BLOCK=B, E_CHUNK=min(triton.next_power_of_2(E + 1), 16), SCALE_TMA=True))


def _fp8_masked(label: str, E: int, max_m: int, N: int, K: int, tma: bool) -> Launch:
    """The masked layout: x (E, max_m, K), scales (E, max_m, K/B) (column-major per expert on the
    Hopper kernel: its warp-specialised configs read them through descriptors), out (E, max_m, N)."""
    x_s = _t(E, K // B, max_m, dtype=F32).transpose(1, 2) if tma else _t(E, max_m, K // B, dtype=F32)
    x, w, w_s, c = _t(E, max_m, K, dtype=E4M3), _t(E, N, K, dtype=E4M3), \
        _t(E, triton.cdiv(N, B), K // B, dtype=F32), _t(E, max_m, N)
    common = dict(xs_ptr=x_s, ws_ptr=w_s, masked_m_ptr=_t(E, dtype=I32), c_ptr=c, E=E, MAX_M=max_m, N=N, K=K,
                  **_strides("stride_xse stride_xsm stride_xsk", x_s),
                  **_strides("stride_wse stride_wsn stride_wsk", w_s), **_strides("stride_ce stride_cm stride_cn", c),
                  SCALE_BLOCK=B)
    if tma:
        return Launch(label, dict(x_ptr=x, w_ptr=w, stride_xm=K, stride_wn=K, SCALE_TMA=True, **common))
    return Launch(label, dict(x_ptr=x, w_ptr=w, **_strides("stride_xe stride_xm stride_xk", x),
                              **_strides("stride_we stride_wn stride_wk", w), **common))


def _masked_problems(tma: bool, cls: str) -> list[Launch]:
    """By max_m class: a V3 decode rank (32 experts, 64-row buffers), DeepGEMM's masked 4 × 256
    (N 7168, K 2048), 4 buffers of 1024 rows (a prefill-sized dispatch)."""
    if cls == "small":
        return [_fp8_masked(f"V3 decode E=32 max_m=64 {lbl}", 32, 64, n, k, tma)
                for lbl, n, k in ((f"up n{2 * I} k{D}", 2 * I, D), (f"down n{D} k{I}", D, I))]
    if cls == "medium":
        return [_fp8_masked(f"{label} n={n} k={k}", groups, rows, n, k, tma)
                for label, groups, rows, n, k in DEEPGEMM_GROUPED if label.startswith("masked")]
    return [_fp8_masked(f"E=4 max_m=1024 n{2 * I} k{D}", 4, 1024, 2 * I, D, tma)]


# ---------------------------------------------------------------------------- MLA decode
def _mla_plan(batch: int, heads: int, q_tokens: int, cache_len: int, fp8: bool, dtype: torch.dtype = BF16):
    """(config choice, head tiles, parts) as the launcher computes them for an H100/H200 (132 SMs)."""
    from moela.kernels.mla_decode import config_for, num_parts_for

    choice = config_for(q_tokens * heads, dtype, fp8)
    tiles = triton.cdiv(q_tokens * heads, choice.block_h)
    return choice, tiles, num_parts_for(batch, tiles, cache_len, 132, choice.ctas_per_sm)


def _mla_cache(batch: int, cache_len: int, fp8: bool, paged: bool, dtype: torch.dtype = BF16):
    """(kv, values, scales, rope, block_table) as the launcher passes them (FP8: FlashMLA's 656-byte rows)."""
    from moela.kernels.mla_decode import PAGE_ALIGN

    dk, dv = FLASHMLA_DECODE["head_dim"], FLASHMLA_DECODE["v_dim"]
    width = dv + 4 * (dv // B) + 2 * (dk - dv) if fp8 else dk
    shape = (batch * cache_len // PAGE_ALIGN, PAGE_ALIGN, width) if paged else (batch, cache_len, width)
    kv = _t(*shape, dtype=E4M3 if fp8 else dtype)
    if fp8:
        raw, nb = kv.view(torch.uint8), dv // B
        values, scales, rope = kv[..., :dv], raw[..., dv:dv + 4 * nb].view(F32), raw[..., dv + 4 * nb:].view(BF16)
    else:
        values, scales, rope = kv, kv, kv[..., dv:]
    table = _t(batch, cache_len // PAGE_ALIGN, dtype=I32) if paged else None
    return kv, values, scales, rope, table


def _mla_decode(batch: int, heads: int, q_tokens: int, cache_len: int, fp8: bool = False, paged: bool = False,
                seqlens: bool = True, lse: bool = False, fp32: bool = False) -> Launch:
    dk, dv = FLASHMLA_DECODE["head_dim"], FLASHMLA_DECODE["v_dim"]
    choice, tiles, parts = _mla_plan(batch, heads, q_tokens, cache_len, fp8, F32 if fp32 else BF16)
    R = q_tokens * heads
    dtype = F32 if fp32 else BF16
    q, out = _t(batch, q_tokens, heads, dk, dtype=dtype), _t(batch, q_tokens, heads, dv, dtype=dtype)
    kv, values, scales, rope, table = _mla_cache(batch, cache_len, fp8, paged, dtype)
    slots = batch + parts - 1
    sched = _t(3 * slots + 2 * batch, dtype=I32)
    lse_t = _t(batch, q_tokens, heads, dtype=F32) if lse else None
    label = (f"B={batch} S={q_tokens} H={heads} L={cache_len}{' fp8' if fp8 else ''}{' fp32' if fp32 else ''}"
             f"{' paged' if paged else ''}{' seqlens' if seqlens else ''}{' lse' if lse else ''} parts={parts}")
    return Launch(label, dict(
        q_ptr=q, kv_ptr=values, kvs_ptr=scales, kvr_ptr=rope, bt_ptr=table if paged else sched,
        seqlens_ptr=_t(batch, dtype=I32) if seqlens else q, sched_ptr=sched, out_ptr=out,
        lse_ptr=lse_t if lse else _t(slots, R, dtype=F32),
        part_o_ptr=_t(slots, R, dv, dtype=F32), part_lse_ptr=_t(slots, R, dtype=F32),
        B=batch, H=heads, S=q_tokens, L=cache_len, V_DIM=dv, DR=dk - dv, num_pages=kv.shape[0], page_size=kv.shape[1],
        num_slots=slots, scale_log2=dk ** -0.5 * 1.4426950408889634,
        **_strides("stride_qb stride_qs stride_qh stride_qd", q),
        **_strides("stride_kp stride_kl stride_kd", values), **_strides("stride_sp stride_sl", scales[..., 0]),
        **_strides("stride_rp stride_rl stride_rd", rope), stride_btb=table.stride(0) if paged else 0,
        **_strides("stride_ob stride_os stride_oh stride_od", out),
        **(_strides("stride_lb stride_ls stride_lh", lse_t) if lse else dict(stride_lb=0, stride_ls=0, stride_lh=0)),
        BLOCK_H=choice.block_h, BLOCK_N=choice.block_n, BLOCK_DV=dv, BLOCK_DR=triton.next_power_of_2(dk - dv),
        SCALE_BLOCK=B, HAS_ROPE=True, HAS_SEQLENS=seqlens, PAGED=paged, FP8=fp8, WRITE_LSE=lse,
        DOT_PRECISION="tf32" if fp32 else "ieee"), dict(num_warps=choice.num_warps, num_stages=choice.num_stages))


def _mla_schedule(batch: int, heads: int, q_tokens: int, cache_len: int) -> Launch:
    _, _, parts = _mla_plan(batch, heads, q_tokens, cache_len, False)
    slots = batch + parts - 1
    return Launch(f"B={batch} S={q_tokens} H={heads} L={cache_len} parts={parts}", dict(
        seqlens_ptr=_t(batch, dtype=I32), sched_ptr=_t(3 * slots + 2 * batch, dtype=I32), B=batch, L=cache_len,
        num_parts=parts, num_slots=slots, HAS_SEQLENS=True, BLOCK_S=64, OVERHEAD=2,
        BLOCK_B=min(64, triton.next_power_of_2(batch)), BLOCK_SLOT=min(128, triton.next_power_of_2(slots))),
        dict(num_warps=4))


def _mla_combine(batch: int, heads: int, q_tokens: int, cache_len: int, lse: bool = False) -> Launch:
    dv = FLASHMLA_DECODE["v_dim"]
    _, _, parts = _mla_plan(batch, heads, q_tokens, cache_len, False)
    R = q_tokens * heads
    out, lse_t = _t(batch, q_tokens, heads, dv), _t(batch, q_tokens, heads, dtype=F32)
    slots = batch + parts - 1
    return Launch(f"B={batch} S={q_tokens} H={heads} L={cache_len}{' lse' if lse else ''} parts={parts}", dict(
        sched_ptr=_t(3 * slots + 2 * batch, dtype=I32), part_o_ptr=_t(slots, R, dv, dtype=F32),
        part_lse_ptr=_t(slots, R, dtype=F32), out_ptr=out, lse_ptr=lse_t, B=batch, H=heads, S=q_tokens, V_DIM=dv,
        num_slots=slots,
        **_strides("stride_ob stride_os stride_oh stride_od", out),
        **(_strides("stride_lb stride_ls stride_lh", lse_t) if lse else dict(stride_lb=0, stride_ls=0, stride_lh=0)),
        BLOCK_R=16, BLOCK_DV=dv, WRITE_LSE=lse), dict(num_warps=4))


def _flashmla_grid() -> list[Launch]:
    """One launch per distinct compile at FlashMLA's shapes (B=128, L=8192): the representative
    one first (V3's 128 heads, the 64-row config), then every config of ``CONFIGS`` at S = 1 and
    2 (Triton specialises S == 1), the paged, lse and no-cache_seqlens variants. Other heads and
    lengths compile the same kernels (ints divisible by 16 specialise alike)."""
    b, (l0, l1) = FLASHMLA_DECODE["batch"], FLASHMLA_DECODE["cache_len"]
    return [
        _mla_decode(b, 128, 1, l1),
        *[_mla_decode(b, h, s, l1) for h, s in ((16, 1), (32, 1), (16, 2), (32, 2))],
        *[_mla_decode(b, h, s, l1, fp8=True) for h, s in ((16, 1), (16, 2), (128, 1))],
        *[_mla_decode(b, h, 1, l1, fp8=fp8, paged=True) for h, fp8 in ((16, False), (128, False), (16, True))],
        _mla_decode(b, 16, 1, l0, seqlens=False, lse=True), _mla_decode(16, 128, 1, l0, lse=True),
        _mla_decode(b, 16, 1, l1, fp32=True),
    ]


# ---------------------------------------------------------------------------- FP8 quantization
def _quant_act(label: str, R: int, K: int, col_major: bool = False, ue8m0: bool = False) -> Launch:
    x, q = _t(R, K), _t(R, K, dtype=E4M3)
    s = _col_major(R, K // B) if col_major else _t(R, K // B, dtype=F32)
    return Launch(label, dict(
        x_ptr=x, q_ptr=q, s_ptr=s, R=R, K=K, num_kb=K // B, **_strides("stride_xr stride_xk", x),
        **_strides("stride_qr stride_qk", q), **_strides("stride_sr stride_sk", s),
        BLOCK=B, BLOCK_P2=B, UE8M0=ue8m0))


def _quant_weight(label: str, L: int, N: int, K: int) -> Launch:
    w, q, s = _t(L, N, K), _t(L, N, K, dtype=E4M3), _t(L, triton.cdiv(N, B), triton.cdiv(K, B), dtype=F32)
    return Launch(label, dict(
        w_ptr=w, q_ptr=q, s_ptr=s, N=N, K=K, **_strides("stride_wl stride_wn stride_wk", w),
        **_strides("stride_ql stride_qn stride_qk", q), **_strides("stride_sl stride_sn stride_sk", s),
        BLOCK=B, BLOCK_P2=B, UE8M0=False), dict(num_warps=8))


def _dequant(label: str, N: int, K: int, weight: bool) -> Launch:
    """A weight (N, K) with B×B scales, or activations (N rows) with 1×B scales; bf16 out."""
    q, o = _t(1, N, K, dtype=E4M3), _t(1, N, K)
    s = _t(1, triton.cdiv(N, B) if weight else N, triton.cdiv(K, B), dtype=F32)
    return Launch(label, dict(
        q_ptr=q, s_ptr=s, o_ptr=o, N=N, K=K, **_strides("stride_ql stride_qn stride_qk", q),
        **_strides("stride_sl stride_sn stride_sk", s), **_strides("stride_ol stride_on stride_ok", o),
        DIV_N=B if weight else 1, DIV_K=B, BLOCK_N=64, BLOCK_K=128), dict(num_warps=4))


# ---------------------------------------------------------------------------- routing
def _route(label: str, T: int, args, bias: bool) -> Launch:
    E, G = args.n_routed_experts, args.n_expert_groups
    e_p = triton.next_power_of_2(E)
    ws = min(e_p, 32)
    logits, k = _t(T, E, dtype=F32), args.n_activated_experts
    return Launch(label, dict(
        logits_ptr=logits, bias_ptr=_t(E, dtype=F32) if bias else logits, weights_ptr=_t(T, k, dtype=F32),
        ids_ptr=_t(T, k, dtype=I32), T=T, E=E, N_GROUPS=G, EG=E // G,
        TOPK_GROUPS=args.n_limited_groups, stride_t=E,
        route_scale_bits=struct.unpack("<q", struct.pack("<d", float(args.route_scale)))[0],
        T_CLASS=0 if T <= 256 else 1 if T <= 4096 else 2, TOPK=k, K_P=triton.next_power_of_2(k),
        GP=triton.next_power_of_2(G), EGP=triton.next_power_of_2(E // G), WS=ws, ITERS=e_p // ws,
        LOG_WS=ws.bit_length() - 1,
        SOFTMAX=args.score_func == "softmax", HAS_BIAS=bias, HAS_GROUPS=G > 1, IS_F64=False, PRECISE=True),
        dict(enable_fp_fusion=False, enable_reflect_ftz=False))


def _plan_pad(align: int) -> dict[str, Any]:
    return dict(PAD_P=triton.next_power_of_2(max(align - 1, 1)), HAS_PAD=align > 1, BLOCK_TAIL=1024)


def _routing_small(T: int, align: int = 1) -> Launch:
    N = T * TOPK
    M = N + min(E, N) * (align - 1)
    return Launch(f"T={T} E={E} k={TOPK} align={align}", dict(
        ids_ptr=_t(T, TOPK, dtype=I32), counts_ptr=_t(E, dtype=I32), offsets_ptr=_t(E, dtype=I32),
        slot_to_row_ptr=_t(T, TOPK, dtype=I32), row_to_token_ptr=_t(M, dtype=I32), row_to_slot_ptr=_t(M, dtype=I32),
        N=N, K=TOPK, E=E, M=M, align=align, TAIL=triton.cdiv(M, E), BLOCK_N=triton.next_power_of_2(N),
        E_P=triton.next_power_of_2(E), **_plan_pad(align)))


_SORT_BLOCK = 1024  # kernels.routing.SORT_BLOCK: the three-launch schedule's block


def _routing_large(kernel: str, T: int, align: int = 1) -> Launch:
    N = T * TOPK
    M, NB, e_p = N + min(E, N) * (align - 1), triton.cdiv(N, _SORT_BLOCK), triton.next_power_of_2(E)
    i32 = lambda *s: _t(*s, dtype=I32)
    label = f"T={T} E={E} k={TOPK} align={align}"
    if kernel == "sort":
        return Launch(label, dict(ids_ptr=i32(T, TOPK), keys_ptr=i32(NB * _SORT_BLOCK), blk_counts_ptr=i32(NB, e_p),
                                  N=N, E=E, BLOCK_N=_SORT_BLOCK, E_P=e_p))
    if kernel == "scan":
        return Launch(label, dict(blk_counts_ptr=i32(NB, e_p), adj_ptr=i32(NB, e_p), counts_ptr=i32(E),
                                  offsets_ptr=i32(E), NB=NB, E=E, align=align,
                                  BLOCK_B=max(1, min(triton.next_power_of_2(NB), 8192 // e_p)), E_P=e_p))
    return Launch(label, dict(
        keys_ptr=i32(NB * _SORT_BLOCK), adj_ptr=i32(NB, e_p), counts_ptr=i32(E), offsets_ptr=i32(E),
        slot_to_row_ptr=i32(T, TOPK), row_to_token_ptr=i32(M), row_to_slot_ptr=i32(M), N=N, K=TOPK, E=E, M=M,
        align=align, NB=NB, TAIL=triton.cdiv(M, NB), BLOCK_N=_SORT_BLOCK, E_P=e_p, **_plan_pad(align)))


# ---------------------------------------------------------------------------- permute / unpermute
_PAD_ROWS = 32  # kernels.permute.PAD_ROWS


def _scatter_rows(T: int, weighted: bool = False) -> Launch:
    M = T * TOPK
    x, out = _t(T, D), _t(M, D)
    return Launch(f"T={T} D={D} k={TOPK}{' weighted' if weighted else ''}", dict(
        x_ptr=x, w_ptr=_t(T, TOPK, dtype=F32) if weighted else x, slot_to_row_ptr=_t(T, TOPK, dtype=I32),
        row_to_slot_ptr=_t(M, dtype=I32), out_ptr=out, T=T, D=D, M=M, stride_x=D, stride_o=D, K=TOPK,
        K_P=triton.next_power_of_2(TOPK), HAS_W=weighted, IS_F64=False, BLOCK_R=_PAD_ROWS,
        PAD_BLOCK_D=2048 // x.element_size()), _NO_FMA)


def _scatter_rows_fp8(T: int) -> Launch:
    M, num_kb = T * TOPK, triton.cdiv(D, B)
    return Launch(f"T={T} D={D} k={TOPK}", dict(
        x_ptr=_t(T, D), slot_to_row_ptr=_t(T, TOPK, dtype=I32), row_to_slot_ptr=_t(M, dtype=I32),
        q_ptr=_t(M, D, dtype=E4M3), s_ptr=_t(M, num_kb, dtype=F32), T=T, D=D, M=M, num_kb=num_kb, stride_x=D,
        stride_q=D, stride_s=num_kb, K=TOPK, K_P=triton.next_power_of_2(TOPK), QBLOCK=B, QBLOCK_P2=B,
        UE8M0=False, BLOCK_R=_PAD_ROWS, PAD_BLOCK_D=1024, PAD_BLOCK_S=64))


def _combine(T: int) -> Launch:
    M = T * TOPK
    return Launch(f"T={T} D={D} k={TOPK}", dict(
        ys_ptr=_t(M, D), w_ptr=_t(T, TOPK, dtype=F32), slot_to_row_ptr=_t(T, TOPK, dtype=I32), out_ptr=_t(T, D),
        D=D, M=M, stride_y=D, stride_o=D, K=TOPK, HAS_W=True, IS_F64=False), _NO_FMA)


def _combine_bwd(T: int) -> Launch:
    M = T * TOPK
    return Launch(f"T={T} D={D} k={TOPK}", dict(
        dy_ptr=_t(T, D), ys_ptr=_t(M, D), w_ptr=_t(T, TOPK, dtype=F32), slot_to_row_ptr=_t(T, TOPK, dtype=I32),
        row_to_slot_ptr=_t(M, dtype=I32), dys_ptr=_t(M, D), dw_ptr=_t(T, TOPK, dtype=F32), T=T, D=D, M=M,
        stride_dy=D, stride_y=D, stride_dys=D, K=TOPK, K_P=triton.next_power_of_2(TOPK), IS_F64=False,
        BLOCK_R=_PAD_ROWS, PAD_BLOCK_D=1024), _NO_FMA)


# ---------------------------------------------------------------------------- SwiGLU
def _halves(M: int) -> tuple[torch.Tensor, torch.Tensor]:
    """gate and up: the two column halves of the up/gate GEMM's (M, 2I) output (strided views)."""
    h = _t(M, 2 * I)
    return h[:, :I], h[:, I:]


def _swiglu(kernel: str, M: int) -> Launch:
    g, u = _halves(M)
    label = f"M={M} N={I} (halves of one GEMM output)"
    if kernel == "fwd":
        out = _t(M, I)
        return Launch(label, dict(
            g_ptr=g, u_ptr=u, out_ptr=out, M=M, N=I, **_strides("stride_gm stride_gn", g),
            **_strides("stride_um stride_un", u), **_strides("stride_om stride_on", out), M_BUCKET=_m_bucket(M),
            PRECISE=True), _NO_FMA)
    if kernel == "bwd":
        dy = _t(M, I)
        return Launch(label, dict(
            g_ptr=g, u_ptr=u, dy_ptr=dy, dg_ptr=_t(M, I), du_ptr=_t(M, I), M=M, N=I,
            **_strides("stride_gm stride_gn", g), **_strides("stride_um stride_un", u),
            **_strides("stride_dym stride_dyn", dy), stride_dgm=I, stride_dum=I, M_BUCKET=_m_bucket(M),
            PRECISE=True), _NO_FMA)
    s = _t(M, I // B, dtype=F32)
    return Launch(label, dict(
        g_ptr=g, u_ptr=u, q_ptr=_t(M, I, dtype=E4M3), s_ptr=s, M=M, N=I, num_kb=I // B,
        **_strides("stride_gm stride_gn", g), **_strides("stride_um stride_un", u), stride_qm=I,
        **_strides("stride_sm stride_sk", s), M_BUCKET=_m_bucket(M), PRECISE=True, BLOCK=B, BLOCK_P2=B,
        UE8M0=False), _NO_FMA)


# ---------------------------------------------------------------------------- FP8 training
TRAIN_T = 4096  # tokens of a training micro-batch per GPU


def _fp8_dgrad(label: str, M: int, N: int, K: int) -> Launch:
    """dx (M, K) = dy (M, N) · w (N, K), w with N contiguous (strides (1, N): what the launcher passes)."""
    dy, dy_s, dx = _t(M, N, dtype=E4M3), _t(M, triton.cdiv(N, B), dtype=F32), _t(M, K)
    w = _t(K, N, dtype=E4M3).t()
    w_s = _t(triton.cdiv(N, B), triton.cdiv(K, B), dtype=F32)
    return Launch(label, dict(
        dy_ptr=dy, dys_ptr=dy_s, w_ptr=w, ws_ptr=w_s, dx_ptr=dx, M=M, N=N, K=K,
        **_strides("stride_dym stride_dyn", dy), **_strides("stride_dysm stride_dysn", dy_s),
        **_strides("stride_wn stride_wk", w), **_strides("stride_wsn stride_wsk", w_s),
        **_strides("stride_dxm stride_dxk", dx), SCALE_BLOCK=B, EVEN_N=N % B == 0))


def _fp8_dgrad_dense(m: int) -> list[Launch]:
    """DeepGEMM's dense (n, k) as forward shapes: the dgrad reduces over n."""
    return [_fp8_dgrad(f"{m}x{n}x{k}", m, n, k) for n, k in DEEPGEMM_DENSE["nk"]]


def _fp8_grouped_dgrad(label: str, M: int, E: int, N: int, K: int) -> Launch:
    dy, dy_s, dx = _t(M, N, dtype=E4M3), _t(M, triton.cdiv(N, B), dtype=F32), _t(M, K)
    w = _t(E, K, N, dtype=E4M3).transpose(1, 2)  # N contiguous, as the launcher passes it
    w_s = _t(E, triton.cdiv(N, B), triton.cdiv(K, B), dtype=F32)
    return Launch(label, dict(
        dy_ptr=dy, dys_ptr=dy_s, w_ptr=w, ws_ptr=w_s, offsets_ptr=_t(E, dtype=I32), dx_ptr=dx, M=M, N=N, K=K, E=E,
        **_strides("stride_dym stride_dyn", dy), **_strides("stride_dysm stride_dysn", dy_s),
        **_strides("stride_we stride_wn stride_wk", w), **_strides("stride_wse stride_wsn stride_wsk", w_s),
        **_strides("stride_dxm stride_dxk", dx), M_BUCKET=_m_bucket(M), SCALE_BLOCK=B, EVEN_N=N % B == 0,
        BLOCK_E=triton.next_power_of_2(E + 1)))


def _wgrad_operands(M: int, N: int, K: int):
    a, a_s = _t(N, M, dtype=E4M3), _t(N, triton.cdiv(M, B), dtype=F32)
    b, b_s = _t(K, M, dtype=E4M3), _t(K, triton.cdiv(M, B), dtype=F32)
    return dict(a_ptr=a, as_ptr=a_s, b_ptr=b, bs_ptr=b_s, **_strides("stride_an stride_am", a),
                **_strides("stride_asn stride_asm", a_s), **_strides("stride_bk stride_bm", b),
                **_strides("stride_bsk stride_bsm", b_s), M_BUCKET=_m_bucket(M), SCALE_BLOCK=B)


def _fp8_wgrad(label: str, M: int, N: int, K: int) -> Launch:
    c = _t(N, K, dtype=F32)
    return Launch(label, dict(**_wgrad_operands(M, N, K), c_ptr=c, N=N, K=K, M=M,
                              **_strides("stride_cn stride_ck", c), EVEN_M=M % B == 0))


def _fp8_wgrad_tma(label: str, M: int, N: int, K: int) -> Launch:
    """The Hopper kernel: operands and scales through descriptors, the scales as
    ``kernels.fp8_wgrad.tma_scales`` hands them over: dy_t_s as its (Mb, N) transpose, x_t_s (K, Mb)
    with rows padded to 16 bytes."""
    mb = triton.cdiv(M, B)
    a_s = _t(mb, triton.cdiv(N, 4) * 4, dtype=F32)[:, :N]
    b_s = _t(K, triton.cdiv(mb, 4) * 4, dtype=F32)[:, :mb]
    c = _t(N, K, dtype=F32)
    return Launch(label, dict(
        a_ptr=_t(N, M, dtype=E4M3), as_ptr=a_s, b_ptr=_t(K, M, dtype=E4M3), bs_ptr=b_s, c_ptr=c, N=N, K=K, M=M,
        stride_an=M, stride_asm=a_s.stride(0), stride_bk=M, stride_bsk=b_s.stride(0),
        **_strides("stride_cn stride_ck", c), M_BUCKET=_m_bucket(M), SCALE_BLOCK=B))


def _fp8_wgrad_tma_problems() -> list[Launch]:
    """DeepGEMM's dense (n, k) as weights at a training micro-batch (its 2112x7168 first: the
    representative launch), V3's 7168x2048 and 4096x7168 weights at 8192 tokens, and a partial last
    token block (Mb = 33)."""
    return [*(_fp8_wgrad_tma(f"{TRAIN_T}x{n}x{k}", TRAIN_T, n, k) for n, k in DEEPGEMM_DENSE["nk"]),
            *(_fp8_wgrad_tma(f"{2 * TRAIN_T}x{n}x{k}", 2 * TRAIN_T, n, k) for n, k in ((D, I), (2 * I, D))),
            _fp8_wgrad_tma(f"{TRAIN_T + 16}x2112x7168 partial last block", TRAIN_T + 16, 2112, 7168)]


def _fp8_grouped_wgrad(label: str, M: int, E: int, N: int, K: int) -> Launch:
    c = _t(E, N, K, dtype=F32)
    return Launch(label, dict(**_wgrad_operands(M, N, K), offsets_ptr=_t(E, dtype=I32), c_ptr=c, N=N, K=K, M=M, E=E,
                              **_strides("stride_ce stride_cn stride_ck", c), BLOCK_E=triton.next_power_of_2(E + 1)))


def _fp8_grouped_wgrad_tma(label: str, M: int, E: int, N: int, K: int) -> Launch:
    """The Hopper kernel: operands and scales through descriptors, the scales as
    ``kernels.fp8_wgrad.tma_scales`` hands them over (``_fp8_wgrad_tma``)."""
    mb = triton.cdiv(M, B)
    a_s = _t(mb, triton.cdiv(N, 4) * 4, dtype=F32)[:, :N]
    b_s = _t(K, triton.cdiv(mb, 4) * 4, dtype=F32)[:, :mb]
    c = _t(E, N, K, dtype=F32)
    return Launch(label, dict(
        a_ptr=_t(N, M, dtype=E4M3), as_ptr=a_s, b_ptr=_t(K, M, dtype=E4M3), bs_ptr=b_s, offsets_ptr=_t(E, dtype=I32),
        c_ptr=c, N=N, K=K, M=M, E=E, stride_an=M, stride_asm=a_s.stride(0), stride_bk=M, stride_bsk=b_s.stride(0),
        **_strides("stride_ce stride_cn stride_ck", c), M_BUCKET=_m_bucket(M), SCALE_BLOCK=B,
        BLOCK_E=triton.next_power_of_2(E + 1)))


def _quant_act_t(label: str, M: int, K: int) -> Launch:
    x, q, s = _t(M, K), _t(K, M, dtype=E4M3), _t(K, triton.cdiv(M, B), dtype=F32)
    return Launch(label, dict(
        x_ptr=x, q_ptr=q, s_ptr=s, M=M, K=K, **_strides("stride_xm stride_xk", x),
        **_strides("stride_qk stride_qm", q), **_strides("stride_sk stride_sm", s),
        BLOCK=B, BLOCK_P2=B, UE8M0=False))


def _quant_act_dual(label: str, M: int, K: int) -> Launch:
    x, q, s = _t(M, K), _t(M, K, dtype=E4M3), _t(M, triton.cdiv(K, B), dtype=F32)
    q_t, s_t = _t(K, M, dtype=E4M3), _t(K, triton.cdiv(M, B), dtype=F32)
    return Launch(label, dict(
        x_ptr=x, q_ptr=q, s_ptr=s, qt_ptr=q_t, st_ptr=s_t, M=M, K=K, num_kb=triton.cdiv(K, B),
        **_strides("stride_xm stride_xk", x), **_strides("stride_qm stride_qk", q),
        **_strides("stride_sm stride_sk", s), **_strides("stride_qtk stride_qtm", q_t),
        **_strides("stride_stk stride_stm", s_t), BLOCK=B, BLOCK_P2=B, UE8M0=False), dict(num_warps=8))


def _v3_expert_grads(build, T: int, align: bool = False) -> list[Launch]:
    """The V3 experts' backward GEMMs of T tokens (rows T·k; ``align``: padded per expert to B)."""
    M = T * TOPK + (E * (B - 1) if align else 0)
    return [build(f"V3 T={T} up n{2 * I} k{D}", M, E, 2 * I, D), build(f"V3 T={T} down n{D} k{I}", M, E, D, I)]


# ---------------------------------------------------------------------------- the table
_PREFILL_M, _DECODE_M = PREFILL_T * TOPK, DECODE_T * TOPK

#: target name -> its launches (the first is the representative one).
LAUNCHES: dict[str, Callable[[], list[Launch]]] = {
    "grouped_gemm_fwd/prefill": lambda: [
        *_deepgemm_grouped(_grouped_fwd, lambda m: m > 128),
        _grouped_fwd("dX contiguous 4x8192 n7168 k4096", 4 * 8192, 4, 7168, 4096, dx=True)],
    "grouped_gemm_fwd/medium": lambda: [
        *_v3_moe(_grouped_fwd, PREFILL_T),
        _grouped_fwd(f"dX V3 T={PREFILL_T} n{D} k{2 * I}", _PREFILL_M, E, D, 2 * I, dx=True)],
    "grouped_gemm_fwd/decode": lambda: _v3_moe(_grouped_fwd, DECODE_T),
    "grouped_gemm_dw": lambda: [*_deepgemm_grouped(_grouped_dw, lambda m: True),
                                _grouped_dw(f"V3 T={PREFILL_T} up", _PREFILL_M, E, 2 * I, D)],
    "grouped_gemm_tma/prefill": lambda: [
        *_deepgemm_grouped(_grouped_tma, lambda m: m > 128),
        _grouped_tma("dX contiguous 4x8192 n7168 k4096", 4 * 8192, 4, 7168, 4096, dx=True)],
    "grouped_gemm_tma/medium": lambda: [
        *_v3_moe(_grouped_tma, PREFILL_T),
        _grouped_tma(f"dX V3 T={PREFILL_T} n{D} k{2 * I}", _PREFILL_M, E, D, 2 * I, dx=True)],
    "grouped_gemm_tma/decode": lambda: [
        *_v3_moe(_grouped_tma, DECODE_T),
        _grouped_tma(f"dX V3 T={DECODE_T} n{D} k{2 * I}", _DECODE_M, E, D, 2 * I, dx=True)],
    "grouped_gemm_dw_tma": lambda: [*_deepgemm_grouped(_grouped_dw_tma, lambda m: True),
                                    _grouped_dw_tma(f"V3 T={PREFILL_T} up", _PREFILL_M, E, 2 * I, D)],
    "grouped_gemm_masked_tma": lambda: _masked_sets(tma=True),
    "grouped_gemm_masked": lambda: _masked_sets(tma=False),
    "group_schedule": lambda: [_schedule(E, _PREFILL_M), _schedule(4, 4 * 8192)],
    "fp8_gemm/large": lambda: _deepgemm_dense(4096),
    "fp8_gemm/medium": lambda: _deepgemm_dense(128),
    "fp8_gemm/small": lambda: _deepgemm_dense(64),
    "fp8_grouped_gemm/large": lambda: _deepgemm_grouped(_fp8_grouped, lambda m: m > 512),
    "fp8_grouped_gemm/medium": lambda: [*_deepgemm_grouped(_fp8_grouped, lambda m: 64 < m <= 512),
                                        *_v3_moe(_fp8_grouped, PREFILL_T)],
    "fp8_grouped_gemm/small": lambda: _v3_moe(_fp8_grouped, DECODE_T),
    "fp8_gemm_tma/large": lambda: _deepgemm_dense_tma(4096),
    "fp8_gemm_tma/medium": lambda: _deepgemm_dense_tma(128),
    "fp8_gemm_tma/small": _decode_dense_tma,
    "fp8_grouped_gemm_tma/large": lambda: _deepgemm_grouped(_fp8_grouped_tma, lambda m: m > 512),
    "fp8_grouped_gemm_tma/medium": lambda: [*_deepgemm_grouped(_fp8_grouped_tma, lambda m: 64 < m <= 512),
                                            *_v3_moe(_fp8_grouped_tma, PREFILL_T)],
    "fp8_grouped_gemm_tma/small": lambda: _v3_moe(_fp8_grouped_tma, DECODE_T),
    "fp8_grouped_gemm_masked/large": lambda: _masked_problems(False, "large"),
    "fp8_grouped_gemm_masked/medium": lambda: _masked_problems(False, "medium"),
    "fp8_grouped_gemm_masked/small": lambda: _masked_problems(False, "small"),
    "fp8_grouped_gemm_masked_tma/large": lambda: _masked_problems(True, "large"),
    "fp8_grouped_gemm_masked_tma/medium": lambda: _masked_problems(True, "medium"),
    "fp8_grouped_gemm_masked_tma/small": lambda: _masked_problems(True, "small"),
    "mla_decode_fwd": _flashmla_grid,
    "mla_decode_schedule": lambda: [_mla_schedule(128, 16, 1, 8192), _mla_schedule(1024, 128, 1, 4096)],
    "mla_decode_combine": lambda: [_mla_combine(128, 16, 1, 4096), _mla_combine(16, 128, 2, 8192, lse=True)],
    "quant_act": lambda: [_quant_act(f"R={PREFILL_T} K={D}", PREFILL_T, D),
                          _quant_act(f"R={PREFILL_T} K={D} col-major scales", PREFILL_T, D, col_major=True),
                          _quant_act(f"R={DECODE_T} K={D} ue8m0", DECODE_T, D, ue8m0=True)],
    "quant_weight": lambda: [_quant_weight(f"E={E} N={2 * I} K={D}", E, 2 * I, D),
                             _quant_weight(f"N={D} K={I}", 1, D, I)],
    "dequant": lambda: [_dequant(f"weight N={2 * I} K={D}", 2 * I, D, True),
                        _dequant(f"activations R={PREFILL_T} K={D}", PREFILL_T, D, False)],
    "route_fwd": lambda: [_route(f"V3 T={PREFILL_T}", PREFILL_T, V3, True),
                          _route(f"V3 T={DECODE_T}", DECODE_T, V3, True),
                          _route(f"V2-Lite T={PREFILL_T}", PREFILL_T, V2_LITE, False)],
    "routing_small": lambda: [_routing_small(DECODE_T), _routing_small(DECODE_T, align=B)],
    "routing_sort": lambda: [_routing_large("sort", PREFILL_T)],
    "routing_scan": lambda: [_routing_large("scan", PREFILL_T), _routing_large("scan", PREFILL_T, align=B)],
    "routing_scatter": lambda: [_routing_large("scatter", PREFILL_T), _routing_large("scatter", PREFILL_T, align=B)],
    "scatter_rows": lambda: [_scatter_rows(PREFILL_T), _scatter_rows(PREFILL_T, weighted=True),
                             _scatter_rows(DECODE_T)],
    "scatter_rows_fp8": lambda: [_scatter_rows_fp8(PREFILL_T), _scatter_rows_fp8(DECODE_T)],
    "combine": lambda: [_combine(PREFILL_T), _combine(DECODE_T)],
    "combine_bwd": lambda: [_combine_bwd(PREFILL_T)],
    "swiglu_fwd": lambda: [_swiglu("fwd", _PREFILL_M), _swiglu("fwd", _DECODE_M)],
    "swiglu_bwd": lambda: [_swiglu("bwd", _PREFILL_M)],
    "swiglu_fp8": lambda: [_swiglu("fp8", _PREFILL_M), _swiglu("fp8", _DECODE_M)],
    "fp8_dgrad/large": lambda: _fp8_dgrad_dense(TRAIN_T),
    "fp8_dgrad/medium": lambda: _fp8_dgrad_dense(256),
    "fp8_dgrad/small": lambda: _fp8_dgrad_dense(64),
    "fp8_grouped_dgrad/large": lambda: [*_deepgemm_grouped(_fp8_grouped_dgrad, lambda m: m > 512)],
    "fp8_grouped_dgrad/medium": lambda: [*_v3_expert_grads(_fp8_grouped_dgrad, TRAIN_T),
                                         *_deepgemm_grouped(_fp8_grouped_dgrad, lambda m: 64 < m <= 512)],
    "fp8_grouped_dgrad/small": lambda: _v3_expert_grads(_fp8_grouped_dgrad, DECODE_T),
    "fp8_wgrad": lambda: [_fp8_wgrad(f"{TRAIN_T}x{n}x{k}", TRAIN_T, n, k) for n, k in DEEPGEMM_DENSE["nk"]]
    + [_fp8_wgrad(f"{TRAIN_T + 16}x2112x7168 partial last block", TRAIN_T + 16, 2112, 7168)],
    "fp8_wgrad_tma": _fp8_wgrad_tma_problems,
    "fp8_grouped_wgrad": lambda: [*_v3_expert_grads(_fp8_grouped_wgrad, TRAIN_T, align=True),
                                  *_deepgemm_grouped(_fp8_grouped_wgrad, lambda m: True)],
    "fp8_grouped_wgrad_tma": lambda: [*_v3_expert_grads(_fp8_grouped_wgrad_tma, TRAIN_T, align=True),
                                      *_deepgemm_grouped(_fp8_grouped_wgrad_tma, lambda m: True)],
    "quant_act_t": lambda: [_quant_act_t(f"M={TRAIN_T} K={D}", TRAIN_T, D),
                            _quant_act_t(f"M={_PREFILL_M} K={I}", _PREFILL_M, I)],
    "quant_act_dual": lambda: [_quant_act_dual(f"M={TRAIN_T} K={D}", TRAIN_T, D),
                               _quant_act_dual(f"M={_PREFILL_M} K={2 * I}", _PREFILL_M, 2 * I)],
}


def launches(target: str, sweep: bool = True) -> list[Launch]:
    """The launches of ``target`` (all of them, or only the representative one)."""
    found = LAUNCHES[target]()
    return found if sweep else found[:1]
