"""Block-scaled FP8 GEMM (DeepSeek-V3's recipe): ``c = a · bᵀ`` with 1×B and B×B scales.

Legend: M rows of ``a`` (tokens), N output features, K reduction dim, B the scale block (128),
Kb = K/B.

    a (M, K) e4m3,  a_s (M, Kb) f32      one scale per row and K block (any strides; the
                                         column-major layout of ``fp8_quant.to_col_major`` is
                                         the fastest to read)
    b (N, K) e4m3,  b_s (ceil(N/B), Kb)  one scale per B×B block of b (F.linear layout)
    c (M, N) bf16 / fp16 / fp32

Algorithm (the reference's per-block promotion): for each K block kb, ``p = a_blk · b_blkᵀ`` on the
tensor cores into a fresh float32 tile, then ``acc += p · (a_s[:, kb] · b_s[n // B, kb])``; the
tile is cast to ``out_dtype`` once at the end. The reference multiplies ``(p · a_s) · b_s``; the
kernel forms the combined scale first (BLOCK_M multiplies per K block instead of BLOCK_M·BLOCK_N,
so the promotion is one FMA per accumulator element): the two differ by at most one float32
rounding per block. On a GPU, Hopper's FP8 tensor cores accumulate a 128-deep block with less than
float32 precision (about 14 bits, DeepSeek-V3 report §3.3.2): that is why the promotion happens
every 128 of K, and why GPU results are near, not bit, exact against the reference.

Tiles: BLOCK_K = B, so each K step is exactly one scale block. When BLOCK_N <= B a tile lies in
one B-row block of b and ``b_s`` is one scalar per K step; wider tiles read a vector of scales.
Programs are ordered in GROUP_M super-rows so that neighbouring programs share tiles of a and b
in L2. Rows past M and columns past N are clamped for loads (no masks in the K loop) and masked
for stores: any M >= 0 and N >= 0 work; K must be a multiple of B.

Configs come in three lists chosen by an M class (decode M <= 64, medium M <= 512, large) and are
autotuned keyed on (N, K) only: the exact token count never enters the key, so a model is tuned at
most three times per weight shape. ``MOELA_FP8_GEMM_CONFIG`` pins one config for all classes.
The kernel's domain is narrower than the reference's: K a multiple of the block, blocks of 32,
64, 128 or 256.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from moela.reference.fp8 import check_fp8_gemm

from ._common import autotune, cdiv
from .factory import kernel_op
from .tl_helpers import fp8_block_scaled_tile, grouped_tile_order

__all__ = ["fp8_gemm", "fp8_kernel_block", "fp8_gemm_configs", "fp8_config", "launch_fp8_gemm", "m_class", "BLOCKS"]

#: The scale blocks the FP8 GEMM kernels take (the K tile is the scale block).
BLOCKS = (32, 64, 128, 256)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _fp8_gemm_kernel(
    a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, bias_ptr,
    M, N, K,
    stride_am, stride_ak, stride_asm, stride_ask,
    stride_bn, stride_bk, stride_bsn, stride_bsk,
    stride_cm, stride_cn,
    SCALE_BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
):
    """c[M, N] = Σ_kb promote(a_kb · b_kbᵀ) (+ bias), BLOCK_K = SCALE_BLOCK.

    grid: (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),). Each program owns one (BLOCK_M, BLOCK_N) tile of
    c and runs K/SCALE_BLOCK steps.
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = grouped_tile_order(pid, num_pid_m, num_pid_n, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_m, M - 1).to(tl.int64)
    cols = tl.minimum(offs_n, N - 1).to(tl.int64)

    acc = fp8_block_scaled_tile(
        a_ptr, as_ptr, b_ptr, bs_ptr, rows, cols, pid_n * BLOCK_N, K // SCALE_BLOCK,
        stride_am, stride_ak, stride_asm, stride_ask, stride_bn, stride_bk, stride_bsn, stride_bsk,
        BLOCK_M, BLOCK_N, SCALE_BLOCK,
    )
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


def m_class(M: int) -> str:
    """The config list an M picks: "small" (decode, M <= 64), "medium" (M <= 512), "large"."""
    return "small" if M <= 64 else "medium" if M <= 512 else "large"


def fp8_config(bm: int, bn: int, warps: int, stages: int, group_m: int = 8) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": group_m}, num_warps=warps, num_stages=stages)


