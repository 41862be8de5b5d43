"""Both FP8 quantizations of an activation from one read: ``quant_act_dual``.

Legend: M rows (tokens), K columns, B the scale block (128), Mb = ceil(M/B), Kb = ceil(K/B).

    x (M, K)  ->  q (M, K) e4m3,   s (M, Kb)    1×B along K: fprop / dgrad operand (``quant_act``)
                  q_t (K, M) e4m3, s_t (K, Mb)  B×1 along M, transposed: wgrad operand (``quant_act_t``)

A training step needs both of every activation that enters a linear layer (x for fprop and wgrad,
dy for dgrad and wgrad). Two separate quantizers read x twice; here one program loads a B×B
tile of x once, reduces its row amaxes (B scales of ``s``) and its column amaxes (B scales of
``s_t``), and writes both e4m3 tiles: 2 bytes read and 2 written per bf16 element instead of
4 read and 2 written. Bit for bit ``moela.reference.quant_act_dual`` (``tl_helpers``' block
scale and saturation, partial edge blocks included).
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from moela.reference.fp8_train import check_quant_act_dual

from ._common import cdiv, next_power_of_2
from .factory import kernel_op
from .tl_helpers import abs_bits, block_scale, saturate_to_fp8

__all__ = ["quant_act_dual", "MAX_BLOCK"]

#: The largest scale block the kernel takes (a program holds one block×block tile).
MAX_BLOCK = 256


@triton.jit
def _quant_act_dual_kernel(
    x_ptr, q_ptr, s_ptr, qt_ptr, st_ptr,
    M, K, num_kb,
    stride_xm, stride_xk, stride_qm, stride_qk, stride_sm, stride_sk,
    stride_qtk, stride_qtm, stride_stk, stride_stm,
    BLOCK: tl.constexpr, BLOCK_P2: tl.constexpr, UE8M0: tl.constexpr,
):
    """grid: (cdiv(M, BLOCK) * num_kb,). Program p owns the BLOCK×BLOCK tile (p // num_kb, p % num_kb):
    neighbouring programs walk along a row block. BLOCK_P2 = next power of two >= BLOCK (masked)."""
    pid = tl.program_id(0)
    mb = pid // num_kb
    kb = pid % num_kb
    inner = tl.arange(0, BLOCK_P2)
    rows = mb * BLOCK + inner
    cols = kb * BLOCK + inner
    row_ok = (inner < BLOCK) & (rows < M)
    col_ok = (inner < BLOCK) & (cols < K)
    mask = row_ok[:, None] & col_ok[None, :]
    rows, cols, mb, kb = rows.to(tl.int64), cols.to(tl.int64), mb.to(tl.int64), kb.to(tl.int64)

    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=mask, other=0.0)
    x = x.to(tl.float32)
    bits = abs_bits(x)
    # 1×B along K: one scale per row of the tile
    s = block_scale(tl.max(bits, 1).to(tl.float32, bitcast=True), UE8M0)
    q = saturate_to_fp8(x, s[:, None], q_ptr.dtype.element_ty)
    tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :] * stride_qk, q, mask=mask)
    tl.store(s_ptr + rows * stride_sm + kb * stride_sk, s, mask=row_ok)
    # B×1 along M: one scale per column, stored transposed (tokens contiguous)
    s_t = block_scale(tl.max(bits, 0).to(tl.float32, bitcast=True), UE8M0)
    q_t = tl.trans(saturate_to_fp8(x, s_t[None, :], qt_ptr.dtype.element_ty))
    tl.store(qt_ptr + cols[:, None] * stride_qtk + rows[None, :] * stride_qtm, q_t, mask=tl.trans(mask))
    tl.store(st_ptr + cols * stride_stk + mb * stride_stm, s_t, mask=col_ok)


def _domain(x, block=128, scale_fmt=None) -> None:
    if block > MAX_BLOCK:
        raise ValueError(f"block: the Triton quant_act_dual kernel takes blocks up to {MAX_BLOCK} (one block×block "
                         f"tile per program), got {block} (moela.reference.quant_act_dual takes any)")


@kernel_op("quant_act_dual", contract=check_quant_act_dual, domain=_domain, fp8=True)
def quant_act_dual(out, x: Tensor, block: int = 128, scale_fmt: str | None = None, *,
                   config=None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(*quant_act(x), *quant_act_t(x))`` from one read of x, bit-exact with
    ``moela.reference.quant_act_dual``.

    Args:
        x: (M, K) float16/bfloat16/float32/float64, any strides.
        block: the scale block in both directions (DeepSeek: 128), up to ``MAX_BLOCK``.
        scale_fmt: None (float32 ``amax/448``) or "ue8m0".
    Returns:
        ``(q (M, K) e4m3, s (M, ceil(K/B)) f32, q_t (K, M) e4m3, s_t (K, ceil(M/B)) f32)``;
        ``quant_act_dual.launch(x, out=(...))`` writes given buffers of any strides (column-major
        ``s``: ``fp8_quant.empty_col_major_scales``).

    Example::

        q, s, q_t, s_t = quant_act_dual(x)        # x (M, K) bf16
        y = fp8_gemm(q, s, w, w_s)                # fprop
        dw = fp8_wgrad(dy_t, dy_t_s, q_t, s_t)    # wgrad, later
    """
    q, s, q_t, s_t = out
    M, K = x.shape
    if M == 0 or K == 0:
        return
    num_kb = cdiv(K, block)
    bp2 = next_power_of_2(block)
    _quant_act_dual_kernel[(cdiv(M, block) * num_kb,)](
        x, q, s, q_t, s_t, M, K, num_kb,
        *x.stride(), *q.stride(), *s.stride(), *q_t.stride(), *s_t.stride(),
        BLOCK=block, BLOCK_P2=bp2, UE8M0=scale_fmt == "ue8m0",
        **(dict(config) if config else {"num_warps": 8 if bp2 >= 128 else 4}),
    )
