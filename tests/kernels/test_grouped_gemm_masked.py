"""kernels.grouped_gemm_masked: the masked layout (x[E, max_m, K], masked_m[E]) against the reference.

CPU tests run both kernel families through the Triton interpreter at small shapes: the
Hopper-native TMA kernel (warp-specialised, swap-AB with and without warp specialisation, and
every default call on operands TMA takes) and the pointer kernel (float32, odd K, explicit
pointer configs). Outputs are pre-filled with NaN; x's rows past masked_m hold NaN (they must
never reach a result); tolerances are derived: the kernel's error against the float64 reference
within 2× the error of the reference run in the inputs' dtype. The sm_90 compiles of both
kernels are checked by ``profiling audit`` (tests/profiling/test_audit.py).
"""

from __future__ import annotations

import importlib

import pytest
import torch
import triton
from moela_testing import assert_close_derived, nan_empty

from moela import reference
from moela.kernels import grouped_gemm_masked
from moela.kernels._common import uses_tma
from moela.kernels.grouped_gemm_masked import masked_pointer_configs, masked_tma_configs


def _tma(bm=16, bn=16, bk=16, *, swap=False, ws=True) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 2, "SWAP_AB": swap,
                          "WARP_SPECIALIZE": ws}, num_warps=4, num_stages=2)


CONFIGS = {
    "tma-ws": _tma(),
    "tma-swap-ws": _tma(bn=32, swap=True),
    "tma-swap": _tma(swap=True, ws=False),
    "pointer": triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}, num_warps=4, num_stages=2),
}
# (masked_m, max_m, N, K): N, K multiples of 8 (TMA's 16-byte rows), tails inside the blocks.
CASES = {
    "ragged": ([17, 0, 40, 5], 40, 24, 40),
    "full-and-empty": ([0, 33, 33], 33, 16, 24),  # max_m not a multiple of the block
    "out-of-range": ([-3, 50, 7], 20, 24, 16),  # clamped to 0 and max_m
    "all-empty": ([0, 0], 18, 16, 16),
}


def _inputs(masked_m, max_m, N, K, dtype, device):
    E = len(masked_m)
    x = torch.randn(E, max_m, K, dtype=dtype, device=device)
    w = torch.randn(E, N, K, dtype=dtype, device=device) * K**-0.5
    mm = torch.tensor(masked_m, dtype=torch.int32, device=device)
    for e, rows in enumerate(masked_m):
        x[e, max(rows, 0):] = float("nan")  # rows past masked_m must never reach a result
    return x, w, mm


def _check(out, x, w, mm):
    clean = torch.nan_to_num(x, nan=0.0)  # the reference never reads those rows either
    ref_hi = reference.grouped_gemm_masked(clean.double(), w.double(), mm)
    ref_lo = reference.grouped_gemm_masked(clean, w, mm)
    assert out.dtype == x.dtype and out.shape == ref_hi.shape
    assert_close_derived(out, ref_hi, ref_lo, name="out")
    rows = mm.long().clamp(0, x.shape[1]).tolist()
    for e, r in enumerate(rows):
        assert (out[e, r:] == 0).all(), f"expert {e}: rows past masked_m must be zero"


@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_small_blocks(case, config, device):
    x, w, mm = _inputs(*CASES[case], torch.bfloat16, device)
    out = nan_empty((x.shape[0], x.shape[1], w.shape[1]), torch.bfloat16, device)
    assert uses_tma(x, w, out, config=CONFIGS[config]) == config.startswith("tma")
    assert grouped_gemm_masked.launch(x, w, mm, out=out, config=CONFIGS[config]) is out
    _check(out, x, w, mm)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_default_configs(dtype, device):
    """Default calls: TMA kernels for 16-bit operands TMA takes (the interpreter counts as sm_90),
    the pointer kernel for float32; int64 masked_m."""
    x, w, mm = _inputs([5, 0, 24], 24, 16, 32, dtype, device)
    assert uses_tma(x, w, x.new_empty(3, 24, 16)) == (dtype != torch.float32)
    _check(grouped_gemm_masked(x, w, mm.long()), x, w, mm)


