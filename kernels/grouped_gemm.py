"""Grouped expert GEMM in Triton: each group of rows multiplies its own expert's weight.

Legend: M rows (grouped by expert, ``xs``), K input features, N output features, E experts,
``offsets (E,)`` cumulative row ends (group e owns rows ``[offsets[e-1], offsets[e])``,
``offsets[-1] := 0``). Rows at or past ``offsets[E-1]`` belong to no group: their output is 0.

    out[r] = xs[r] · w[e]ᵀ                   forward        (_grouped_gemm_fwd_kernel)
    dX[r]  = dY[r] · w[e]                    backward dX    (the same kernel on w.transpose(1, 2))
    dW[e]  = dY[rows of e]ᵀ · xs[rows of e]  backward dW    (_grouped_gemm_dw_kernel)

Scheduling without a host sync: the forward grid is an upper bound on the M-tiles times the
N-tiles, ``min(cdiv(M, BLOCK_M) + E, M)`` M-tiles (each group and the tail round up by at most
one tile; every tile owns a row). Each program loads the offsets, counts each group's tiles
(one ``tl.cumsum``), finds its group and first row; tail tiles store zeros, tiles past the last
return. The dW grid is ``E × N-tiles × K-tiles``; each program reduces over its group's rows.

Offsets are read on the device and made safe there: clamped into [0, M] in their own width
(int64 offsets are never narrowed first) and made non-decreasing with a running max, so a
malformed offsets tensor computes a documented result (a group ending before its predecessor
is empty) and never addresses memory out of bounds; ``validate=True`` raises on it instead.

Two kernel families, chosen per call by one rule (``_common.tma_path``): on Hopper and later,
for fp16/bf16 operands that a TMA descriptor takes (16-byte aligned base and strides, unit inner
stride), the Hopper-native kernels of ``kernels.grouped_gemm_tma`` (TMA, persistent tiles, warp
specialisation, swap-AB for decode); otherwise — GPUs before Hopper, float32, odd strides,
``MOELA_TMA=0`` — the pointer-based kernels here (cp.async pipelines, any strides). A ``config``
passed to ``launch`` picks its family (a TMA config where the rule says no raises).

Configs come from functions, one list per path (decode <= 16 rows per expert, medium <= 128,
prefill; ``FWD_PATHS``), keyed on N, K, the weight layout and M's power-of-two bucket, pruned by
shared memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from moela.reference.grouped_gemm import check_grouped_gemm, check_grouped_gemm_dw, check_offsets

from ._common import autotune, cdiv, heuristics, kernel_dtype, kernel_rows, m_bucket, next_power_of_2, uses_tma
from .factory import kernel_op
from .grouped_gemm_tma import grouped_gemm_dw_tma, grouped_gemm_fwd_tma
from .tl_helpers import SMEM_BUDGET, dot_precision, group_rows, locate_m_tile

__all__ = ["grouped_gemm", "grouped_gemm_dw", "KERNEL_DTYPES", "FWD_PATHS", "fwd_path"]

#: Input dtypes of the kernels (float32 accumulation for all).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------
# Configs: from functions, keyed on N/K, one config under the interpreter.
# ----------------------------------------------------------------------------------------


def _cfg(bm: int, bn: int, bk: int, group: int, warps: int, stages: int, group_name: str = "GROUP_M") -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, group_name: group},
                         num_warps=warps, num_stages=stages)


def _fwd_prefill_configs() -> list[triton.Config]:
    """Prefill-like loads: wgmma-sized tiles. configs[0] is the default (and the interpreter's).

    Compiled for sm_90 (triton 3.6, bf16), every 16-bit config issues HGMMA with 16-byte
    cp.async loads and no spills; the shared memory and registers below are ptxas's.
    """
    return [
        _cfg(128, 128, 64, 8, 4, 4),  # 128 KB smem, 238 regs: one warpgroup, 64×128 wgmma ×2
        _cfg(128, 256, 64, 8, 8, 3),  # 144 KB, 228 regs: two warpgroups, each 64×256 (Triton's H100 choice)
        _cfg(256, 128, 64, 8, 8, 3),  # 144 KB
        _cfg(128, 128, 64, 8, 4, 3),  # 96 KB: two CTAs per SM overlap one's epilogue with the other's loop
        _cfg(64, 128, 64, 8, 4, 4),  # small groups waste fewer rows per tile
        _cfg(128, 64, 64, 8, 4, 4),  # small N
        _cfg(64, 256, 64, 8, 4, 3),
        _cfg(128, 128, 32, 8, 8, 3),  # fp32 (FMA with "ieee"): 64 accumulators per thread, no spills
        _cfg(64, 64, 64, 8, 4, 3),  # fp32
    ]


def _fwd_medium_configs() -> list[triton.Config]:
    """17-128 rows per expert on average: still weight-bandwidth bound (a weight byte feeds
    rows/expert FLOP, under the H200's ~200 FLOP/B ridge), so tiles of 64-128 rows that
    read each expert's weights about once, and deeper pipelines than prefill."""
    return [
        _cfg(64, 128, 64, 8, 4, 4),  # 96 KB smem, 128 regs: two CTAs per SM
        _cfg(128, 128, 64, 8, 4, 4),
        _cfg(64, 128, 128, 8, 4, 3),  # 144 KB
        _cfg(64, 64, 128, 8, 4, 4),  # more programs when few experts are active
        _cfg(128, 128, 64, 8, 8, 4),
        _cfg(64, 256, 64, 8, 4, 3),
        _cfg(64, 64, 64, 8, 4, 3),  # fp32
    ]


def _fwd_decode_configs() -> list[triton.Config]:
    """Decode-like loads (<= 16 rows per expert): weight streaming (mma.sync; the 16-row tile
    is below wgmma's 64), long K steps, deep pipelines to keep HBM busy."""
    return [
        _cfg(16, 64, 128, 8, 4, 4),  # 60 KB smem: three CTAs per SM
        _cfg(16, 64, 256, 8, 4, 4),  # 120 KB
        _cfg(16, 128, 128, 8, 4, 4),  # 108 KB
        _cfg(16, 32, 256, 8, 4, 4),  # more programs when N is small
        _cfg(16, 128, 256, 8, 8, 3),
        _cfg(16, 64, 64, 8, 4, 6),
    ]


def _dw_configs() -> list[triton.Config]:
    """dW tiles (BLOCK_N × BLOCK_K of w[e]), reducing over BLOCK_M rows per step (HGMMA)."""
    return [
        _cfg(64, 128, 128, 8, 8, 4, "GROUP_N"),  # 128 KB smem, 98 regs
        _cfg(64, 128, 128, 8, 4, 4, "GROUP_N"),
        _cfg(64, 128, 256, 8, 8, 3, "GROUP_N"),  # 144 KB
        _cfg(64, 256, 128, 8, 8, 3, "GROUP_N"),
        _cfg(32, 128, 128, 8, 4, 5, "GROUP_N"),  # small groups
        _cfg(64, 64, 128, 8, 4, 4, "GROUP_N"),
        _cfg(16, 64, 64, 8, 4, 3, "GROUP_N"),  # fp32
    ]


def _pruner(reduce_dim: str, tile_dims: tuple[str, str], min_reduce_16bit: int):
    """early_config_prune: pipeline buffers within the shared-memory budget; for 16-bit inputs
    reduction steps of >= ``min_reduce_16bit`` (the fp32 configs' short K steps are slower
    there); for fp32 (FMA or TF32) at most 64 accumulators per thread (no spills)."""

    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        size = named_args["x_ptr"].element_size()

        def smem(c: triton.Config) -> int:
            k = c.kwargs
            return c.num_stages * k[reduce_dim] * (k[tile_dims[0]] + k[tile_dims[1]]) * size

        def fits(c: triton.Config) -> bool:
            k = c.kwargs
            if size == 2:
                return k[reduce_dim] >= min_reduce_16bit
            return k[tile_dims[0]] * k[tile_dims[1]] <= 64 * 32 * c.num_warps

        kept = [c for c in configs if smem(c) <= SMEM_BUDGET and fits(c)]
        return kept or [min(configs, key=smem)]

    return prune


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["M"])
def _grouped_gemm_fwd_kernel(
    x_ptr, w_ptr, offsets_ptr, out_ptr,
    M, N, K, E,
    stride_xm, stride_xk, stride_we, stride_wn, stride_wk, stride_om, stride_on,
    M_BUCKET,  # autotune key only: _common.m_bucket(M)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_E: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """out[r, :] = x[r, :] · w[e]ᵀ for the rows r of group e; zeros past offsets[E-1].

    grid: (min(cdiv(M, BLOCK_M) + E, M) * cdiv(N, BLOCK_N),). Each program owns one BLOCK_M × BLOCK_N
    output tile of one group (M-tiles never straddle groups) and loops over K.
    """
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_m = tl.minimum(tl.cdiv(M, BLOCK_M) + E, M)  # >= the real M-tiles (see the module doc)
    # GROUP_M swizzle: GROUP_M consecutive M-tiles (mostly of one expert) walk the N-tiles
    # together, so a weight tile is read from HBM once and served from L2 to the others.
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_size
    pid_n = (pid % width) // group_size

    group, row_start, row_end = locate_m_tile(offsets_ptr, pid_m, M, E, BLOCK_M, BLOCK_E)
    if row_start >= row_end:
        return
    offs_m = row_start + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on
    out_mask = (offs_m[:, None] < row_end) & (offs_n[None, :] < N)
    if group >= E:  # the tail: rows of no group are zero
        tl.store(out_ptrs, tl.zeros((BLOCK_M, BLOCK_N), dtype=out_ptr.dtype.element_ty), mask=out_mask)
        return

    # out[r, n] depends on x[r] and w[e, n] only. Rows past the group's end are masked (no
    # traffic for the 15 idle rows of a 1-row group in a 16-row decode tile); columns past N
    # wrap to valid weight rows that are never stored. The K tail is masked with zeros.
    row_ok = (offs_m < row_end)[:, None]
    cols = (offs_n % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + group.to(tl.int64) * stride_we + cols[None, :] * stride_wn + offs_k[:, None] * stride_wk

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(x_ptrs, mask=row_ok, other=0.0)
            b = tl.load(w_ptrs)
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(x_ptrs, mask=row_ok & (offs_k[None, :] < k_left), other=0.0)
            b = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit(do_not_specialize=["M"])
def _grouped_gemm_dw_kernel(
    x_ptr, dy_ptr, offsets_ptr, dw_ptr,
    M, N, K, E,
    stride_xm, stride_xk, stride_dym, stride_dyn, stride_dwe, stride_dwn, stride_dwk,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
    BLOCK_E: tl.constexpr, DOT_PRECISION: tl.constexpr, COMPENSATED: tl.constexpr,
):
    """dw[e] = dy[rows of e]ᵀ · x[rows of e] (zeros for an empty group).

    grid: (E * cdiv(N, BLOCK_N) * cdiv(K, BLOCK_K),). Programs are ordered expert by expert;
    each owns one BLOCK_N × BLOCK_K tile of dw[e] and reduces over the group's rows,
    BLOCK_M at a time. Within an expert a GROUP_N swizzle keeps the dy and x slabs in L2.
    COMPENSATED (float32 with IEEE dots): each BLOCK_M-row product is added to the running sum
    with Kahan's compensation, so a group of thousands of rows costs about one rounding per
    block product rather than one per row block (cuBLAS's float32 accuracy; 16-bit inputs
    accumulate in float32 already far below their own precision).
    """
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_k = tl.cdiv(K, BLOCK_K)
    tiles = num_pid_n * num_pid_k
    e = pid // tiles
    local = pid % tiles
    width = GROUP_N * num_pid_k
    first_n = (local // width) * GROUP_N
    group_size = tl.minimum(num_pid_n - first_n, GROUP_N)
    pid_n = first_n + (local % width) % group_size
    pid_k = (local % width) // group_size

    start, end = group_rows(offsets_ptr, e, E, M, BLOCK_E)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    # Columns past N / K only feed outputs that are never stored: wrap them, no masks.
    cols_n = (offs_n % N).to(tl.int64)
    cols_k = (offs_k % K).to(tl.int64)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    comp = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)  # Kahan: what acc lost so far (negated)
    for m0 in range(start, end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        # The rows are the reduction: both operands are zero outside the group (a row of
        # another group may hold inf, and inf · 0 would poison the sum).
        in_group = (offs_m < end)[:, None]
        rows = offs_m.to(tl.int64)[:, None]
        dy = tl.load(dy_ptr + rows * stride_dym + cols_n[None, :] * stride_dyn, mask=in_group, other=0.0)
        x = tl.load(x_ptr + rows * stride_xm + cols_k[None, :] * stride_xk, mask=in_group, other=0.0)
        if COMPENSATED:
            y = tl.dot(tl.trans(dy), x, input_precision=DOT_PRECISION) - comp
            t = acc + y
            # once a sum overflows, inf - inf would turn the compensation (and the result) into
            # NaN: an infinite sum keeps no compensation, as the plain sum would stay inf
            comp = tl.where(tl.abs(t) < float("inf"), (t - acc) - y, 0.0)
            acc = t
        else:
            acc = tl.dot(tl.trans(dy), x, acc, input_precision=DOT_PRECISION)
    dw_ptrs = dw_ptr + e.to(tl.int64) * stride_dwe
    dw_ptrs += offs_n[:, None].to(tl.int64) * stride_dwn + offs_k[None, :] * stride_dwk
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=(offs_n[:, None] < N) & (offs_k[None, :] < K))


_even_k = heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})
_fwd_heuristic = _even_k(_grouped_gemm_fwd_kernel)  # untuned: launched with an explicit config

#: Forward paths by average rows per expert, ``M / E`` (shapes only, no sync): (name, most rows
#: per expert, config list). Each has its own autotune cache keyed on N, K, the weight layout
#: (stride_wk: w as stored in the forward, transposed for dX) and M's power-of-two bucket, so a
#: decode step never runs a prefill choice. Pin one with ``MOELA_GROUPED_GEMM_FWD_<NAME>_CONFIG``.
FWD_PATHS = (
    ("decode", 16, _fwd_decode_configs),
    ("medium", 128, _fwd_medium_configs),
    ("prefill", None, _fwd_prefill_configs),
)
_fwd_tuned = {
    name: autotune(
        f"grouped_gemm_fwd_{name}", configs(), key=["N", "K", "stride_wk", "M_BUCKET"],
        prune_configs_by={"early_config_prune": _pruner("BLOCK_K", ("BLOCK_M", "BLOCK_N"), 64)},
    )(_fwd_heuristic)
    for name, _, configs in FWD_PATHS
}
_dw_tuned = autotune(
    "grouped_gemm_dw", _dw_configs(), key=["N", "K"],
    prune_configs_by={"early_config_prune": _pruner("BLOCK_M", ("BLOCK_N", "BLOCK_K"), 32)},
)(_grouped_gemm_dw_kernel)


# ----------------------------------------------------------------------------------------
# The ops (kernels.factory): launchers writing the outputs the contract specifies
# ----------------------------------------------------------------------------------------


def fwd_path(M: int, E: int) -> str:
    """The forward path (see ``FWD_PATHS``) of M rows over E experts."""
    for name, most_rows, _ in FWD_PATHS:
        if most_rows is None or M <= most_rows * max(E, 1):
            return name
    raise AssertionError("the last path takes any M")


def _launch_config(config: triton.Config | None) -> dict:
    return {} if config is None else config.all_kwargs()


def _weight_storage(w: Tensor) -> Tensor:
    """w (E, N, K) as a TMA descriptor reads it: (E, N, K), or (E, K, N) for dX's transposed view."""
    return w if w.stride(2) == 1 else w.transpose(1, 2)


def _domain(xs, w, offsets, *, validate=False) -> None:
    kernel_dtype("grouped_gemm", "xs", xs, KERNEL_DTYPES)
    kernel_rows("grouped_gemm", "xs", xs.shape[0])


def _setup_context(ctx, inputs, output) -> None:
    xs, w, offsets, _ = inputs
    ctx.save_for_backward(xs, w, offsets)


def _backward(ctx, grad: torch.Tensor):
    xs, w, offsets = ctx.saved_tensors
    dx = dw = None
    if ctx.needs_input_grad[0]:  # dX = dY · w[e]: the forward kernel reading w transposed
        dx = grouped_gemm(grad, w.transpose(1, 2), offsets)
    if ctx.needs_input_grad[1]:
        dw = grouped_gemm_dw(xs, grad, offsets)
    return dx, dw, None, None


@kernel_op("grouped_gemm", contract=check_grouped_gemm, domain=_domain, backward=_backward,
           setup_context=_setup_context)
def grouped_gemm(out, xs: Tensor, w: Tensor, offsets: Tensor, *, validate: bool = False, config=None) -> Tensor:
    """``out[r] = xs[r] · w[e]ᵀ`` for rows ``offsets[e-1] <= r < offsets[e]`` (Triton, differentiable).

    Same contract as ``moela.reference.grouped_gemm``, without a host sync.

    Args:
        xs: (M, K) rows grouped by expert; fp16/bf16/fp32, any strides, on CUDA (or CPU under
            the interpreter).
        w: (E, N, K) expert weights (``F.linear`` layout), same dtype as xs, any strides (dX
            passes ``w.transpose(1, 2)``).
        offsets: (E,) int32/int64 cumulative row ends on xs's device; empty groups repeat the
            previous end. Malformed values compute the module docstring's clamped result.
        validate: also check that offsets are non-negative, non-decreasing and end <= M
            (synchronises with the device; off in the fast path).
    Returns:
        (M, N) in xs.dtype, accumulated in float32; rows at or past ``offsets[E-1]`` are zero.
        Gradients flow to xs and w (dX and dW kernels).

    Example::

        xs = torch.randn(10, 64, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(3, 32, 64, device="cuda", dtype=torch.bfloat16)
        out = grouped_gemm(xs, w, torch.tensor([4, 4, 9], device="cuda", dtype=torch.int32))
        # rows 0-3 use w[0], group 1 is empty, rows 4-8 use w[2], row 9 is zero
    """
    M, K = xs.shape
    E, N, _ = w.shape
    if validate:
        check_offsets(offsets, M)
    if M == 0 or N == 0:
        return
    offsets = offsets.contiguous()  # the kernel indexes it flat
    if uses_tma(xs, _weight_storage(w), out, config=config):
        grouped_gemm_fwd_tma(out, xs, w, offsets, fwd_path(M, E), config)
        return
    kernel = _fwd_heuristic if config is not None else _fwd_tuned[fwd_path(M, E)]

    def grid(meta: dict) -> tuple[int]:
        return (min(cdiv(M, meta["BLOCK_M"]) + E, M) * cdiv(N, meta["BLOCK_N"]),)

    kernel[grid](
        xs, w, offsets, out, M, N, K, E,
        *xs.stride(), *w.stride(), *out.stride(),
        m_bucket(M), BLOCK_E=next_power_of_2(E + 1), DOT_PRECISION=dot_precision(xs.dtype),
        **_launch_config(config),
    )


def _dw_domain(xs, dy, offsets) -> None:
    kernel_dtype("grouped_gemm_dw", "xs", xs, KERNEL_DTYPES)
    kernel_rows("grouped_gemm_dw", "xs", xs.shape[0])


@kernel_op("grouped_gemm_dw", contract=check_grouped_gemm_dw, domain=_dw_domain)
def grouped_gemm_dw(out, xs: Tensor, dy: Tensor, offsets: Tensor, *, config=None) -> Tensor:
    """The weight gradient of ``grouped_gemm``: ``dw[e] = dy[rows of e]ᵀ · xs[rows of e]`` (Triton).

    Same contract as ``moela.reference.grouped_gemm_dw``, without a host sync.

    Args:
        xs: (M, K) fp16/bf16/fp32 the forward's input rows; dy: (M, N) the output gradient,
            same dtype; offsets: (E,) int32/int64 cumulative row ends.
    Returns:
        (E, N, K) in xs's dtype, accumulated in float32 (float32 inputs without TF32: with
        Kahan compensation across row blocks); empty groups give zeros.
    """
    M, K = xs.shape
    N, E = dy.shape[1], offsets.shape[0]
    if out.numel() == 0:
        return
    offsets = offsets.contiguous()  # the kernel indexes it flat
    if uses_tma(xs, dy, out, config=config):
        grouped_gemm_dw_tma(out, xs, dy, offsets, config)
        return
    kernel = _dw_tuned if config is None else _grouped_gemm_dw_kernel
    precision = dot_precision(xs.dtype)  # "ieee" only for float32 without TF32

    def grid(meta: dict) -> tuple[int]:
        return (E * cdiv(N, meta["BLOCK_N"]) * cdiv(K, meta["BLOCK_K"]),)

    kernel[grid](
        xs, dy, offsets, out, M, N, K, E,
        xs.stride(0), xs.stride(1), dy.stride(0), dy.stride(1), out.stride(0), out.stride(1), out.stride(2),
        BLOCK_E=next_power_of_2(E + 1), DOT_PRECISION=precision, COMPENSATED=precision == "ieee",
        **_launch_config(config),
    )
