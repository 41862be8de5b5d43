"""The grouped GEMM over the masked layout: ``out[e, r] = x[e, r] · w[e]ᵀ`` for ``r < masked_m[e]``.

Legend: E experts, max_m rows per expert (a fixed-size buffer: DeepEP's low-latency receive
layout, DeepGEMM's ``m_grouped_*_masked``), K input features, N output features.

    x (E, max_m, K)    w (E, N, K)    masked_m (E,) int32/int64    ->    out (E, max_m, N)

``masked_m`` is read on the device (a decode step keeps one CUDA graph for every routing),
clamped into [0, max_m] in its own width; out's rows at or past ``masked_m[e]`` are zeros
(written, so that the whole output is defined), and x's rows there are never read into a result.
``validate=True`` raises on values outside [0, max_m] instead (a host sync).

Every tile is known from the shapes: E × cdiv(max_m, BLOCK_M) × cdiv(N, BLOCK_N), expert by expert,
GROUP_M-swizzled within one. A tile at or past ``masked_m[e]`` runs no K step and stores zeros.

Two kernel families, chosen by ``_common.tma_path`` as for ``grouped_gemm``:

- Hopper-native (TMA): a persistent grid over the tiles; x and w read through 3-D descriptors
  (an expert's tails are zero-filled, never its neighbour's rows); each tile's output goes
  through a descriptor of its expert's (max_m, N) matrix, its rows past masked_m[e] zeroed in
  registers first; warp specialisation at num_warps=4; swap-AB configs (outᵀ = w[e] · xᵀ) for
  decode-sized experts;
- pointer-based: one program per tile (pre-Hopper GPUs, float32, strides TMA cannot take).

The FP8 masked op mirrors this file: the same contract shape (plus scales), the same
``reference.grouped_gemm.masked_rows`` rule and the same tile order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from moela.reference.grouped_gemm import check_grouped_gemm_masked, check_masked_m

from ._common import (
    autotune,
    cdiv,
    ensure_tma_allocator,
    kernel_dtype,
    m_bucket,
    num_sms,
    smem_per_block,
    uses_tma,
)
from .factory import kernel_op
from .tl_helpers import SMEM_BUDGET, dot_precision, grouped_tile_order

__all__ = ["grouped_gemm_masked", "KERNEL_DTYPES", "masked_tma_configs", "masked_pointer_configs"]

#: Input dtypes of the kernels (float32 accumulation for all; float32 inputs take the pointer kernel).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _cfg(bm: int, bn: int, bk: int, *, swap: bool = False, ws: bool = True, warps: int = 4, stages: int = 4,
         group: int = 8) -> triton.Config:
    """A TMA config (``SWAP_AB`` and ``WARP_SPECIALIZE`` mark the family)."""
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group, "SWAP_AB": swap,
                          "WARP_SPECIALIZE": ws}, num_warps=warps, num_stages=stages)


def _pcfg(bm: int, bn: int, bk: int, *, warps: int = 4, stages: int = 3, group: int = 8) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group}, num_warps=warps,
                         num_stages=stages)


def masked_tma_configs() -> list[triton.Config]:
    """TMA configs. DeepGEMM's masked 4 × 256, N=7168, K=2048 makes 896 tiles of 64×128: 6.8 rounds
    on 132 SMs (97 % full), where 128×128 tiles make 3.4 (85 %)."""
    return [
        _cfg(64, 128, 64),
        _cfg(128, 64, 64),
        _cfg(128, 128, 64),
        _cfg(128, 256, 64, stages=3),
        _cfg(64, 128, 128, swap=True),  # up to 64 rows per expert: weight rows as wgmma's M
        _cfg(16, 128, 128, swap=True, ws=False),  # decode: a few rows per expert
    ]


def masked_pointer_configs() -> list[triton.Config]:
    """Pointer-kernel configs (16-bit: cp.async + wgmma/mma; float32: FMA within the registers)."""
    return [
        _pcfg(64, 128, 64),
        _pcfg(128, 128, 64),
        _pcfg(16, 64, 128, stages=4),
        _pcfg(64, 64, 32),  # float32
    ]


def _tma_smem(c: triton.Config, size: int) -> int:
    k = c.kwargs
    return (c.num_stages * k["BLOCK_K"] * (k["BLOCK_M"] + k["BLOCK_N"]) + k["BLOCK_M"] * k["BLOCK_N"]) * size


def _tma_prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Within the device's shared memory, warp specialisation at num_warps=4 only, then by how full
    the persistent grid's rounds are (tiles / (SMs · rounds), in steps of 0.1; stable)."""
    x = named_args["x_ptr"]
    budget, sms = smem_per_block(x.device) - 2048, num_sms(x.device)
    kept = [c for c in configs if _tma_smem(c, x.element_size()) <= budget
            and (not c.kwargs["WARP_SPECIALIZE"] or c.num_warps == 4)]
    kept = kept or [min(configs, key=lambda c: _tma_smem(c, x.element_size()))]

    def fill(c: triton.Config) -> int:
        k = c.kwargs
        tiles = named_args["E"] * cdiv(named_args["MAX_M"], k["BLOCK_M"]) * cdiv(named_args["N"], k["BLOCK_N"])
        return round(10 * tiles / (sms * cdiv(tiles, sms))) if tiles else 10

    return sorted(kept, key=lambda c: -fill(c))