@pytest.mark.parametrize("force", ["knob", "unaligned"])
def test_pointer_kernel_when_the_rule_says_so(force, monkeypatch, device):
    gm = importlib.import_module("moela.kernels.grouped_gemm_masked")

    def refuse(*args, **kwargs):
        raise AssertionError("the TMA kernel ran")

    monkeypatch.setattr(gm, "_tma_tuned", type("Refuse", (), {"__getitem__": refuse})())
    if force == "knob":
        monkeypatch.setenv("MOELA_TMA", "0")
    x, w, mm = _inputs([3, 9], 12, 16, 17 if force == "unaligned" else 16, torch.bfloat16, device)
    _check(grouped_gemm_masked(x, w, mm), x, w, mm)


def test_validate(device):
    x, w, _ = _inputs([1, 2], 8, 16, 16, torch.bfloat16, device)
    for bad in ([-1, 2], [1, 9]):
        mm = torch.tensor(bad, dtype=torch.int32, device=device)
        with pytest.raises(ValueError, match="masked_m"):
            grouped_gemm_masked(x, w, mm, validate=True)
        with pytest.raises(ValueError, match="masked_m"):
            reference.grouped_gemm_masked(x, w, mm, validate=True)
    grouped_gemm_masked(x, w, torch.tensor([0, 8], dtype=torch.int32, device=device), validate=True)


def test_rejects_bad_input(device):
    x, w, mm = _inputs([1, 2], 8, 16, 16, torch.bfloat16, device)
    cases = [
        (ValueError, "x", lambda: grouped_gemm_masked(x[:, :, :8], w, mm)),  # K mismatch
        (ValueError, "x", lambda: grouped_gemm_masked(x[:1], w, mm)),  # E mismatch
        (ValueError, "x", lambda: grouped_gemm_masked(x[0], w, mm)),  # rank
        (TypeError, "w", lambda: grouped_gemm_masked(x, w.half(), mm)),
        (TypeError, "x", lambda: grouped_gemm_masked(x.double(), w.double(), mm)),  # fp64: no kernel
        (ValueError, "masked_m", lambda: grouped_gemm_masked(x, w, mm[:1])),
        (TypeError, "masked_m", lambda: grouped_gemm_masked(x, w, mm.float())),
        (ValueError, "masked_m", lambda: grouped_gemm_masked(x, w, mm.to("meta"))),
        (ValueError, "out", lambda: grouped_gemm_masked.launch(x, w, mm, out=x.new_empty(2, 8, 8))),
    ]
    for exc, name, call in cases:
        with pytest.raises(exc, match=name):
            call()


def test_opcheck_and_torch_compile(device):
    """The custom op's fake and schema (opcheck), and a fullgraph trace (aot_eager on CPU)."""
    x, w, mm = _inputs([3, 0, 8], 8, 16, 16, torch.bfloat16, device)
    x = torch.nan_to_num(x)  # opcheck compares runs bitwise; NaN never equals itself
    torch.library.opcheck(torch.ops.moela.grouped_gemm_masked.default, (x, w, mm),
                          test_utils=("test_schema", "test_faketensor"))
    backend = "inductor" if device == "cuda" else "aot_eager"
    compiled = torch.compile(lambda x, w, mm: grouped_gemm_masked(x, w, mm) * 2, fullgraph=True, backend=backend)
    torch.testing.assert_close(compiled(x, w, mm), grouped_gemm_masked(x, w, mm) * 2, rtol=0, atol=0)


def test_config_lists():
    for c in masked_tma_configs():
        assert not c.kwargs["WARP_SPECIALIZE"] or c.num_warps == 4, c
        assert "WARP_SPECIALIZE" in c.kwargs and "SWAP_AB" in c.kwargs, c
    for c in masked_pointer_configs():
        assert "WARP_SPECIALIZE" not in c.kwargs, c  # the config families stay apart (_common.uses_tma)


@pytest.mark.gpu
def test_gpu_deepgemm_masked_and_cuda_graph():
    """DeepGEMM's masked 4 × 256, N=7168, K=2048, with ragged masked_m; a CUDA graph replays new
    masked_m values without a host sync."""
    x, w, mm = _inputs([256, 200, 1, 0], 256, 7168, 2048, torch.bfloat16, "cuda")
    _check(grouped_gemm_masked(x, w, mm), x, w, mm)
    x = torch.nan_to_num(x)  # the replay reads rows the first masked_m left out
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = grouped_gemm_masked.launch(x, w, mm)
    mm.copy_(torch.tensor([3, 256, 0, 77], dtype=torch.int32))
    torch.cuda.set_sync_debug_mode("error")
    try:
        graph.replay()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    _check(out, x, w, mm)
