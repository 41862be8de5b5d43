"""FP8 dgrad GEMM: ``dx = dy · W`` with the forward's 128×128 weight blocks used transposed.

Legend: M rows (tokens), N output features of the forward (the reduction here), K input features,
B the scale block (128), Nb = ceil(N/B), Kb = ceil(K/B).

    dy (M, N) e4m3,  dy_s (M, Nb) f32     ``quant_act`` of the output gradient (1×B along N)
    w  (N, K) e4m3,  w_s (Nb, Kb) f32     the forward's weight and ``weight_scale_inv``, as stored
    dx (M, K) bf16 / fp16 / fp32

Per B-block nb of the reduction: ``p = dy[:, nb] · w[nb, :]`` on the tensor cores into a fresh
float32 tile, ``acc += p · (dy_s[:, nb] ⊗ w_s[nb, k // B])`` (DeepSeek's per-128 promotion; the
combined scale is formed first, as ``fp8_gemm`` does). A B×B weight block is square, so the
forward's quantization serves the transposed product unchanged (DeepSeek-V3 report §3.3.2).

FP8 wgmma takes its operands with the reduction contiguous, so the kernel reads w from a copy
with N contiguous: ``w`` as given when ``w.stride(0) == 1`` (``w.t().contiguous().t()``, what
``model.fp8_training.FP8WeightCache`` keeps once per optimizer step), else the launcher makes that
copy first (one extra pass over the e4m3 weight). Both operands then stream through the
software pipeline (``cp.async``, the scales with them: ``tl_helpers.fp8_scaled_range_tile``). A
partial last block of the reduction (N not a multiple of B) is done after the main loop with
masked loads; rows past M and columns past K are clamped for loads and masked for stores.
Configs: by M class (decode M <= 64, medium <= 512, large), keyed on (N, K);
``MOELA_FP8_DGRAD_<CLASS>_CONFIG`` pins one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from moela.reference.fp8_train import check_fp8_dgrad

from ._common import autotune, cdiv
from .factory import kernel_op
from .tl_helpers import fp8_scaled_range_tile, fp8_train_block, grouped_tile_order

__all__ = ["fp8_dgrad", "fp8_dgrad_configs"]


@triton.jit
def _fp8_dgrad_kernel(
    dy_ptr, dys_ptr, w_ptr, ws_ptr, dx_ptr,
    M, N, K,
    stride_dym, stride_dyn, stride_dysm, stride_dysn,
    stride_wn, stride_wk, stride_wsn, stride_wsk,
    stride_dxm, stride_dxk,
    SCALE_BLOCK: tl.constexpr, EVEN_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, STAGES: tl.constexpr = 3,
):
    """dx[M, K] = Σ_nb promote(dy_nb · w_nb) · dy_s · w_s, the reduction tile = SCALE_BLOCK.

    grid: (cdiv(M, BLOCK_M) * cdiv(K, BLOCK_K),); each program owns one (BLOCK_M, BLOCK_K) tile of
    dx and runs cdiv(N, SCALE_BLOCK) steps.
    """
    pid = tl.program_id(0)
    pid_m, pid_k = grouped_tile_order(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rows = tl.minimum(offs_m, M - 1).to(tl.int64)
    cols = tl.minimum(offs_k, K - 1).to(tl.int64)
    # "b" of the shared main loop is wᵀ (K, N): b[k, n] = w[n, k], its block scale w_s[n // B, k // B]
    acc = fp8_scaled_range_tile(
        dy_ptr, dys_ptr, w_ptr, ws_ptr, rows, cols, pid_k * BLOCK_K, 0, N,
        stride_dym, stride_dyn, stride_dysm, stride_dysn,
        stride_wk, stride_wn, stride_wsk, stride_wsn,
        BLOCK_M, BLOCK_K, SCALE_BLOCK, False, EVEN_N, STAGES,
    )
    mask = (offs_m < M)[:, None] & (offs_k < K)[None, :]
    dx_ptrs = dx_ptr + offs_m.to(tl.int64)[:, None] * stride_dxm + offs_k[None, :] * stride_dxk
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=mask)


def _cfg(bm: int, bk: int, warps: int, stages: int, group_m: int = 8) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_K": bk, "GROUP_M": group_m, "STAGES": stages},
                         num_warps=warps, num_stages=stages)


def fp8_dgrad_configs(cls: str) -> list[triton.Config]:
    """Hopper configs per M class (first = default), ``fp8_gemm``'s reasoning: the promotion keeps
    two float32 tiles live, so at most ~64 accumulators per thread (128×128 with 8 warps)."""
    if cls == "small":
        return [_cfg(16, 64, 4, 4), _cfg(16, 128, 4, 4), _cfg(32, 64, 4, 4), _cfg(64, 64, 4, 4)]
    if cls == "medium":
        return [_cfg(64, 64, 4, 4), _cfg(64, 128, 4, 4), _cfg(128, 64, 4, 4), _cfg(128, 128, 8, 4)]
    return [_cfg(128, 128, 8, 4), _cfg(64, 128, 4, 4), _cfg(128, 64, 4, 4), _cfg(128, 128, 8, 3),
            _cfg(64, 256, 8, 3)]


def _m_class(M: int) -> str:
    return "small" if M <= 64 else "medium" if M <= 512 else "large"


_KEY = ["N", "K", "SCALE_BLOCK", "EVEN_N"]
_TUNED = {cls: autotune(f"fp8_dgrad_{cls}", fp8_dgrad_configs(cls), key=_KEY)(_fp8_dgrad_kernel)
          for cls in ("small", "medium", "large")}


def _domain(dy, dy_s, w, w_s, out_dtype=torch.bfloat16, block=128) -> None:
    fp8_train_block("fp8_dgrad", block)


@kernel_op("fp8_dgrad", contract=check_fp8_dgrad, domain=_domain, fp8=True)
def fp8_dgrad(out, dy: Tensor, dy_s: Tensor, w: Tensor, w_s: Tensor, out_dtype: torch.dtype = torch.bfloat16,
              block: int = 128, *, config=None) -> Tensor:
    """``dx = dy · W`` in FP8 with W's block scales used transposed (``moela.reference.fp8_dgrad``).

    Args:
        dy: (M, N) float8_e4m3fn, dy_s: (M, ceil(N/block)) float32 (any strides): ``quant_act`` of
            the output gradient.
        w: (N, K) float8_e4m3fn, w_s: (ceil(N/block), ceil(K/block)) float32: the forward's weight
            (any strides; a copy with N contiguous, strides (1, N), is read as it is, any other
            layout is copied so first).
        out_dtype: bfloat16 (default), float16 or float32.
        block: the scale block: 32, 64, 128 (DeepSeek) or 256.
    Returns:
        (M, K) in out_dtype.

    Example::

        dq, ds = quant_act(dy)                  # dy (M, N) bf16
        dx = fp8_dgrad(dq, ds, w_fp8, w_scale)  # (M, K) bf16
    """
    M, N = dy.shape
    K = w.shape[1]
    if M == 0 or K == 0:
        return
    if w.stride(0) != 1 and N > 1:  # the reduction contiguous (module docstring)
        w = w.t().contiguous().t()
    args = (dy, dy_s, w, w_s, out, M, N, K, *dy.stride(), *dy_s.stride(), *w.stride(), *w_s.stride(), *out.stride())
    consts = dict(SCALE_BLOCK=block, EVEN_N=N % block == 0)
    if config is None:
        kernel, meta = _TUNED[_m_class(M)], {}
    else:
        kernel, meta = _fp8_dgrad_kernel, {"GROUP_M": 8, **dict(config)}
    kernel[lambda m: (cdiv(M, m["BLOCK_M"]) * cdiv(K, m["BLOCK_K"]),)](*args, **consts, **meta)
