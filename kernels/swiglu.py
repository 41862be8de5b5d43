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

from moela.reference._checks import check_positive_int, check_same_device, check_tensor

from ._common import (
    autotune,
    autotune_configs,
    cdiv,
    check_kernel_device,
    m_bucket,
    next_power_of_2,
    on_tensor_device,
    run_direct,
)
from .fp8_quant import (
    FP8_DTYPE,
    _abs_bits,
    _block_scale,
    _check_device,
    _saturate_to_fp8,
    check_scale_fmt,
)
from .gate import _div, _exp
from .interpreter import interpreter_active

__all__ = ["swiglu", "swiglu_fwd", "swiglu_fp8_fwd", "swiglu_bwd", "KERNEL_DTYPES"]

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
    return _div(g, 1.0 + _exp(-g, PRECISE), False)


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
    sig = _div(tl.full(g32.shape, 1.0, tl.float32), 1.0 + _exp(-g32, PRECISE), False)
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
    scale = _block_scale(tl.max(_abs_bits(x), 1).to(tl.float32, bitcast=True), UE8M0)
    q = _saturate_to_fp8(x, scale[:, None], q_ptr.dtype.element_ty)
    tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :], q, mask=mask)
    tl.store(s_ptr + rows * stride_sm + kb * stride_sk, scale, mask=rows < M)


def _fp8_configs() -> list[triton.Config]:
    """As quant_act's: rows per program, BLOCK (the scale block) wide."""
    return [triton.Config({"BLOCK_M": 32}, num_warps=4), triton.Config({"BLOCK_M": 8}, num_warps=2),
            triton.Config({"BLOCK_M": 64}, num_warps=8)]


# keyed on M's power-of-two bucket too: decode (a few rows) and prefill pick their own tiles
_fp8_tuned = autotune(autotune_configs("swiglu_fp8", _fp8_configs()), key=["N", "BLOCK", "M_BUCKET"])(
    _swiglu_fp8_kernel)
_fwd_tuned = autotune(autotune_configs("swiglu", _configs()), key=["N", "M_BUCKET"])(_swiglu_fwd_kernel)
_bwd_tuned = autotune(autotune_configs("swiglu_bwd", _configs()), key=["N", "M_BUCKET"])(_swiglu_bwd_kernel)


# ----------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------


def _check_args(gate: object, up: object) -> None:
    """Types, dtypes, shapes and devices (also what the fake implementations check)."""
    check_tensor("gate", gate, ndim=2, dtypes=KERNEL_DTYPES)
    check_tensor("up", up, ndim=2, dtypes=(gate.dtype,), shape=tuple(gate.shape))
    check_same_device(gate=gate, up=up)


def _check(gate: object, up: object) -> None:
    """The launchers' checks: the arguments, and a device the kernels run on."""
    _check_args(gate, up)
    check_kernel_device("gate", gate)


def _check_fp8_args(block: object, scale_fmt: object) -> None:
    check_positive_int("block", block)
    check_scale_fmt(scale_fmt)


def _grid(M: int, N: int):
    return lambda meta: (cdiv(M, meta["BLOCK_M"]), cdiv(N, meta["BLOCK_N"]))


@on_tensor_device
def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor, *, out: torch.Tensor | None = None,
               config: triton.Config | None = None) -> torch.Tensor:
    """Launch the forward: ``silu(gate) * up`` -> (M, N) contiguous in gate's dtype.

    gate, up: (M, N) fp16/bf16/fp32, any strides (e.g. the two column halves of one tensor).
    out: optional (M, N) buffer of that dtype; every element is written.
    config: launch with this BLOCK_M / BLOCK_N / num_warps instead of the autotuned ones.
    """
    _check(gate, up)
    M, N = gate.shape
    if out is None:
        out = torch.empty(M, N, dtype=gate.dtype, device=gate.device)
    else:
        check_tensor("out", out, dtypes=(gate.dtype,), shape=(M, N))
        check_same_device(gate=gate, out=out)
        storage = out.untyped_storage().data_ptr()
        if storage in (gate.untyped_storage().data_ptr(), up.untyped_storage().data_ptr()):
            raise ValueError("out: must not share memory with gate or up (autotuning reruns the kernel)")
    if M == 0 or N == 0:
        return out
    kernel = _fwd_tuned if config is None else _swiglu_fwd_kernel
    kernel[_grid(M, N)](
        gate, up, out, M, N, *gate.stride(), *up.stride(), *out.stride(), m_bucket(M), PRECISE=not interpreter_active(),
        **_NO_FMA, **({} if config is None else config.all_kwargs()),
    )
    return out


