"""B×1 (token-direction) FP8 quantization, written transposed: ``quant_act_t``.

Legend: M rows (tokens), K columns (features), B the scale block (128), Mb = ceil(M/B).

    x (M, K) float  ->  q_t (K, M) e4m3, s_t (K, Mb) float32,   x[m, k] ≈ q_t[k, m] · s_t[k, m // B]

The wgrad GEMM (``fp8_wgrad``) reduces over tokens, so its operands are quantized in blocks of B
tokens per feature and stored with the tokens contiguous (the layout FP8 tensor cores read).
Bit for bit ``moela.reference.quant_act_t`` (= ``quant_act`` of xᵀ): the arithmetic of
``kernels.fp8_quant`` (``tl_helpers.block_scale`` / ``saturate_to_fp8``: IEEE division,
NaN-propagating amax, saturation, ue8m0 rounding), partial edge blocks included.

One program owns B rows × BLOCK_K columns of x: it loads the tile once (rows contiguous in K),
reduces each column's amax over the B rows, and stores the quantized tile transposed (the
layout change goes through registers/shared memory, so both the load and the store are
coalesced on a GPU). ``quant_act_dual`` adds the 1×B quantization to the same read.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from moela.reference.fp8_train import check_quant_act_t

from ._common import autotune, cdiv, next_power_of_2
from .factory import kernel_op
from .tl_helpers import abs_bits, block_scale, saturate_to_fp8

__all__ = ["quant_act_t", "MAX_BLOCK"]

#: The largest scale block the kernel takes (a program holds one block of rows).
MAX_BLOCK = 256


@triton.jit
def _quant_act_t_kernel(
    x_ptr, q_ptr, s_ptr,
    M, K,
    stride_xm, stride_xk, stride_qk, stride_qm, stride_sk, stride_sm,
    BLOCK: tl.constexpr, BLOCK_P2: tl.constexpr, BLOCK_K: tl.constexpr, UE8M0: tl.constexpr,
):
    """grid: (cdiv(M, BLOCK) * num_kt,), num_kt = cdiv(K, BLOCK_K). Program p owns row block
    p // num_kt (BLOCK tokens) and columns (p % num_kt)·BLOCK_K + [0, BLOCK_K): one scale per
    column. BLOCK_P2 = next power of two >= BLOCK (masked)."""
    pid = tl.program_id(0)
    num_kt = tl.cdiv(K, BLOCK_K)
    mb = pid // num_kt
    inner = tl.arange(0, BLOCK_P2)
    rows = mb * BLOCK + inner
    cols = (pid % num_kt) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = (inner < BLOCK) & (rows < M)
    col_ok = cols < K
    mask = row_ok[:, None] & col_ok[None, :]
    rows, cols, mb = rows.to(tl.int64), cols.to(tl.int64), mb.to(tl.int64)  # offsets may pass 2**31

    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=mask, other=0.0)
    x = x.to(tl.float32)
    scale = block_scale(tl.max(abs_bits(x), 0).to(tl.float32, bitcast=True), UE8M0)  # (BLOCK_K,)
    q = saturate_to_fp8(x, scale[None, :], q_ptr.dtype.element_ty)
    q_t = tl.trans(q)  # (BLOCK_K, BLOCK_P2): tokens contiguous
    tl.store(q_ptr + cols[:, None] * stride_qk + rows[None, :] * stride_qm, q_t, mask=tl.trans(mask))
    tl.store(s_ptr + cols * stride_sk + mb * stride_sm, scale, mask=col_ok)


def _configs() -> list[triton.Config]:
    # Memory-bound: a B×BLOCK_K tile per program (32 KB of bf16 at 128×128).
    return [
        triton.Config({"BLOCK_K": 64}, num_warps=4),
        triton.Config({"BLOCK_K": 128}, num_warps=8),
        triton.Config({"BLOCK_K": 32}, num_warps=4),
        triton.Config({"BLOCK_K": 256}, num_warps=8),
    ]


_tuned = autotune("quant_act_t", _configs(), key=["K", "BLOCK"])(_quant_act_t_kernel)


def _domain(x, block=128, scale_fmt=None) -> None:
    if block > MAX_BLOCK:
        raise ValueError(f"block: the Triton quant_act_t kernel takes blocks up to {MAX_BLOCK} (one block of rows "
                         f"per program), got {block} (moela.reference.quant_act_t takes any)")


@kernel_op("quant_act_t", contract=check_quant_act_t, domain=_domain, fp8=True)
def quant_act_t(out, x: Tensor, block: int = 128, scale_fmt: str | None = None, *,
                config=None) -> tuple[Tensor, Tensor]:
    """B×1 (token-direction) e4m3 quantization written transposed, bit-exact with
    ``moela.reference.quant_act_t`` (``quant_act`` of xᵀ).

    Args:
        x: (M, K) float16/bfloat16/float32/float64, any strides (M tokens).
        block: tokens per scale (DeepSeek: 128), up to ``MAX_BLOCK``.
        scale_fmt: None (float32 ``amax/448``) or "ue8m0" (rounded up to a power of two).
    Returns:
        ``(q_t (K, M) float8_e4m3fn, s_t (K, ceil(M/block)) float32)``: the operands of
        ``fp8_wgrad``. ``quant_act_t.launch(x, out=(q_t, s_t))`` writes given buffers of any strides.

    Example::

        x_t, x_t_s = quant_act_t(x)   # x (M, K) bf16 -> (K, M) e4m3, (K, M/128) f32
    """
    q_t, s_t = out
    M, K = x.shape
    if M == 0 or K == 0:
        return
    args = (x, q_t, s_t, M, K, *x.stride(), *q_t.stride(), *s_t.stride())
    consts = dict(BLOCK=block, BLOCK_P2=next_power_of_2(block), UE8M0=scale_fmt == "ue8m0")
    kernel, meta = (_tuned, {}) if config is None else (_quant_act_t_kernel, dict(config))
    kernel[lambda m: (cdiv(M, block) * cdiv(K, m["BLOCK_K"]),)](*args, **consts, **meta)
