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
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moela.kernels._common import autotune, autotune_configs, cdiv, check_kernel_device, on_tensor_device, run_direct
from moela.kernels.fp8_quant import FP8_DTYPE, check_fp8_capability
from moela.reference._checks import FLOAT_DTYPES, check_same_device, check_tensor

__all__ = ["fp8_gemm", "fp8_gemm_fwd", "check_fp8_block", "OUT_DTYPES", "m_class"]

OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
BLOCKS = (32, 64, 128, 256)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _grouped_tile_order(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """pid -> (pid_m, pid_n), walking GROUP_M rows of tiles column by column (L2 reuse)."""
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_m
    pid_n = (pid % width) // group_m
    return pid_m, pid_n


@triton.jit
def _fp8_block_scaled_tile(
    a_ptr, as_ptr, b_ptr, bs_ptr,
    rows, cols, n_start, num_kb,
    stride_am, stride_ak, stride_asm, stride_ask,
    stride_bn, stride_bk, stride_bsn, stride_bsk,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The main loop shared by fp8_gemm and fp8_grouped_gemm: a (BLOCK_M, BLOCK_N) float32 tile of
    ``Σ_kb (a[rows, kb] · b[cols, kb]ᵀ) · a_s[rows, kb] · b_s[cols // BLOCK_K, kb]``.

    rows / cols: in-bounds int64 indices (already clamped); n_start: the tile's first column
    (a multiple of BLOCK_N). BLOCK_K is the scale block.
    """
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + cols[None, :] * stride_bn
    as_ptrs = as_ptr + rows * stride_asm
    if BLOCK_N <= BLOCK_K:  # the tile lies inside one B-row block of b: one scale per K block
        bs_ptrs = bs_ptr + (n_start // BLOCK_K) * stride_bsn
    else:
        bs_ptrs = bs_ptr + (cols // BLOCK_K) * stride_bsn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(num_kb):
        a = tl.load(a_ptrs)
        b = tl.load(b_ptrs)
        a_s = tl.load(as_ptrs)
        b_s = tl.load(bs_ptrs)
        partial = tl.dot(a, b)  # this K block, fresh float32 (the promotion boundary)
        if BLOCK_N <= BLOCK_K:
            acc += partial * (a_s * b_s)[:, None]
        else:
            acc += partial * (a_s[:, None] * b_s[None, :])
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
        as_ptrs += stride_ask
        bs_ptrs += stride_bsk
    return acc


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
    pid_m, pid_n = _grouped_tile_order(pid, num_pid_m, num_pid_n, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_m, M - 1).to(tl.int64)
    cols = tl.minimum(offs_n, N - 1).to(tl.int64)

    acc = _fp8_block_scaled_tile(
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


def _cfg(bm: int, bn: int, warps: int, stages: int, group_m: int = 8) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": group_m}, num_warps=warps, num_stages=stages)


def _fp8_gemm_configs(cls: str) -> list[triton.Config]:
    """Hopper configs per M class (first = default). BLOCK_K is the scale block, not tuned.

    The promotion keeps two float32 tiles live (the accumulator and the fresh block product), so
    a tile gets at most ~64 accumulator registers per thread: 128×128 with 8 warps, 64×128 or
    128×64 with 4; BLOCK_M >= 64 uses wgmma (one warpgroup per 64 rows), smaller BLOCK_M the
    mma.sync path, which is enough for memory-bound decode. Stages × (BLOCK_M + BLOCK_N) × 128 B
    of shared memory stay under Hopper's 227 KB.
    """
    if cls == "small":  # decode: memory-bound on b; many programs (N/16 = 132 for N = 2112), deep pipelines
        configs = [_cfg(16, 64, 4, 4), _cfg(16, 32, 4, 4), _cfg(16, 128, 4, 4), _cfg(32, 64, 4, 5),
                   _cfg(64, 64, 4, 4), _cfg(16, 64, 4, 6), _cfg(64, 32, 4, 6), _cfg(16, 32, 2, 8),
                   _cfg(16, 16, 1, 8)]
    elif cls == "medium":
        configs = [_cfg(64, 64, 4, 4), _cfg(64, 128, 4, 4), _cfg(128, 64, 4, 4), _cfg(32, 64, 4, 5),
                   _cfg(64, 32, 4, 5), _cfg(128, 128, 8, 4)]
    else:
        configs = [_cfg(128, 128, 8, 4), _cfg(64, 128, 4, 4), _cfg(128, 64, 4, 4), _cfg(128, 128, 8, 3),
                   _cfg(64, 256, 8, 3), _cfg(128, 128, 8, 5), _cfg(64, 64, 4, 5)]
    return autotune_configs("fp8_gemm", configs)


_KEY = ["N", "K", "SCALE_BLOCK", "HAS_BIAS"]
_TUNED = {
    cls: autotune(configs=_fp8_gemm_configs(cls), key=_KEY)(_fp8_gemm_kernel)
    for cls in ("small", "medium", "large")
}


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------


def check_fp8_block(block: object) -> int:
    if not isinstance(block, int) or isinstance(block, bool) or block not in BLOCKS:
        raise ValueError(f"block: expected one of {BLOCKS} (the K tile is the scale block), got {block!r}")
    return block


def check_out_dtype(out_dtype: object) -> None:
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype: expected one of {OUT_DTYPES}, got {out_dtype}")


def _check_operands(a, a_s, b, b_s, out_dtype, block, bias):
    check_tensor("a", a, ndim=2, dtypes=(FP8_DTYPE,))
    check_tensor("b", b, ndim=2, dtypes=(FP8_DTYPE,))
    check_fp8_block(block)
    check_out_dtype(out_dtype)
    M, K = a.shape
    N = b.shape[0]
    if b.shape[1] != K:
        raise ValueError(f"b: expected K={K} columns to match a {tuple(a.shape)}, got shape {tuple(b.shape)}")
    if K % block:
        raise ValueError(f"a: expected K (the last dim) to be a multiple of block={block}, got K={K}")
    check_tensor("a_s", a_s, dtypes=(torch.float32,), shape=(M, K // block))
    check_tensor("b_s", b_s, dtypes=(torch.float32,), shape=(cdiv(N, block), K // block))
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES[:3], shape=(N,))
    check_same_device(a=a, a_s=a_s, b=b, b_s=b_s, bias=bias)
    return M, N, K


@on_tensor_device
def fp8_gemm_fwd(
    a: torch.Tensor,
    a_s: torch.Tensor,
    b: torch.Tensor,
    b_s: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    block: int = 128,
    *,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """Launch the block-scaled GEMM (see the module docstring); no host synchronisation.

    bias: optional (N,) float, added to the float32 accumulator before the single cast.
    out: optional (M, N) buffer of ``out_dtype`` (any strides), written and returned.
    config: e.g. ``{"BLOCK_M": 64, "BLOCK_N": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 4}``
    bypasses autotuning (tests, benchmarks).
    """
    M, N, K = _check_operands(a, a_s, b, b_s, out_dtype, block, bias)
    check_kernel_device("a", a)
    check_fp8_capability("fp8_gemm", a.device)
    if out is None:
        out = torch.empty(M, N, dtype=out_dtype, device=a.device)
    else:
        check_tensor("out", out, dtypes=(out_dtype,), shape=(M, N))
        check_same_device(a=a, out=out)
    if M == 0 or N == 0:
        return out
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
    return out


# ----------------------------------------------------------------------------------------------
# Public op
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("moela::fp8_gemm", mutates_args=())
def _fp8_gemm_op(
    a: torch.Tensor,
    a_s: torch.Tensor,
    b: torch.Tensor,
    b_s: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    block: int = 128,
) -> torch.Tensor:
    return fp8_gemm_fwd(a, a_s, b, b_s, out_dtype, block)


@_fp8_gemm_op.register_fake
def _(a, a_s, b, b_s, out_dtype=torch.bfloat16, block=128):
    M, N, _ = _check_operands(a, a_s, b, b_s, out_dtype, block, None)
    return a.new_empty((M, N), dtype=out_dtype)


def fp8_gemm(
    a: torch.Tensor,
    a_s: torch.Tensor,
    b: torch.Tensor,
    b_s: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    block: int = 128,
) -> torch.Tensor:
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
    if run_direct(a, a_s, b, b_s):  # eager, nothing to record: the launcher itself (same bits)
        return fp8_gemm_fwd(a, a_s, b, b_s, out_dtype, block)
    return _fp8_gemm_op(a, a_s, b, b_s, out_dtype, block)
