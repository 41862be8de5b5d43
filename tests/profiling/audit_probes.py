"""Small Triton kernels with known properties, compiled for sm_90 through ``moela.profiling.audit``.

``tests/profiling/test_audit.py`` runs this file in a child process without TRITON_INTERPRET
(``python audit_probes.py`` prints one JSON finding per probe): each probe fixes what the audit
must read (TMA, warp specialisation, wgmma, loads in the FP8 loop), so the audit's detectors are
checked against kernels whose answer is known, not only against moela's kernels.
"""

from __future__ import annotations

import json
from dataclasses import asdict

import torch
import triton
import triton.language as tl

from moela.profiling.audit import Target, compile_finding
from moela.profiling.audit_shapes import Launch


@triton.jit
def tma_ws_kernel(a_ptr, b_ptr, c_ptr, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  WARP_SPECIALIZE: tl.constexpr):
    """c = a · bᵀ through tensor descriptors; the K loop asks for warp specialisation."""
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k in tl.range(0, tl.cdiv(K, BLOCK_K), warp_specialize=WARP_SPECIALIZE):
        a = a_desc.load([pid_m * BLOCK_M, k * BLOCK_K])
        b = b_desc.load([pid_n * BLOCK_N, k * BLOCK_K])
        acc = tl.dot(a, b.T, acc)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(c_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(c_ptr.dtype.element_ty))


@triton.jit
def fp8_loop_kernel(a_ptr, b_ptr, s_ptr, c_ptr, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, SCALED: tl.constexpr):
    """One (BLOCK_M, BLOCK_N) tile of a · bᵀ over K with pointer loads; SCALED: a scale loaded
    with a plain load in every K step (what the audit's fp8-loop-load rule flags)."""
    offs_m, offs_n, offs_k = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k in range(0, K // BLOCK_K):
        a = tl.load(a_ptr + offs_m[:, None] * K + (k * BLOCK_K + offs_k)[None, :])
        b = tl.load(b_ptr + (k * BLOCK_K + offs_k)[:, None] + offs_n[None, :] * K)
        p = tl.dot(a, b)
        if SCALED:
            p = p * tl.load(s_ptr + k)
        acc += p
    tl.store(c_ptr + offs_m[:, None] * BLOCK_N + offs_n[None, :], acc)


def _t(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def probes() -> dict[str, dict]:
    """probe name -> the audit's finding (as a dict) for it on sm_90."""
    mnk = dict(M=4096, N=4096, K=7168)
    tma = dict(a_ptr=_t(4096, 7168), b_ptr=_t(4096, 7168), c_ptr=_t(4096, 4096), **mnk, BLOCK_M=128, BLOCK_N=128,
               BLOCK_K=64)
    fp8 = dict(a_ptr=_t(128, 7168, dtype=torch.float8_e4m3fn), b_ptr=_t(128, 7168, dtype=torch.float8_e4m3fn),
               s_ptr=_t(56, dtype=torch.float32), c_ptr=_t(128, 128, dtype=torch.float32), K=7168, BLOCK_M=64,
               BLOCK_N=64, BLOCK_K=128)
    bf16 = {**fp8, "a_ptr": _t(128, 7168), "b_ptr": _t(128, 7168), "BLOCK_K": 64, "SCALED": False}
    cases = {
        "tma+ws w4": (tma_ws_kernel, {**tma, "WARP_SPECIALIZE": True}, dict(num_warps=4, num_stages=3)),
        "tma+ws w8": (tma_ws_kernel, {**tma, "WARP_SPECIALIZE": True}, dict(num_warps=8, num_stages=3)),
        "tma w4": (tma_ws_kernel, {**tma, "WARP_SPECIALIZE": False}, dict(num_warps=4, num_stages=3)),
        "fp8 scaled": (fp8_loop_kernel, {**fp8, "SCALED": True}, dict(num_warps=4, num_stages=3)),
        "fp8 unscaled": (fp8_loop_kernel, {**fp8, "SCALED": False}, dict(num_warps=4, num_stages=3)),
        "fp8 128x128 w4": (fp8_loop_kernel, {**fp8, "SCALED": False, "BLOCK_M": 128, "BLOCK_N": 128},
                           dict(num_warps=4, num_stages=3)),
        "bf16 64-row w2": (fp8_loop_kernel, bf16, dict(num_warps=2, num_stages=3)),
        "bf16 5 stages of 128x128x128": (fp8_loop_kernel, {**bf16, "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128},
                                         dict(num_warps=8, num_stages=5)),
    }
    return {name: asdict(compile_finding(Target(name, __name__, fn), Launch(name, args, options), None, 90))
            for name, (fn, args, options) in cases.items()}


if __name__ == "__main__":
    print(json.dumps(probes()))
