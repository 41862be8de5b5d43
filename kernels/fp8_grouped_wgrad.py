"""k-grouped FP8 wgrad: ``dW[e] = dy[tokens of e]ᵀ · x[tokens of e]`` for every expert in one launch.

Legend: M tokens (expert rows, grouped by expert: the reduction), N output features, K input
features, E experts, B the scale block (128), Mb = ceil(M/B).

    dy_t (N, M) e4m3,  dy_t_s (N, Mb) f32    ``quant_act_t`` of the expert rows' output gradient
    x_t  (K, M) e4m3,  x_t_s  (K, Mb) f32    ``quant_act_t`` of the expert rows' input
    offsets (E,) int32/int64                 cumulative token ends
    dw (E, N, K) float32 (default) / bf16 / fp16

DeepGEMM's ``k_grouped_fp8_gemm_tn_contiguous``: the MoE weight gradient, where each expert's
GEMM reduces over its own tokens. The grid is ``E × N-tiles × K-tiles`` (expert by expert, a
GROUP_N swizzle inside one); each program reads its expert's token range from the offsets on the
device (``tl_helpers.group_rows``: clamped into [0, M], made non-decreasing; ``validate=True``
raises on malformed offsets instead) and reduces over the global scale blocks that meet it
(``tl_helpers.fp8_scaled_range_tile``), tokens outside the range masked to zero: with group starts
at multiples of B (``make_routing(..., align=B)``) every block is the expert's own; otherwise the
first and last blocks are shared with the neighbours, each expert taking its own tokens under
the block's scale (``moela.reference.fp8_grouped_wgrad``). Experts without tokens get zeros.
Configs as ``fp8_wgrad``'s, keyed on (N, K, M's bucket); ``MOELA_FP8_GROUPED_WGRAD_CONFIG`` pins one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from moela.reference.fp8_train import check_fp8_grouped_wgrad
from moela.reference.grouped_gemm import check_offsets

from ._common import autotune, cdiv, kernel_rows, m_bucket, next_power_of_2
from .factory import kernel_op
from .tl_helpers import fp8_scaled_range_tile, fp8_train_block, group_rows, grouped_tile_order

__all__ = ["fp8_grouped_wgrad", "fp8_grouped_wgrad_configs"]


@triton.jit
def _fp8_grouped_wgrad_kernel(
    a_ptr, as_ptr, b_ptr, bs_ptr, offsets_ptr, c_ptr,
    N, K, M, E,
    stride_an, stride_am, stride_asn, stride_asm,
    stride_bk, stride_bm, stride_bsk, stride_bsm,
    stride_ce, stride_cn, stride_ck,
    M_BUCKET,  # autotune key only: _common.m_bucket(M)
    SCALE_BLOCK: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr, STAGES: tl.constexpr = 3,
):
    """grid: (E * cdiv(N, BLOCK_N) * cdiv(K, BLOCK_K),); BLOCK_E = next_power_of_2(E + 1).

    Program -> (expert e, tile of dw[e]); it reduces over tokens [offsets[e-1], offsets[e]).
    """
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    num_k = tl.cdiv(K, BLOCK_K)
    e = pid // (num_n * num_k)
    pid_n, pid_k = grouped_tile_order(pid % (num_n * num_k), num_n, num_k, GROUP_N)
    start, end = group_rows(offsets_ptr, e, E, M, BLOCK_E)
    nonempty = end > start
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)
    cols = tl.minimum(offs_k, K - 1).to(tl.int64)
    acc = fp8_scaled_range_tile(
        a_ptr, as_ptr, b_ptr, bs_ptr, rows, cols, pid_k * BLOCK_K,
        tl.where(nonempty, start, 0), tl.where(nonempty, end, 0),
        stride_an, stride_am, stride_asn, stride_asm,
        stride_bk, stride_bm, stride_bsk, stride_bsm,
        BLOCK_N, BLOCK_K, SCALE_BLOCK, True, False, STAGES,
    )
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    c_ptrs = c_ptr + e.to(tl.int64) * stride_ce + offs_n.to(tl.int64)[:, None] * stride_cn + offs_k[None, :] * stride_ck
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


def _cfg(bn: int, bk: int, warps: int, stages: int, group: int = 8) -> triton.Config:
    return triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "GROUP_N": group, "STAGES": stages},
                         num_warps=warps, num_stages=stages)


def fp8_grouped_wgrad_configs() -> list[triton.Config]:
    """As ``fp8_wgrad``'s, without the 128-row tiles: a group's partial edge blocks (done outside
    the pipelined loop) leave no registers for them (sm_90 ptxas: 128×128 tiles spill)."""
    return [_cfg(64, 128, 4, 4), _cfg(64, 128, 4, 3), _cfg(128, 64, 8, 4), _cfg(64, 256, 8, 3), _cfg(64, 64, 4, 5)]


_tuned = autotune("fp8_grouped_wgrad", fp8_grouped_wgrad_configs(), key=["N", "K", "SCALE_BLOCK", "M_BUCKET"])(
    _fp8_grouped_wgrad_kernel)


def _domain(dy_t, dy_t_s, x_t, x_t_s, offsets, out_dtype=torch.float32, block=128, *, validate=False) -> None:
    fp8_train_block("fp8_grouped_wgrad", block)
    kernel_rows("fp8_grouped_wgrad", "dy_t", dy_t.shape[1])


@kernel_op("fp8_grouped_wgrad", contract=check_fp8_grouped_wgrad, domain=_domain, fp8=True)
def fp8_grouped_wgrad(out, dy_t: Tensor, dy_t_s: Tensor, x_t: Tensor, x_t_s: Tensor, offsets: Tensor,
                      out_dtype: torch.dtype = torch.float32, block: int = 128, *, validate: bool = False,
                      config=None) -> Tensor:
    """The k-grouped weight gradient in FP8 (``moela.reference.fp8_grouped_wgrad``), without a host sync.

    Args:
        dy_t: (N, M), x_t: (K, M) float8_e4m3fn with (N, ceil(M/block)), (K, ceil(M/block)) float32
            scales: ``quant_act_t`` of the expert rows' output gradient and input.
        offsets: (E,) int32/int64 cumulative token ends (malformed values: the module docstring).
        validate: check the offsets' values (synchronises) and raise ValueError if malformed.
    Returns:
        (E, N, K) in out_dtype.

    Example::

        plan = make_routing(ids, E, align=128)            # expert segments start at block edges
        dw13 = fp8_grouped_wgrad(*quant_act_t(dh), *quant_act_t(xs), plan.offsets)  # (E, 2I, D)
    """
    N, M = dy_t.shape
    K, E = x_t.shape[0], offsets.shape[0]
    if validate:
        check_offsets(offsets, M)
    if out.numel() == 0:
        return
    offsets = offsets.contiguous()  # the kernel indexes it flat
    args = (dy_t, dy_t_s, x_t, x_t_s, offsets, out, N, K, M, E, *dy_t.stride(), *dy_t_s.stride(), *x_t.stride(),
            *x_t_s.stride(), *out.stride(), m_bucket(M))
    consts = dict(SCALE_BLOCK=block, BLOCK_E=next_power_of_2(E + 1))
    kernel, meta = (_tuned, {}) if config is None else (_fp8_grouped_wgrad_kernel, {"GROUP_N": 8, **dict(config)})
    kernel[lambda m: (E * cdiv(N, m["BLOCK_N"]) * cdiv(K, m["BLOCK_K"]),)](*args, **consts, **meta)
