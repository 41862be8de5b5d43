"""SwiGLU between the expert GEMMs, fused: ``out = silu(gate) * up`` in one pass (and its backward).

Legend: M rows (tokens or expert rows), N the expert hidden dim (``moe_inter_dim``).

``moela.reference.swiglu`` is two torch kernels (``F.silu``, then ``*``) that write and read a
rounded ``silu(gate)`` in between; here each element is read once and written once: in the
MoE layer ``gate`` and ``up`` are the two column halves of the first grouped GEMM's output
(strided views, no copy), and the result is the contiguous input of the second. At prefill
that is 3 instead of 5 M×N tensor passes; at decode one launch instead of two.

``fp8=True`` (FP8 experts): the activation is quantized in the same pass, 1×block e4m3 with a
float32 scale per block (``quant_act``'s arithmetic, bit for bit ``quant_act(swiglu(gate, up))``),
so the 16-bit activation is never written: the down projection's FP8 input in one kernel.

Arithmetic (as torch's CUDA kernels, so the bf16/fp16 results are torch's bits up to ``exp``):
``s = g / (1 + exp(-g))`` in float32 with libdevice's ``exp`` and an IEEE division, rounded to
the input dtype (torch stores ``silu(gate)`` at that precision), then ``out = s · up`` in float32
rounded once. No FMA contraction. Backward, in float32 with one rounding per output:
``d_up = dy · s`` and ``d_gate = dy · up · σ(g) · (1 + g · (1 − σ(g)))``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from moela import knobs
from moela.reference._checks import TensorSpec, check_bool, check_tensor
from moela.reference.moe import check_swiglu

from ._common import autotune, cdiv, kernel_dtype, m_bucket, next_power_of_2
from .factory import kernel_op
from .tl_helpers import abs_bits, block_scale, div, exp, saturate_to_fp8

__all__ = ["swiglu", "swiglu_op", "swiglu_fp8_op", "swiglu_bwd_op", "KERNEL_DTYPES"]

#: libdevice's exp on a GPU; under the interpreter (decided when the kernels were decorated, at
#: import, as Triton decides it) exp in float64 rounded (numpy's float32 exp is off by an ulp).
_PRECISE = not knobs.interpret()

#: Input dtypes of the kernels (float32 arithmetic for all).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_NO_FMA = dict(enable_fp_fusion=False)


def _configs() -> list[triton.Config]:
    """Elementwise and memory-bound: 16-byte accesses along N, a few KB per program."""
    return [
        triton.Config({"BLOCK_M": 4, "BLOCK_N": 512}, num_warps=4),
        triton.Config({"BLOCK_M": 8, "BLOCK_N": 256}, num_warps=4),
        triton.Config({"BLOCK_M": 1, "BLOCK_N": 1024}, num_warps=4),  # decode: few rows, wide
        triton.Config({"BLOCK_M": 16, "BLOCK_N": 512}, num_warps=8),  # prefill: fewer programs
    ]


@triton.jit
def _silu(g, PRECISE: tl.constexpr):
    """silu in float32 as torch computes it: ``g / (1 + exp(-g))``."""
    return div(g, 1.0 + exp(-g, PRECISE), False)


@triton.jit
def _tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's rows and columns (64-bit: any strides) and their in-bounds mask."""
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    return offs_m, offs_n, (offs_m < M)[:, None] & (offs_n < N)[None, :]


@triton.jit
def _load(ptr, offs_m, offs_n, stride_m, stride_n, mask):
    return tl.load(ptr + offs_m[:, None] * stride_m + offs_n[None, :] * stride_n, mask=mask, other=0.0)


