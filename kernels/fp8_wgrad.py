"""FP8 wgrad GEMM: ``dW = dyᵀ · x`` from the token-direction (B×1) quantizations of dy and x.

Legend: M tokens (the reduction), N output features, K input features, B the scale block (128),
Mb = ceil(M/B).

    dy_t (N, M) e4m3,  dy_t_s (N, Mb) f32    ``quant_act_t`` of the output gradient dy (M, N)
    x_t  (K, M) e4m3,  x_t_s  (K, Mb) f32    ``quant_act_t`` of the input x (M, K)
    dw   (N, K) float32 (default) / bf16 / fp16

DeepGEMM's ``fp8_gemm_nt`` with 1-D scales on both operands (the "TN" wgrad of DeepSeek-V3): both
operands have the reduction (tokens) contiguous, the K-major layout FP8 wgmma takes, and one scale
per (row, B tokens). Per B-block mb of tokens: ``p = dy_t[:, mb] · x_t[:, mb]ᵀ`` into a fresh
float32 tile, ``acc += (p · dy_t_s[:, mb]) · x_t_s[:, mb]`` (``tl_helpers.fp8_scaled_range_tile``,
the reference's order). Both operands stream through the software pipeline (``cp.async``,
the scales with them) when the token count is a multiple of 16 (the rows' byte stride; others
load element by element); a partial last token block is done after the main loop with masked
loads. Rows past N and columns past K are clamped for loads and masked for stores. Configs:
128×128 tiles (wgmma; two float32 tiles live: 8 warps; not with a partial last block, whose
masked code outside the loop leaves them too few registers), keyed on (N, K) and M's power-of-two
bucket; ``MOELA_FP8_WGRAD_CONFIG`` pins one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from moela.reference.fp8_train import check_fp8_wgrad

from ._common import autotune, cdiv, m_bucket
from .factory import kernel_op
from .tl_helpers import fp8_scaled_range_tile, fp8_train_block, grouped_tile_order

__all__ = ["fp8_wgrad", "fp8_wgrad_configs"]


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


def _cfg(bn: int, bk: int, warps: int, stages: int, group: int = 8) -> triton.Config:
    return triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "GROUP_N": group, "STAGES": stages},
                         num_warps=warps, num_stages=stages)


def fp8_wgrad_configs() -> list[triton.Config]:
    """Weight-shaped outputs (thousands × thousands) and long reductions: wgmma tiles first. Both
    scales are vectors (one per row of dW and one per column), so the promotion holds more
    registers than ``fp8_gemm``'s: 128×256 tiles spill at sm_90, 128×128 with 8 warps do not."""
    return [_cfg(128, 128, 8, 4), _cfg(128, 128, 8, 3), _cfg(64, 128, 4, 4), _cfg(128, 64, 4, 4), _cfg(64, 64, 4, 5)]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """A partial last token block: no 128×128 tiles (they spill at sm_90 with the masked block)."""
    if kwargs.get("EVEN_M", True):
        return configs
    kept = [c for c in configs if c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] < 128 * 128]
    return kept or configs[-1:]


_tuned = autotune("fp8_wgrad", fp8_wgrad_configs(), key=["N", "K", "SCALE_BLOCK", "EVEN_M", "M_BUCKET"],
                  prune_configs_by={"early_config_prune": _prune})(_fp8_wgrad_kernel)


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
    Returns:
        (N, K) in out_dtype.

    Example::

        dw = fp8_wgrad(*quant_act_t(dy), *quant_act_t(x))  # dy (M, N), x (M, K) -> (N, K) float32
    """
    N, M = dy_t.shape
    K = x_t.shape[0]
    if N == 0 or K == 0:
        return
    args = (dy_t, dy_t_s, x_t, x_t_s, out, N, K, M, *dy_t.stride(), *dy_t_s.stride(), *x_t.stride(),
            *x_t_s.stride(), *out.stride(), m_bucket(M))
    consts = dict(SCALE_BLOCK=block, EVEN_M=M % block == 0)
    kernel, meta = (_tuned, {}) if config is None else (_fp8_wgrad_kernel, {"GROUP_N": 8, **dict(config)})
    kernel[lambda m: (cdiv(N, m["BLOCK_N"]) * cdiv(K, m["BLOCK_K"]),)](*args, **consts, **meta)
