"""FP8 wgrad GEMM: ``dW = dyᵀ · x`` from the token-direction (B×1) quantizations of dy and x.

Legend: M tokens (the reduction), N output features, K input features, B the scale block (128),
Mb = ceil(M/B).

    dy_t (N, M) e4m3,  dy_t_s (N, Mb) f32    ``quant_act_t`` of the output gradient dy (M, N)
    x_t  (K, M) e4m3,  x_t_s  (K, Mb) f32    ``quant_act_t`` of the input x (M, K)
    dw   (N, K) float32 (default) / bf16 / fp16, any strides

DeepGEMM's ``fp8_gemm_nt`` with 1-D scales on both operands (the "TN" wgrad of DeepSeek-V3): both
operands have the reduction (tokens) contiguous, the K-major layout FP8 wgmma takes, and one scale
per (row, B tokens). Per B-block mb of tokens: ``p = dy_t[:, mb] · x_t[:, mb]ᵀ`` into a fresh
float32 tile, scaled by ``dy_t_s[:, mb]`` per row of dW and ``x_t_s[:, mb]`` per column, added to
the float32 accumulator in token order; one cast to the output dtype at the end.

Two kernels, one rule (``fp8_mainloop.fp8_path``, as for ``fp8_gemm``):

- ``_fp8_wgrad_tma_kernel`` (Hopper, sm_90+, block 128, dy_t and x_t TMA-readable: M a multiple
  of 16 when contiguous): persistent, ``min(tiles, SMs)`` programs walk the (BLOCK_M, BLOCK_N)
  tiles of dW (BLOCK_M rows of N, BLOCK_N columns of K) in GROUP_M super-rows, each through
  ``fp8_mainloop.fp8_tma_tile`` with ``B_ROW_SCALES`` (x_t's scales per column of dW whatever the
  tile width): [BLOCK, 128] boxes of both operands through tensor descriptors made on the device,
  the promotion ``p · (dy_t_s ⊗ x_t_s)`` overlapped with the next wgmma (pipelined schedule), or
  the warp-specialised schedule. TMA zero-fills tokens past M, so a partial last token block
  needs no code of its own (its scales are ``quant_act_t``'s), nor do rows past N or columns past
  K (the store is masked). The scales come through descriptors too, in both schedules (no
  synchronous load in the K loop; the warp-specialised producer loads them): dy_t_s as its
  (Mb, N) transpose in (1, BLOCK_M) boxes (the warp-specialised schedule splits a tile's rows
  over two math warpgroups, and Triton's data partition takes this form), x_t_s as (K, Mb) in
  (BLOCK_N, 4) boxes, the block's column picked in registers. :func:`tma_scales` reads them in
  place where TMA can (column-major dy_t_s, ``fp8_quant.to_col_major``; x_t_s as
  ``quant_act_t`` writes it with Mb a multiple of 4), else makes 16-byte aligned copies
  (N·Mb and K·Mb float32, a small kernel beside the GEMM).
- ``_fp8_wgrad_kernel`` (pointer loads): pre-Hopper GPUs, blocks other than 128, operands a
  descriptor cannot take (odd M). One program per tile, ``tl_helpers.fp8_scaled_range_tile``
  (the reference's order ``(p · dy_t_s) · x_t_s``; the operands and scales stream through the
  ``cp.async`` pipeline when M is a multiple of 16, else load element by element), a partial
  last token block after the main loop with masked loads; rows past N and columns past K clamped
  for loads and masked for stores.

The Hopper kernel rounds ``a_s · b_s`` and then ``p · (a_s · b_s)``, the reference ``p · a_s`` and
then ``(p · a_s) · b_s``: two float32 roundings each, in another order. Configs: the Hopper list
(``fp8_wgrad_tma_configs``) pruned and ordered by the wave model (``fp8_mainloop.tma_pruner``)
and autotuned keyed on (N, K, M's power-of-two bucket); the pointer list keyed on (N, K, block,
whether M is a multiple of it, M's bucket). ``MOELA_FP8_WGRAD_TMA_CONFIG`` /
``MOELA_FP8_WGRAD_CONFIG`` pin one; an explicit ``config=`` names the keys of the kernel the rule
picks (BLOCK_M, BLOCK_N, GROUP_M, WARP_SPECIALIZE for the Hopper kernel; BLOCK_N, BLOCK_K, GROUP_N
for the pointer kernel), else ValueError.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from moela.reference.fp8_train import check_fp8_wgrad

from ._common import autotune, cdiv, device_capability, ensure_tma_allocator, m_bucket, num_sms
from .factory import kernel_op
from .fp8_mainloop import (
    HOPPER_CONFIG_KEYS,
    check_config_keys,
    fp8_path,
    fp8_tma_tile,
    hopper_meta,
    hopper_tuner,
    tma_config,
    tma_pruner,
    tma_ready,
)
from .tl_helpers import SMEM_BUDGET, fp8_scaled_range_tile, fp8_train_block, grouped_tile_order

__all__ = ["fp8_wgrad", "fp8_wgrad_configs", "fp8_wgrad_tma_configs", "launch_fp8_wgrad", "tma_launch_args",
           "tma_scales", "POINTER_CONFIG_KEYS"]


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _fp8_wgrad_kernel(
    a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr,
    N, K, M,
    stride_an, stride_am, stride_asn, stride_asm,
    stride_bk, stride_bm, stride_bsk, stride_bsm,
    stride_cn, stride_ck,
    M_BUCKET,  # autotune key only: _common.m_bucket(M)
    SCALE_BLOCK: tl.constexpr, EVEN_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr, STAGES: tl.constexpr = 3,
):
    """dw[N, K] = Σ_mb promote(dy_t_mb · x_t_mbᵀ) · dy_t_s ⊗ x_t_s, the reduction tile = SCALE_BLOCK.

    grid: (cdiv(N, BLOCK_N) * cdiv(K, BLOCK_K),); each program owns one (BLOCK_N, BLOCK_K) tile of dw
    and runs cdiv(M, SCALE_BLOCK) steps.
    """
    pid = tl.program_id(0)
    pid_n, pid_k = grouped_tile_order(pid, tl.cdiv(N, BLOCK_N), tl.cdiv(K, BLOCK_K), GROUP_N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)
    cols = tl.minimum(offs_k, K - 1).to(tl.int64)
    acc = fp8_scaled_range_tile(
        a_ptr, as_ptr, b_ptr, bs_ptr, rows, cols, pid_k * BLOCK_K, 0, M,
        stride_an, stride_am, stride_asn, stride_asm,
        stride_bk, stride_bm, stride_bsk, stride_bsm,
        BLOCK_N, BLOCK_K, SCALE_BLOCK, True, EVEN_M, STAGES,
    )
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    c_ptrs = c_ptr + offs_n.to(tl.int64)[:, None] * stride_cn + offs_k[None, :] * stride_ck
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _fp8_wgrad_tma_kernel(
    a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr,
    N, K, M,
    stride_an, stride_asm, stride_bk, stride_bsk, stride_cn, stride_ck,
    M_BUCKET,  # autotune key only: _common.m_bucket(M)
    SCALE_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
    STAGES: tl.constexpr,
):
    """dw[N, K] = Σ_mb promote(dy_t_mb · x_t_mbᵀ) · dy_t_s ⊗ x_t_s on Hopper: tensor descriptors,
    persistent tiles. BLOCK_M: rows of dw (of N), BLOCK_N: columns (of K); the reduction tile is
    SCALE_BLOCK tokens.

    grid: (min(cdiv(N, BLOCK_M) * cdiv(K, BLOCK_N), SMs),). Program p computes tiles p, p + grid,
    ... (tile -> (pid_m, pid_n) in GROUP_M super-rows) with ``fp8_mainloop.fp8_tma_tile``
    (B_ROW_SCALES: x_t_s per column of dw) over all cdiv(M, SCALE_BLOCK) token blocks. dy_t (N, M)
    and x_t (K, M) are read through descriptors made here (tokens past M zero-filled), and so are
    the scales: as_ptr dy_t_sᵀ (Mb, N) with row stride stride_asm, N contiguous, in (1, BLOCK_M)
    boxes; bs_ptr x_t_s (K, Mb) with row stride stride_bsk, Mb contiguous, in (BLOCK_N, 4) boxes
    (``tma_scales``).
    """
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[N, M], strides=[stride_an, 1], block_shape=[BLOCK_M, SCALE_BLOCK])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[K, M], strides=[stride_bk, 1], block_shape=[BLOCK_N, SCALE_BLOCK])
    num_pid_m = tl.cdiv(N, BLOCK_M)
    num_pid_n = tl.cdiv(K, BLOCK_N)
    num_kb = tl.cdiv(M, SCALE_BLOCK)
    as_desc = tl.make_tensor_descriptor(as_ptr, shape=[num_kb, N], strides=[stride_asm, 1], block_shape=[1, BLOCK_M])
    bs_desc = tl.make_tensor_descriptor(bs_ptr, shape=[K, num_kb], strides=[stride_bsk, 1], block_shape=[BLOCK_N, 4])
    for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, tl.num_programs(0), flatten=False):
        pid_m, pid_n = grouped_tile_order(tile, num_pid_m, num_pid_n, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = fp8_tma_tile(a_desc, b_desc, pid_m * BLOCK_M, pid_n * BLOCK_N, as_ptr, bs_ptr, 0, 0, 0, num_kb,
                           as_desc, bs_desc, 0, pid_m * BLOCK_M, pid_n * BLOCK_N,
                           BLOCK_M, BLOCK_N, SCALE_BLOCK, WARP_SPECIALIZE, STAGES, True, True)
        mask = (offs_m < N)[:, None] & (offs_n < K)[None, :]
        c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cn + offs_n[None, :] * stride_ck
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------


def _cfg(bn: int, bk: int, warps: int, stages: int, group: int = 8) -> triton.Config:
    return triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "GROUP_N": group, "STAGES": stages},
                         num_warps=warps, num_stages=stages)


def fp8_wgrad_configs() -> list[triton.Config]:
    """The pointer kernel's configs. Weight-shaped outputs (thousands × thousands) and long
    reductions: wgmma tiles first. Both scales are vectors (one per row of dW and one per column),
    so the promotion holds more registers than ``fp8_gemm``'s: 128×256 tiles spill at sm_90,
    128×128 with 8 warps do not."""
    return [_cfg(128, 128, 8, 4), _cfg(128, 128, 8, 3), _cfg(64, 128, 4, 4), _cfg(128, 64, 4, 4), _cfg(64, 64, 4, 5)]


def fp8_wgrad_tma_configs() -> list[triton.Config]:
    """The Hopper kernel's configs (BLOCK_M rows of dW, BLOCK_N columns; ``tma_pruner`` orders
    them by the wave model): ``fp8_gemm``'s large class. The pipelined schedule keeps three float32
    tiles live (accumulator, waited block, block in flight; four at 64 columns, where both
    promotions of a pair overlap the next wgmma) beside one block's x_t scales for the thread's
    columns, so 128-row tiles take 8 warps; the warp-specialised ones (``ws``) are 128-row tiles at
    num_warps=4 (two math warpgroups of 64 rows, + the producer). None spills at sm_90
    (tests/kernels/test_fp8_sm90.py, ``profiling audit``)."""
    c = tma_config
    return [c(128, 128, 8, 2), c(128, 64, 8, 4), c(128, 128, 4, 4, ws=True), c(128, 64, 4, 6, ws=True),
            c(64, 128, 4, 3)]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """A partial last token block: no 128×128 tiles (they spill at sm_90 with the masked block)."""
    if kwargs.get("EVEN_M", True):
        return configs
    kept = [c for c in configs if c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] < 128 * 128]
    return kept or configs[-1:]


def _wgrad_tiles(nargs: dict, bm: int, bn: int) -> tuple[int, int]:
    N, K = nargs["N"], nargs["K"]
    return cdiv(N, bm) * cdiv(K, bn), min(bm, N)


_tuned = autotune("fp8_wgrad", fp8_wgrad_configs(), key=["N", "K", "SCALE_BLOCK", "EVEN_M", "M_BUCKET"],
                  prune_configs_by={"early_config_prune": _prune})(_fp8_wgrad_kernel)
_tma_tuned = hopper_tuner(autotune(
    "fp8_wgrad_tma", fp8_wgrad_tma_configs(), key=["N", "K", "SCALE_BLOCK", "M_BUCKET"],
    prune_configs_by={"early_config_prune": tma_pruner(_wgrad_tiles, SMEM_BUDGET, "a_ptr")},
)(_fp8_wgrad_tma_kernel))


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

#: The keys an explicit config of the pointer kernel may name, and those it must name.
POINTER_CONFIG_KEYS = ({"BLOCK_N", "BLOCK_K", "GROUP_N", "STAGES", "num_warps", "num_stages"}, {"BLOCK_N", "BLOCK_K"})


def _tma_rows(s: Tensor) -> Tensor:
    """A 2-D float32 tensor as a descriptor reads it: ``s`` itself when TMA can
    (``fp8_mainloop.tma_ready``: 16-byte aligned rows, the last dim contiguous), else a copy with
    its rows padded to 16 bytes (a view of its columns: TMA zero-fills past them, so the padding is
    never read)."""
    if tma_ready(s):
        return s
    padded = s.new_empty(s.shape[0], cdiv(s.shape[1], 4) * 4)[:, :s.shape[1]]
    return padded.copy_(s)


def tma_scales(dy_t_s: Tensor, x_t_s: Tensor) -> tuple[Tensor, Tensor]:
    """The scales as the Hopper kernel's descriptors read them: ``dy_t_sᵀ`` (Mb, N), N contiguous
    (in place when dy_t_s is column-major, ``fp8_quant.to_col_major``), and ``x_t_s`` (K, Mb), Mb
    contiguous (in place as ``quant_act_t`` writes it when Mb is a multiple of 4); otherwise
    16-byte aligned copies (N·Mb or K·Mb float32: little beside the GEMM)."""
    return _tma_rows(dy_t_s.t()), _tma_rows(x_t_s)


def tma_launch_args(out, dy_t, dy_t_s, x_t, x_t_s, block) -> tuple[tuple, dict]:
    """The Hopper kernel's arguments and constexprs (also what an sm_90 compile test binds); the
    scales through :func:`tma_scales`."""
    N, M = dy_t.shape
    K = x_t.shape[0]
    a_s, b_s = tma_scales(dy_t_s, x_t_s)
    args = (dy_t, a_s, x_t, b_s, out, N, K, M, dy_t.stride(0), a_s.stride(0), x_t.stride(0), b_s.stride(0),
            *out.stride(), m_bucket(M))
    return args, dict(SCALE_BLOCK=block)


def _launch_tma(out, dy_t, dy_t_s, x_t, x_t_s, block, config) -> None:
    N, K = dy_t.shape[0], x_t.shape[0]
    sms = num_sms(dy_t.device)
    ensure_tma_allocator()
    args, consts = tma_launch_args(out, dy_t, dy_t_s, x_t, x_t_s, block)
    if config is None:
        _tma_tuned[lambda meta: (min(cdiv(N, meta["BLOCK_M"]) * cdiv(K, meta["BLOCK_N"]), sms),)](*args, **consts)
    else:
        meta = hopper_meta(check_config_keys(config, HOPPER_CONFIG_KEYS, "fp8_wgrad", "Hopper"))
        if meta["WARP_SPECIALIZE"] and (meta.get("num_warps", 4) != 4 or meta["BLOCK_M"] != 128):
            raise ValueError(f"config: the warp-specialised schedule takes num_warps=4 and BLOCK_M=128 (two math "
                             f"warpgroups of 64 rows), got {dict(config)!r}")
        grid = (min(cdiv(N, meta["BLOCK_M"]) * cdiv(K, meta["BLOCK_N"]), sms),)
        _fp8_wgrad_tma_kernel[grid](*args, **consts, **meta)


def _launch_pointer(out, dy_t, dy_t_s, x_t, x_t_s, block, config) -> None:
    N, M = dy_t.shape
    K = x_t.shape[0]
    args = (dy_t, dy_t_s, x_t, x_t_s, out, N, K, M, *dy_t.stride(), *dy_t_s.stride(), *x_t.stride(),
            *x_t_s.stride(), *out.stride(), m_bucket(M))
    consts = dict(SCALE_BLOCK=block, EVEN_M=M % block == 0)
    if config is None:
        _tuned[lambda m: (cdiv(N, m["BLOCK_N"]) * cdiv(K, m["BLOCK_K"]),)](*args, **consts)
    else:
        meta = {"GROUP_N": 8, **check_config_keys(config, POINTER_CONFIG_KEYS, "fp8_wgrad", "pointer")}
        _fp8_wgrad_kernel[(cdiv(N, meta["BLOCK_N"]) * cdiv(K, meta["BLOCK_K"]),)](*args, **consts, **meta)


def launch_fp8_wgrad(out, dy_t, dy_t_s, x_t, x_t_s, block, config, capability=None) -> None:
    """dW into ``out`` (N, K), any strides: the kernel ``fp8_mainloop.fp8_path`` picks for
    ``capability`` (default: the device's, ``_common.device_capability``) and the operands."""
    N, K = dy_t.shape[0], x_t.shape[0]
    if N == 0 or K == 0:
        return
    cap = device_capability(dy_t.device) if capability is None else capability
    if fp8_path(cap, block, dy_t, x_t) == "tma":
        _launch_tma(out, dy_t, dy_t_s, x_t, x_t_s, block, config)
    else:
        _launch_pointer(out, dy_t, dy_t_s, x_t, x_t_s, block, config)


def _domain(dy_t, dy_t_s, x_t, x_t_s, out_dtype=torch.float32, block=128) -> None:
    fp8_train_block("fp8_wgrad", block)


@kernel_op("fp8_wgrad", contract=check_fp8_wgrad, domain=_domain, fp8=True)
def fp8_wgrad(out, dy_t: Tensor, dy_t_s: Tensor, x_t: Tensor, x_t_s: Tensor, out_dtype: torch.dtype = torch.float32,
              block: int = 128, *, config=None) -> Tensor:
    """The weight gradient ``dyᵀ · x`` in FP8 (``moela.reference.fp8_wgrad``).

    Args:
        dy_t: (N, M) float8_e4m3fn, dy_t_s: (N, ceil(M/block)) float32: ``quant_act_t(dy)``.
        x_t: (K, M) float8_e4m3fn, x_t_s: (K, ceil(M/block)) float32: ``quant_act_t(x)``.
        out_dtype: float32 (default), bfloat16 or float16.
        block: tokens per scale: 32, 64, 128 (DeepSeek) or 256.
        config: an explicit config for the kernel the path rule picks (module docstring).
    Returns:
        (N, K) in out_dtype.

    Example::

        dw = fp8_wgrad(*quant_act_t(dy), *quant_act_t(x))  # dy (M, N), x (M, K) -> (N, K) float32
    """
    launch_fp8_wgrad(out, dy_t, dy_t_s, x_t, x_t_s, block, config)