@triton.jit
def _swiglu_fwd_kernel(
    g_ptr, u_ptr, out_ptr, M, N,
    stride_gm, stride_gn, stride_um, stride_un, stride_om, stride_on,
    M_BUCKET,  # autotune key only: _common.m_bucket(M)
    PRECISE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """grid: (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)); one BLOCK_M × BLOCK_N tile per program."""
    offs_m, offs_n, mask = _tile(M, N, BLOCK_M, BLOCK_N)
    g = _load(g_ptr, offs_m, offs_n, stride_gm, stride_gn, mask)
    u = _load(u_ptr, offs_m, offs_n, stride_um, stride_un, mask)
    s = _silu(g.to(tl.float32), PRECISE).to(g.dtype)  # torch keeps silu(gate) at the input precision
    out = s.to(tl.float32) * u.to(tl.float32)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on, out.to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    g_ptr, u_ptr, dy_ptr, dg_ptr, du_ptr, M, N,
    stride_gm, stride_gn, stride_um, stride_un, stride_dym, stride_dyn, stride_dgm, stride_dum,
    M_BUCKET,  # autotune key only
    PRECISE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """d_gate and d_up (contiguous rows, unit column stride) of one tile."""
    offs_m, offs_n, mask = _tile(M, N, BLOCK_M, BLOCK_N)
    g = _load(g_ptr, offs_m, offs_n, stride_gm, stride_gn, mask)
    u = _load(u_ptr, offs_m, offs_n, stride_um, stride_un, mask)
    dy = _load(dy_ptr, offs_m, offs_n, stride_dym, stride_dyn, mask)
    g32, dy32 = g.to(tl.float32), dy.to(tl.float32)
    sig = div(tl.full(g32.shape, 1.0, tl.float32), 1.0 + exp(-g32, PRECISE), False)
    s = _silu(g32, PRECISE).to(g.dtype).to(tl.float32)  # the forward's rounded silu
    du = dy32 * s
    dg = dy32 * u.to(tl.float32) * (sig * (1.0 + g32 * (1.0 - sig)))
    tl.store(du_ptr + offs_m[:, None] * stride_dum + offs_n[None, :], du.to(du_ptr.dtype.element_ty), mask=mask)
    tl.store(dg_ptr + offs_m[:, None] * stride_dgm + offs_n[None, :], dg.to(dg_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_fp8_kernel(
    g_ptr, u_ptr, q_ptr, s_ptr, M, N, num_kb,
    stride_gm, stride_gn, stride_um, stride_un, stride_qm, stride_sm, stride_sk,
    M_BUCKET,  # autotune key only
    PRECISE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_P2: tl.constexpr, BLOCK_M: tl.constexpr,
    UE8M0: tl.constexpr,
):
    """swiglu then 1×BLOCK e4m3 quantization of one (BLOCK_M, BLOCK) tile (``_quant_act_kernel``'s
    tiling: grid (cdiv(M, BLOCK_M) * num_kb,), neighbouring programs on neighbouring K blocks)."""
    pid = tl.program_id(0)
    kb = pid % num_kb
    rows = ((pid // num_kb) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    inner = tl.arange(0, BLOCK_P2)
    cols = (kb * BLOCK + inner).to(tl.int64)
    mask = (rows < M)[:, None] & ((inner < BLOCK) & (cols < N))[None, :]
    g = tl.load(g_ptr + rows[:, None] * stride_gm + cols[None, :] * stride_gn, mask=mask, other=0.0)
    u = tl.load(u_ptr + rows[:, None] * stride_um + cols[None, :] * stride_un, mask=mask, other=0.0)
    s = _silu(g.to(tl.float32), PRECISE).to(g.dtype)
    x = (s.to(tl.float32) * u.to(tl.float32)).to(g.dtype).to(tl.float32)  # swiglu's bits (masked: 0)
    scale = block_scale(tl.max(abs_bits(x), 1).to(tl.float32, bitcast=True), UE8M0)
    q = saturate_to_fp8(x, scale[:, None], q_ptr.dtype.element_ty)
    tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :], q, mask=mask)
    tl.store(s_ptr + rows * stride_sm + kb * stride_sk, scale, mask=rows < M)


def _fp8_configs() -> list[triton.Config]:
    """As quant_act's: rows per program, BLOCK (the scale block) wide."""
    return [triton.Config({"BLOCK_M": 32}, num_warps=4), triton.Config({"BLOCK_M": 8}, num_warps=2),
            triton.Config({"BLOCK_M": 64}, num_warps=8)]


# keyed on M's power-of-two bucket too: decode (a few rows) and prefill pick their own tiles
_fp8_tuned = autotune("swiglu_fp8", _fp8_configs(), key=["N", "BLOCK", "M_BUCKET"])(
    _swiglu_fp8_kernel)
_fwd_tuned = autotune("swiglu", _configs(), key=["N", "M_BUCKET"])(_swiglu_fwd_kernel)
_bwd_tuned = autotune("swiglu_bwd", _configs(), key=["N", "M_BUCKET"])(_swiglu_bwd_kernel)


# ----------------------------------------------------------------------------------------
# The ops (kernels.factory) and the public function
# ----------------------------------------------------------------------------------------


def _grid(M: int, N: int):
    return lambda meta: (cdiv(M, meta["BLOCK_M"]), cdiv(N, meta["BLOCK_N"]))


def _rows(*ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(..., N) tensors as (M, N) (views where the strides allow; outputs are always views)."""
    if ts[0].ndim == 2:
        return ts
    N = ts[0].shape[-1]
    M = ts[0].numel() // N if N else 0
    return tuple(t.reshape(M, N) for t in ts)


def _config(config: triton.Config | None) -> dict:
    return {} if config is None else config.all_kwargs()


def _check_swiglu_op(gate, up) -> TensorSpec:
    return check_swiglu(gate, up)


def _domain(gate, up) -> None:
    kernel_dtype("swiglu", "gate", gate, KERNEL_DTYPES)


def _setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, dy: torch.Tensor):
    gate, up = ctx.saved_tensors
    dg, du = swiglu_bwd_op(dy, gate, up)
    return (dg if ctx.needs_input_grad[0] else None), (du if ctx.needs_input_grad[1] else None)


@kernel_op("swiglu", contract=_check_swiglu_op, domain=_domain, backward=_backward, setup_context=_setup)
def swiglu_op(out, gate: Tensor, up: Tensor, *, config=None) -> Tensor:
    """``silu(gate) * up`` in gate's dtype; gate, up (..., N) fp16/bf16/fp32, any strides."""
    if gate.numel() == 0:
        return
    if out.untyped_storage().data_ptr() in (gate.untyped_storage().data_ptr(), up.untyped_storage().data_ptr()):
        raise ValueError("out: must not share memory with gate or up (autotuning reruns the kernel)")
    gate, up = _rows(gate, up)
    out = out.view(gate.shape) if out.ndim != 2 else out
    M, N = gate.shape
    kernel = _fwd_tuned if config is None else _swiglu_fwd_kernel
    kernel[_grid(M, N)](
        gate, up, out, M, N, *gate.stride(), *up.stride(), *out.stride(), m_bucket(M),
        PRECISE=_PRECISE, **_NO_FMA, **_config(config),
    )


def _check_fp8_op(gate, up, block=128, scale_fmt=None) -> tuple[TensorSpec, TensorSpec]:
    return check_swiglu(gate, up, fp8=True, block=block, scale_fmt=scale_fmt)


def _fp8_domain(gate, up, block=128, scale_fmt=None) -> None:
    kernel_dtype("swiglu", "gate", gate, KERNEL_DTYPES)
    if block > 1024:
        raise ValueError(f"block: the Triton swiglu(fp8=True) kernel takes blocks up to 1024, got {block} "
                         f"(moela.reference.swiglu takes any)")


@kernel_op("swiglu_fp8", contract=_check_fp8_op, domain=_fp8_domain, fp8=True)
def swiglu_fp8_op(out, gate: Tensor, up: Tensor, block: int = 128, scale_fmt: str | None = None, *,
                  config=None) -> tuple[Tensor, Tensor]:
    """``quant_act(swiglu(gate, up), block, scale_fmt)`` bit for bit in one pass:
    ``(q (M, N) e4m3, scale (M, ceil(N/block)) float32)``, both contiguous. No gradient."""
    q, s = out
    if not q.is_contiguous():
        raise ValueError(f"out[0]: expected a contiguous tensor, got strides {q.stride()}")
    if gate.numel() == 0:
        return
    gate, up = _rows(gate, up)
    M, N = gate.shape
    num_kb = cdiv(N, block)
    q, s = q.view(M, N), s.view(M, num_kb)
    kernel = _fp8_tuned if config is None else _swiglu_fp8_kernel
    kernel[lambda meta: (cdiv(M, meta["BLOCK_M"]) * num_kb,)](
        gate, up, q, s, M, N, num_kb, *gate.stride(), *up.stride(), q.stride(0), *s.stride(), m_bucket(M),
        PRECISE=_PRECISE, BLOCK=block, BLOCK_P2=next_power_of_2(block), UE8M0=scale_fmt == "ue8m0",
        **_NO_FMA, **_config(config),
    )


def _check_bwd(dy, gate, up) -> tuple[TensorSpec, TensorSpec]:
    spec = check_swiglu(gate, up)
    check_tensor("dy", dy, dtypes=(gate.dtype,), shape=tuple(gate.shape))
    return spec, spec


@kernel_op("swiglu_bwd", contract=_check_bwd)
def swiglu_bwd_op(out, dy: Tensor, gate: Tensor, up: Tensor, *, config=None) -> tuple[Tensor, Tensor]:
    """The backward: ``(d_gate, d_up)``, contiguous (M, N) in gate's dtype (module docstring)."""
    dg, du = out
    if not (dg.is_contiguous() and du.is_contiguous()):
        raise ValueError("out: expected contiguous (d_gate, d_up) buffers")
    if gate.numel() == 0:
        return
    gate, up, dy = _rows(gate, up, dy)
    M, N = gate.shape
    dg, du = dg.view(M, N), du.view(M, N)
    kernel = _bwd_tuned if config is None else _swiglu_bwd_kernel
    kernel[_grid(M, N)](
        gate, up, dy, dg, du, M, N, *gate.stride(), *up.stride(), *dy.stride(), dg.stride(0), du.stride(0), m_bucket(M),
        PRECISE=_PRECISE, **_NO_FMA, **_config(config),
    )


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, fp8: bool = False, block: int = 128,
           scale_fmt: str | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``silu(gate) * up`` in one kernel (``moela.reference.swiglu``'s contract, differentiable).

    Args:
        gate, up: (..., N) fp16/bf16/fp32 on CUDA (or CPU under the interpreter), any strides: in
            the MoE layer the two column halves of the first grouped GEMM's (M, 2N) output.
        fp8: return the activation quantized instead, ``(q e4m3, scale float32)``, bit for bit
            ``quant_act(swiglu(gate, up), block, scale_fmt)`` (no gradient).
    Returns:
        gate's shape, contiguous, in gate's dtype; ``silu(gate)`` rounded to that dtype before the
        product, as torch's two kernels round it. Gradients flow to gate and up.

    Example::

        h = grouped_gemm(xs, w13, plan.offsets)   # (M, 2I): gate | up
        a = swiglu(h[:, :I], h[:, I:])            # (M, I), contiguous
        q, s = swiglu(h[:, :I], h[:, I:], fp8=True)  # FP8 down projection input
    """
    if check_bool("fp8", fp8):
        return swiglu_fp8_op(gate, up, block, scale_fmt)
    return swiglu_op(gate, up)