def _pointer_prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Pipeline buffers within the shared-memory budget; float32 (FMA dots) at most 32 accumulators
    per thread (64 spill at sm_90 next to the operand fragments)."""
    size = named_args["x_ptr"].element_size()

    def smem(c: triton.Config) -> int:
        k = c.kwargs
        return c.num_stages * k["BLOCK_K"] * (k["BLOCK_M"] + k["BLOCK_N"]) * size

    kept = [c for c in configs if smem(c) <= SMEM_BUDGET
            and (size == 2 or c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 32 * 32 * c.num_warps)]
    return kept or [min(configs, key=smem)]


@triton.jit
def _expert_rows(masked_m_ptr, e, MAX_M):
    """masked_m[e] clamped into [0, MAX_M] in its own width, then int32."""
    return tl.minimum(tl.maximum(tl.load(masked_m_ptr + e), 0), MAX_M).to(tl.int32)


@triton.jit
def _grouped_gemm_masked_tma_kernel(
    x_ptr, w_ptr, masked_m_ptr, out_ptr,
    E, MAX_M, N, K,
    stride_xe, stride_xm, stride_we, stride_wn, stride_oe, stride_om,
    M_BUCKET,  # autotune key only: _common.m_bucket(MAX_M) (the config tables' nearest-bucket key)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SWAP_AB: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, NUM_SMS: tl.constexpr,
):
    """grid: (min(NUM_SMS, E × cdiv(MAX_M, BLOCK_M) × cdiv(N, BLOCK_N)),); a persistent loop over the tiles."""
    num_pid_m = tl.cdiv(MAX_M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    per_expert = num_pid_m * num_pid_n
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[E, MAX_M, K], strides=[stride_xe, stride_xm, 1],
                                       block_shape=[1, BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[E, N, K], strides=[stride_we, stride_wn, 1],
                                       block_shape=[1, BLOCK_N, BLOCK_K])
    k_steps = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), E * per_expert, NUM_SMS, flatten=False,
                         warp_specialize=WARP_SPECIALIZE):
        e = tile // per_expert
        pid_m, pid_n = grouped_tile_order(tile % per_expert, num_pid_m, num_pid_n, GROUP_M)
        rows = _expert_rows(masked_m_ptr, e, MAX_M)
        m0 = pid_m * BLOCK_M
        n0 = pid_n * BLOCK_N
        steps = tl.where(m0 < rows, k_steps, 0)
        if SWAP_AB:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ks in range(steps):
            a = x_desc.load([e, m0, ks * BLOCK_K]).reshape(BLOCK_M, BLOCK_K)
            b = w_desc.load([e, n0, ks * BLOCK_K]).reshape(BLOCK_N, BLOCK_K)
            if SWAP_AB:
                acc = tl.dot(b, a.T, acc)
            else:
                acc = tl.dot(a, b.T, acc)
        if SWAP_AB:
            live = (m0 + tl.arange(0, BLOCK_M) < rows)[None, :]
            res = tl.where(live, acc, 0.0).T.to(out_ptr.dtype.element_ty)
        else:
            live = (m0 + tl.arange(0, BLOCK_M) < rows)[:, None]
            res = tl.where(live, acc, 0.0).to(out_ptr.dtype.element_ty)
        # out[e] as its own (MAX_M, N) descriptor: the max_m and N tails clip there
        out_desc = tl.make_tensor_descriptor(out_ptr + e.to(tl.int64) * stride_oe, shape=[MAX_M, N],
                                             strides=[stride_om, 1], block_shape=[BLOCK_M, BLOCK_N])
        out_desc.store([m0, n0], res)


@triton.jit
def _grouped_gemm_masked_kernel(
    x_ptr, w_ptr, masked_m_ptr, out_ptr,
    E, MAX_M, N, K,
    stride_xe, stride_xm, stride_xk, stride_we, stride_wn, stride_wk, stride_oe, stride_om, stride_on,
    M_BUCKET,  # autotune key only: _common.m_bucket(MAX_M) (the config tables' nearest-bucket key)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """grid: (E × cdiv(MAX_M, BLOCK_M) × cdiv(N, BLOCK_N),); one program per tile."""
    num_pid_m = tl.cdiv(MAX_M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    per_expert = num_pid_m * num_pid_n
    tile = tl.program_id(0)
    e = tile // per_expert
    pid_m, pid_n = grouped_tile_order(tile % per_expert, num_pid_m, num_pid_n, GROUP_M)
    rows = _expert_rows(masked_m_ptr, e, MAX_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    live = offs_m < rows
    x_ptrs = x_ptr + e.to(tl.int64) * stride_xe + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk
    # columns past N wrap to valid weight rows whose products are never stored
    w_ptrs = (w_ptr + e.to(tl.int64) * stride_we + (offs_n % N).to(tl.int64)[None, :] * stride_wn
              + offs_k[:, None] * stride_wk)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.where(pid_m * BLOCK_M < rows, tl.cdiv(K, BLOCK_K), 0)):
        k_left = K - k * BLOCK_K
        a = tl.load(x_ptrs, mask=live[:, None] & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    out_ptrs = (out_ptr + e.to(tl.int64) * stride_oe + offs_m[:, None].to(tl.int64) * stride_om
                + offs_n[None, :] * stride_on)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < MAX_M) & (offs_n[None, :] < N))


_tma_tuned = autotune("grouped_gemm_masked_tma", masked_tma_configs(),
                      key=["N", "K", "M_BUCKET"], prune_configs_by={"early_config_prune": _tma_prune},
                      )(_grouped_gemm_masked_tma_kernel)
_pointer_tuned = autotune("grouped_gemm_masked", masked_pointer_configs(),
                          key=["N", "K", "M_BUCKET"], prune_configs_by={"early_config_prune": _pointer_prune},
                          )(_grouped_gemm_masked_kernel)


def _domain(x, w, masked_m, *, validate=False) -> None:
    kernel_dtype("grouped_gemm_masked", "x", x, KERNEL_DTYPES)


@kernel_op("grouped_gemm_masked", contract=check_grouped_gemm_masked, domain=_domain)
def grouped_gemm_masked(out, x: Tensor, w: Tensor, masked_m: Tensor, *, validate: bool = False,
                        config=None) -> Tensor:
    """``out[e, r] = x[e, r] · w[e]ᵀ`` for ``r < masked_m[e]``, zeros past it (Triton; no gradient).

    Same contract as ``moela.reference.grouped_gemm_masked``, without a host sync: masked_m is read
    on the device, so one CUDA graph serves every routing of a decode step.

    Args:
        x: (E, max_m, K) fp16/bf16/fp32 rows per expert (DeepEP's low-latency layout); rows past
            masked_m[e] are never read into a result.
        w: (E, N, K) expert weights (``F.linear`` layout), x's dtype.
        masked_m: (E,) int32/int64 rows of each expert on x's device, clamped into [0, max_m].
        validate: also check that every masked_m lies in [0, max_m] (synchronises).
    Returns:
        (E, max_m, N) in x.dtype, accumulated in float32; rows at or past masked_m[e] are zero.

    Example::

        x = torch.randn(4, 256, 2048, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(4, 7168, 2048, device="cuda", dtype=torch.bfloat16)
        out = grouped_gemm_masked(x, w, torch.tensor([256, 3, 0, 100], device="cuda", dtype=torch.int32))
    """
    E, MAX_M, K = x.shape
    N = w.shape[1]
    if validate:
        check_masked_m(masked_m, MAX_M)
    if out.numel() == 0:
        return
    masked_m = masked_m.contiguous()
    extra = {} if config is None else config.all_kwargs()
    if uses_tma(x, w, out, config=config):
        ensure_tma_allocator()
        kernel = _tma_tuned if config is None else _grouped_gemm_masked_tma_kernel
        sms = num_sms(x.device)

        def grid(meta: dict) -> tuple[int]:
            return (max(1, min(sms, E * cdiv(MAX_M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]))),)

        kernel[grid](x, w, masked_m, out, E, MAX_M, N, K,
                     x.stride(0), x.stride(1), w.stride(0), w.stride(1), out.stride(0), out.stride(1),
                     m_bucket(MAX_M), NUM_SMS=sms, **extra)
        return
    kernel = _pointer_tuned if config is None else _grouped_gemm_masked_kernel

    def pgrid(meta: dict) -> tuple[int]:
        return (E * cdiv(MAX_M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)

    kernel[pgrid](x, w, masked_m, out, E, MAX_M, N, K, *x.stride(), *w.stride(), *out.stride(),
                  m_bucket(MAX_M), DOT_PRECISION=dot_precision(x.dtype), **extra)