def fp8_gemm_configs(cls: str) -> list[triton.Config]:
    """Hopper configs per M class (first = default). BLOCK_K is the scale block, not tuned.

    The promotion keeps two float32 tiles live (the accumulator and the fresh block product), so
    a tile gets at most ~64 accumulator registers per thread: 128×128 with 8 warps, 64×128 or
    128×64 with 4; BLOCK_M >= 64 uses wgmma (one warpgroup per 64 rows), smaller BLOCK_M the
    mma.sync path, which is enough for memory-bound decode. Stages × (BLOCK_M + BLOCK_N) × 128 B
    of shared memory stay under Hopper's 227 KB.
    """
    c = fp8_config
    if cls == "small":  # decode: memory-bound on b; many programs (N/16 = 132 for N = 2112), deep pipelines
        return [c(16, 64, 4, 4), c(16, 32, 4, 4), c(16, 128, 4, 4), c(32, 64, 4, 5), c(64, 64, 4, 4), c(16, 64, 4, 6),
                c(64, 32, 4, 6), c(16, 32, 2, 8), c(16, 16, 1, 8)]
    if cls == "medium":
        return [c(64, 64, 4, 4), c(64, 128, 4, 4), c(128, 64, 4, 4), c(32, 64, 4, 5), c(64, 32, 4, 5),
                c(128, 128, 8, 4)]
    return [c(128, 128, 8, 4), c(64, 128, 4, 4), c(128, 64, 4, 4), c(128, 128, 8, 3), c(64, 256, 8, 3),
            c(128, 128, 8, 5), c(64, 64, 4, 5)]


_KEY = ["N", "K", "SCALE_BLOCK", "HAS_BIAS"]
_TUNED = {
    cls: autotune(f"fp8_gemm_{cls}", fp8_gemm_configs(cls), key=_KEY)(_fp8_gemm_kernel)
    for cls in ("small", "medium", "large")
}


# ----------------------------------------------------------------------------------------------
# The op
# ----------------------------------------------------------------------------------------------


def fp8_kernel_block(op: str, block: int, K: int, name: str) -> None:
    """The FP8 GEMM kernels' domain: block in ``BLOCKS`` and K a multiple of it."""
    if block not in BLOCKS:
        raise ValueError(f"block: the Triton {op} kernel takes one of {BLOCKS} (the K tile is the scale "
                         f"block), got {block!r} (moela.reference.{op} takes any)")
    if K % block:
        raise ValueError(f"{name}: the Triton {op} kernel takes K (the last dim) a multiple of block={block}, "
                         f"got K={K} (moela.reference.{op} takes partial blocks)")


def launch_fp8_gemm(out, a, a_s, b, b_s, block, bias, config) -> None:
    """The block-scaled GEMM into ``out`` (M, N), ``bias`` (N,) or None added to the float32
    accumulator; shared with ``fp8_linear``."""
    M, K = a.shape
    N = b.shape[0]
    if M == 0 or N == 0:
        return
    bias = None if bias is None else bias.contiguous()  # the kernel indexes it flat
    args = (a, a_s, b, b_s, out, bias if bias is not None else a_s, M, N, K,
            *a.stride(), *a_s.stride(), *b.stride(), *b_s.stride(), *out.stride())
    consts = dict(SCALE_BLOCK=block, HAS_BIAS=bias is not None)
    if config is None:
        grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)
        _TUNED[m_class(M)][grid](*args, **consts)
    else:
        meta = dict(config)
        meta.setdefault("GROUP_M", 8)
        _fp8_gemm_kernel[(cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)](*args, **consts, **meta)


def _domain(a, a_s, b, b_s, out_dtype=torch.bfloat16, block=128) -> None:
    fp8_kernel_block("fp8_gemm", block, a.shape[1], "a")


@kernel_op("fp8_gemm", contract=check_fp8_gemm, domain=_domain, fp8=True)
def fp8_gemm(out, a: Tensor, a_s: Tensor, b: Tensor, b_s: Tensor, out_dtype: torch.dtype = torch.bfloat16,
             block: int = 128, *, config=None) -> Tensor:
    """``a · bᵀ`` with block scales and per-block float32 promotion (``moela.reference.fp8_gemm``).

    Args:
        a: (M, K) float8_e4m3fn, any M >= 0 (decode M = 1 included); K a multiple of ``block``.
        a_s: (M, K/block) float32, any strides (column-major is fastest: ``fp8_quant.to_col_major``).
        b: (N, K) float8_e4m3fn (F.linear layout), any N.
        b_s: (ceil(N/block), K/block) float32.
        out_dtype: bfloat16 (default), float16 or float32.
        block: the scale block, 128 for DeepSeek (32, 64, 128 or 256).
    Returns:
        (M, N) in out_dtype.

    Example::

        q, s = quant_act(x)                    # x (M, K) bf16
        y = fp8_gemm(q, s, w_fp8, w_scale_inv)  # (M, N) bf16
    """
    launch_fp8_gemm(out, a, a_s, b, b_s, block, None, config)
