"""Drop-in FP8 linear for model code: ``y = x · Wᵀ (+ bias)`` with DeepSeek's FP8 weights.

Legend: x (..., K) activations (any leading shape), W (N, K) float8_e4m3fn weight with its
``weight_scale_inv`` (ceil(N/B), K/B) float32 (one scale per B×B block, B = 128: the name and
meaning of DeepSeek-V3's checkpoint tensors, ``W ≈ weight · weight_scale_inv``).

Two launches, no host sync: the activation is quantized on the fly (1×B e4m3, ``quant_act``),
its scales written straight into the column-major layout ``fp8_gemm`` reads fastest, then the
block-scaled GEMM runs with the bias added to its float32 accumulator and the result cast once to
``x.dtype``. Semantics (what the model's reference path computes):

    q, s = reference.quant_act(x, B, scale_fmt)
    y = (reference.fp8_gemm(q, s, weight, weight_scale_inv, torch.float32) + bias).to(x.dtype)

Inference only: no autograd formula (the weight is FP8 and frozen).
"""

from __future__ import annotations

import torch

from moela.kernels._common import cdiv, on_tensor_device, run_direct
from moela.kernels.fp8_gemm import check_fp8_block, fp8_gemm_fwd
from moela.kernels.fp8_quant import FP8_DTYPE, check_scale_fmt, empty_col_major_scales, quant_act_fwd
from moela.reference._checks import check_same_device, check_tensor

__all__ = ["fp8_linear", "fp8_linear_fwd", "X_DTYPES"]

X_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _check(x, weight, weight_scale_inv, bias, scale_fmt, block):
    check_tensor("x", x, dtypes=X_DTYPES)
    check_tensor("weight", weight, ndim=2, dtypes=(FP8_DTYPE,))
    check_fp8_block(block)
    check_scale_fmt(scale_fmt)
    if x.ndim == 0:
        raise ValueError("x: expected at least 1 dimension (..., K), got a scalar")
    N, K = weight.shape
    if x.shape[-1] != K:
        raise ValueError(f"x: expected last dim K={K} to match weight {tuple(weight.shape)}, "
                         f"got shape {tuple(x.shape)}")
    if K % block:
        raise ValueError(f"weight: expected in_features to be a multiple of block={block}, got K={K}")
    check_tensor("weight_scale_inv", weight_scale_inv, dtypes=(torch.float32,), shape=(cdiv(N, block), K // block))
    if bias is not None:
        check_tensor("bias", bias, dtypes=X_DTYPES, shape=(N,))
    # here, not in fp8_gemm, whose messages would name its own arguments ("b", "b_s")
    check_same_device(x=x, weight=weight, weight_scale_inv=weight_scale_inv, bias=bias)
    return N, K


@on_tensor_device
def fp8_linear_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale_inv: torch.Tensor,
    bias: torch.Tensor | None = None,
    scale_fmt: str | None = None,
    block: int = 128,
) -> torch.Tensor:
    """Quantize ``x`` (column-major scales) and run the block-scaled GEMM; see the module docstring."""
    N, K = _check(x, weight, weight_scale_inv, bias, scale_fmt, block)
    x2 = x.reshape(-1, K)
    R = x2.shape[0]
    q, s = quant_act_fwd(x2, block, scale_fmt, scale_out=empty_col_major_scales(R, K // block, x.device))
    y = fp8_gemm_fwd(q, s, weight, weight_scale_inv, x.dtype, block, bias=bias)
    return y.reshape(*x.shape[:-1], N)


@torch.library.custom_op("moela::fp8_linear", mutates_args=())
def _fp8_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale_inv: torch.Tensor,
    bias: torch.Tensor | None = None,
    scale_fmt: str | None = None,
    block: int = 128,
) -> torch.Tensor:
    return fp8_linear_fwd(x, weight, weight_scale_inv, bias, scale_fmt, block)


@_fp8_linear_op.register_fake
def _(x, weight, weight_scale_inv, bias=None, scale_fmt=None, block=128):
    N, _ = _check(x, weight, weight_scale_inv, bias, scale_fmt, block)
    return x.new_empty((*x.shape[:-1], N))


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale_inv: torch.Tensor,
    bias: torch.Tensor | None = None,
    scale_fmt: str | None = None,
    block: int = 128,
) -> torch.Tensor:
    """``F.linear`` with an FP8 weight in DeepSeek's checkpoint format; bf16 (or fp16/fp32) in and out.

    Args:
        x: (..., K) bfloat16/float16/float32, any leading shape.
        weight: (N, K) float8_e4m3fn; K a multiple of ``block``.
        weight_scale_inv: (ceil(N/block), K/block) float32.
        bias: optional (N,), added in float32 before the cast.
        scale_fmt: activation scales, None (float32) or "ue8m0" (DeepSeek-V3.1+ configs).
    Returns:
        (..., N) in x.dtype.

    Example::

        w, w_s = quant_weight(linear.weight)            # or a DeepSeek checkpoint's tensors
        y = fp8_linear(x, w, w_s, linear.bias)
    """
    if run_direct(x, weight, weight_scale_inv, bias):  # eager, nothing to record: the launcher itself (same bits)
        return fp8_linear_fwd(x, weight, weight_scale_inv, bias, scale_fmt, block)
    return _fp8_linear_op(x, weight, weight_scale_inv, bias, scale_fmt, block)
