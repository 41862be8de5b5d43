"""Drop-in FP8 linear for model code: ``y = x · Wᵀ (+ bias)`` with DeepSeek's FP8 weights.

Legend: x (..., K) activations (any leading shape), W (N, K) float8_e4m3fn weight with its
``weight_scale_inv`` (ceil(N/B), K/B) float32 (one scale per B×B block, B = 128: the name and
meaning of DeepSeek-V3's checkpoint tensors, ``W ≈ weight · weight_scale_inv``).

Two launches, no host sync: the activation is quantized on the fly (1×B e4m3, ``quant_act``),
its scales written straight into the column-major layout ``fp8_gemm`` reads fastest, then the
block-scaled GEMM runs with the bias added to its float32 accumulator and the result cast once to
``x.dtype``: ``moela.reference.fp8_linear``, the definition. Inference only: no autograd formula
(the weight is FP8 and frozen).
"""

from __future__ import annotations

from torch import Tensor

from moela.reference.fp8 import check_fp8_linear

from .factory import kernel_op
from .fp8_gemm import fp8_kernel_block, launch_fp8_gemm
from .fp8_quant import FP8_DTYPE, empty_col_major_scales, quant_act

__all__ = ["fp8_linear"]


def _domain(x, weight, weight_scale_inv, bias=None, scale_fmt=None, block=128) -> None:
    fp8_kernel_block("fp8_linear", block, weight.shape[1], "weight")


@kernel_op("fp8_linear", contract=check_fp8_linear, domain=_domain, fp8=True)
def fp8_linear(out, x: Tensor, weight: Tensor, weight_scale_inv: Tensor, bias: Tensor | None = None,
               scale_fmt: str | None = None, block: int = 128, *, config=None) -> Tensor:
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
    N, K = weight.shape
    x2 = x.reshape(-1, K)
    R = x2.shape[0]
    q = x2.new_empty(x2.shape, dtype=FP8_DTYPE)
    s = empty_col_major_scales(R, K // block, x.device)
    quant_act.launch(x2, block, scale_fmt, out=(q, s))
    launch_fp8_gemm(out.view(R, N), q, s, weight, weight_scale_inv, block, bias, config)