@on_tensor_device
def swiglu_fp8_fwd(gate: torch.Tensor, up: torch.Tensor, block: int = 128, scale_fmt: str | None = None,
                   config: triton.Config | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the quantizing forward: ``quant_act(swiglu(gate, up), block, scale_fmt)`` bit for bit,
    ``(q (M, N) e4m3 contiguous, scale (M, ceil(N/block)) float32 contiguous)``."""
    _check_args(gate, up)
    _check_device("gate", gate)  # a device the kernels run on, with e4m3 support
    _check_fp8_args(block, scale_fmt)
    M, N = gate.shape
    num_kb = cdiv(N, block)
    q = torch.empty(M, N, dtype=FP8_DTYPE, device=gate.device)
    s = torch.empty(M, num_kb, dtype=torch.float32, device=gate.device)
    if M == 0 or N == 0:
        return q, s
    kernel = _fp8_tuned if config is None else _swiglu_fp8_kernel
    kernel[lambda meta: (cdiv(M, meta["BLOCK_M"]) * num_kb,)](
        gate, up, q, s, M, N, num_kb, *gate.stride(), *up.stride(), q.stride(0), *s.stride(), m_bucket(M),
        PRECISE=not interpreter_active(), BLOCK=block, BLOCK_P2=next_power_of_2(block), UE8M0=scale_fmt == "ue8m0",
        **_NO_FMA, **({} if config is None else config.all_kwargs()),
    )
    return q, s


@on_tensor_device
def swiglu_bwd(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
               config: triton.Config | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward: (d_gate, d_up), contiguous (M, N) in gate's dtype."""
    _check(gate, up)
    check_tensor("dy", dy, dtypes=(gate.dtype,), shape=tuple(gate.shape))
    check_same_device(gate=gate, dy=dy)
    M, N = gate.shape
    dg = torch.empty(M, N, dtype=gate.dtype, device=gate.device)
    du = torch.empty_like(dg)
    if M == 0 or N == 0:
        return dg, du
    kernel = _bwd_tuned if config is None else _swiglu_bwd_kernel
    kernel[_grid(M, N)](
        gate, up, dy, dg, du, M, N, *gate.stride(), *up.stride(), *dy.stride(), dg.stride(0), du.stride(0), m_bucket(M),
        PRECISE=not interpreter_active(), **_NO_FMA, **({} if config is None else config.all_kwargs()),
    )
    return dg, du


# ----------------------------------------------------------------------------------------
# The public op (torch.library): eager, autograd and torch.compile(fullgraph=True)
# ----------------------------------------------------------------------------------------


@torch.library.custom_op("moela::swiglu", mutates_args=())
def _swiglu_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return swiglu_fwd(gate, up)


@_swiglu_op.register_fake
def _(gate, up):
    _check_args(gate, up)
    return gate.new_empty(gate.shape)


@torch.library.custom_op("moela::swiglu_fp8", mutates_args=())
def _swiglu_fp8_op(gate: torch.Tensor, up: torch.Tensor, block: int,
                   scale_fmt: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    return swiglu_fp8_fwd(gate, up, block, scale_fmt)


@_swiglu_fp8_op.register_fake
def _(gate, up, block, scale_fmt):
    _check_args(gate, up)
    _check_fp8_args(block, scale_fmt)
    M, N = gate.shape
    return gate.new_empty(M, N, dtype=FP8_DTYPE), gate.new_empty(M, cdiv(N, block), dtype=torch.float32)


@torch.library.custom_op("moela::swiglu_bwd", mutates_args=())
def _swiglu_bwd_op(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return swiglu_bwd(dy, gate, up)


@_swiglu_bwd_op.register_fake
def _(dy, gate, up):
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


def _setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, dy: torch.Tensor):
    gate, up = ctx.saved_tensors
    dg, du = _swiglu_bwd_op(dy, gate, up)
    return (dg if ctx.needs_input_grad[0] else None), (du if ctx.needs_input_grad[1] else None)


_swiglu_op.register_autograd(_backward, setup_context=_setup)


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, fp8: bool = False, block: int = 128,
           scale_fmt: str | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``silu(gate) * up`` in one kernel (``moela.reference.swiglu``'s contract, differentiable).

    Args:
        gate, up: (M, N) fp16/bf16/fp32 on CUDA (or CPU under the interpreter), any strides: in
            the MoE layer the two column halves of the first grouped GEMM's (M, 2N) output.
        fp8: return the activation quantized instead, ``(q e4m3, scale float32)``, bit for bit
            ``quant_act(swiglu(gate, up), block, scale_fmt)`` (no gradient).
    Returns:
        (M, N) contiguous in gate's dtype; ``silu(gate)`` rounded to that dtype before the
        product, as torch's two kernels round it. Gradients flow to gate and up.

    Example::

        h = grouped_gemm(xs, w13, plan.offsets)   # (M, 2I): gate | up
        a = swiglu(h[:, :I], h[:, I:])            # (M, I), contiguous
        q, s = swiglu(h[:, :I], h[:, I:], fp8=True)  # FP8 down projection input
    """
    direct = run_direct(gate, up)  # eager, nothing to record: the launchers themselves (same bits)
    if fp8:
        if direct:
            return swiglu_fp8_fwd(gate, up, block, scale_fmt)
        _check_args(gate, up)
        _check_fp8_args(block, scale_fmt)
        # no gradient through the quantization (as quant_act's): the op sees detached inputs
        return _swiglu_fp8_op(gate.detach(), up.detach(), block, scale_fmt)
    if direct:
        return swiglu_fwd(gate, up)
    _check_args(gate, up)
    return _swiglu_op(gate, up)
