"""kernels.fp8_grouped_gemm_masked: the FP8 grouped GEMM on the masked layout against its reference.

Counts of 0, max_m, partial and out of range (clamped, or ``validate=True`` raising), empty
experts, NaN in the buffer rows past a count (they must not reach the output), outputs
pre-filled with NaN (every row is written: results or zeros) inside a NaN guard (nothing else
is). Near exact within the bound of tests/fp8_testing.py against the emulated reference;
calc_diff < 1e-3 against the bf16 product of the unquantized inputs. Both paths of
``fp8_mainloop.fp8_path``. GPU tier: DeepGEMM's masked 4 × 256 (N 7168, K 2048).
"""

from __future__ import annotations

import importlib

import pytest
import torch
from fp8_testing import PATHS, abs_fp8, assert_gemm_close
from moela_testing import nan_empty

from moela import reference as ref
from moela.kernels import fp8_grouped_gemm_masked
from moela.kernels.fp8_quant import quant_act, quant_weight, to_col_major

masked_module = importlib.import_module("moela.kernels.fp8_grouped_gemm_masked")


def _operands(E, max_m, N, K, device, dtype=torch.bfloat16):
    x = torch.randn(E, max_m, K, device=device, dtype=dtype)
    w = (torch.randn(E, N, K, device=device) * K**-0.5).to(dtype)
    qx, sx = ref.quant_act(x)
    qw, sw = ref.quant_weight(w)
    return x, w, qx, sx, qw, sw


def _check(out, qx, sx, qw, sw, masked_m, name="out"):
    ref32 = ref.fp8_grouped_gemm_masked(qx, sx, qw, sw, masked_m, torch.float32)
    mag = ref.fp8_grouped_gemm_masked(abs_fp8(qx), sx.abs(), abs_fp8(qw), sw.abs(), masked_m, torch.float32)
    assert_gemm_close(out, ref32, mag, qx.shape[2] // 128, 128, name)


# (counts, max_m, N, K): counts may fall outside [0, max_m] (clamped)
CASES = {
    "partial-and-empty": ([5, 0, 16, 9], 16, 96, 256),
    "all-full": ([24, 24], 24, 72, 384),
    "all-empty": ([0, 0, 0], 8, 64, 128),
    "out-of-range": ([-3, 40, 7], 20, 48, 256),
    "multi-row-tile": ([70, 3], 80, 40, 128),
}


RUNS = [(c, p, torch.int32) for c in CASES for p in PATHS] + \
    [(c, p, torch.int64) for c in ("partial-and-empty", "out-of-range") for p in PATHS]


@pytest.mark.parametrize("case,path,counts_dtype", RUNS, ids=[f"{c}-{p}-{str(d)[6:]}" for c, p, d in RUNS])
def test_near_exact_against_reference(case, path, counts_dtype, device):
    counts, max_m, N, K = CASES[case]
    E = len(counts)
    _, _, qx, sx, qw, sw = _operands(E, max_m, N, K, device)
    # garbage past each count: NaN values and scales must not reach the output
    for e, m in enumerate(counts):
        m = min(max(m, 0), max_m)
        qx[e, m:] = float("nan")
        sx[e, m:] = float("nan")
    masked_m = torch.tensor(counts, dtype=counts_dtype, device=device)
    out = nan_empty((E, max_m, N), torch.float32, device)
    masked_module.launch_fp8_grouped_gemm_masked(out, qx, sx, qw, sw, masked_m, 128, None, capability=PATHS[path])
    _check(out, qx, sx, qw, sw, masked_m)
    for e, m in enumerate(counts):
        assert (out[e, min(max(m, 0), max_m):] == 0).all(), f"expert {e}: rows past the count must be 0"


CONFIGS = {  # path, config
    "pointer-16-rows": ("pointer", dict(BLOCK_M=16, BLOCK_N=32, GROUP_M=2, num_warps=4)),
    "tma-vector-b-scales": ("tma", dict(BLOCK_M=64, BLOCK_N=256, GROUP_M=1, num_warps=4, num_stages=2)),
    "tma-warp-specialized": ("tma", dict(BLOCK_M=128, BLOCK_N=64, WARP_SPECIALIZE=True, num_warps=4, num_stages=4)),
}


@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_configs(cfg, device):
    path, config = CONFIGS[cfg]
    counts, max_m, N, K = [5, 0, 20], 20, 160, 256
    _, _, qx, sx, qw, sw = _operands(len(counts), max_m, N, K, device)
    masked_m = torch.tensor(counts, dtype=torch.int32, device=device)
    out = nan_empty((len(counts), max_m, N), torch.float32, device)
    masked_module.launch_fp8_grouped_gemm_masked(out, qx, sx, qw, sw, masked_m, 128, config, capability=PATHS[path])
    _check(out, qx, sx, qw, sw, masked_m)


def test_warp_specialized_scales_through_descriptors(device):
    """Column-major x_s (per expert, padded to 16 bytes) and Kb = 12: the
    warp-specialised schedule reads the scales through descriptors (SCALE_TMA): x_s as (E·Kb,
    max_m), w_s as (E·N/B, Kb)."""
    counts, max_m, N, K = [5, 0, 130], 130, 160, 1536  # Kb 12: weight-scale boxes at 0, 4, 8
    _, _, qx, sx, qw, sw = _operands(len(counts), max_m, N, K, device)
    col = to_col_major(sx)
    masked_m = torch.tensor(counts, dtype=torch.int32, device=device)
    out = nan_empty((len(counts), max_m, N), torch.float32, device)
    x2, w2 = qx.reshape(-1, K), qw.reshape(-1, K)
    assert masked_module.tma_launch_args(out, x2, col, w2, sw, masked_m, 128)[1]["SCALE_TMA"]
    assert not masked_module.tma_launch_args(out, x2, sx, w2, sw, masked_m, 128)[1]["SCALE_TMA"]
    config = dict(BLOCK_M=128, BLOCK_N=64, WARP_SPECIALIZE=True, num_warps=4, num_stages=4)
    masked_module.launch_fp8_grouped_gemm_masked(out, qx, col, qw, sw, masked_m, 128, config, capability=PATHS["tma"])
    _check(out, qx, sx, qw, sw, masked_m)


@pytest.mark.parametrize("path", list(PATHS))
def test_strided_output_and_no_out_of_bounds_writes(path, monkeypatch, device):
    monkeypatch.setattr(masked_module, "device_capability", lambda device: PATHS[path])
    counts, max_m, N, K = [3, 8], 8, 40, 128
    _, _, qx, sx, qw, sw = _operands(2, max_m, N, K, device)
    masked_m = torch.tensor(counts, dtype=torch.int32, device=device)
    guard = nan_empty((3, max_m + 2, N + 6), torch.float32, device)
    out = fp8_grouped_gemm_masked.launch(qx, sx, qw, sw, masked_m, torch.float32, out=guard[1:, 1:max_m + 1, 2:N + 2])
    inside = torch.zeros_like(guard, dtype=torch.bool)
    inside[1:, 1:max_m + 1, 2:N + 2] = True
    assert guard[~inside].isnan().all(), "wrote outside the output"
    _check(out, qx, sx, qw, sw, masked_m)


def test_public_op_and_calc_diff_against_bf16(device):
    """DeepGEMM's acceptance test on the real rows, end to end through the kernel quantizers."""
    counts, max_m, N, K = [20, 0, 32], 32, 128, 512
    x, w, _, _, _, _ = _operands(len(counts), max_m, N, K, device)
    qx, sx = quant_act(x)
    qw, sw = quant_weight(w)
    masked_m = torch.tensor(counts, dtype=torch.int32, device=device)
    out = fp8_grouped_gemm_masked(qx, sx, qw, sw, masked_m)
    assert out.dtype == torch.bfloat16 and out.shape == (3, max_m, N)
    _check(out, qx, sx, qw, sw, masked_m)
    for e, m in enumerate(counts):
        if m:
            assert ref.calc_diff(out[e, :m], x[e, :m] @ w[e].T) < 1e-3


def test_validate_raises_on_out_of_range_counts(device):
    _, _, qx, sx, qw, sw = _operands(2, 4, 32, 128, device)
    for bad in ([-1, 2], [2, 5]):
        masked_m = torch.tensor(bad, dtype=torch.int32, device=device)
        with pytest.raises(ValueError, match=r"masked_m: expected row counts in \[0, 4\] \(max_m\)"):
            fp8_grouped_gemm_masked(qx, sx, qw, sw, masked_m, validate=True)
        with pytest.raises(ValueError, match=r"masked_m: expected row counts in \[0, 4\] \(max_m\)"):
            ref.fp8_grouped_gemm_masked(qx, sx, qw, sw, masked_m, validate=True)
    fp8_grouped_gemm_masked(qx, sx, qw, sw, torch.tensor([0, 4], device=device), validate=True)  # the bounds pass


def test_empty_shapes(device):
    _, _, qx, sx, qw, sw = _operands(2, 4, 32, 128, device)
    masked_m = torch.tensor([1, 4], dtype=torch.int32, device=device)
    assert fp8_grouped_gemm_masked(qx[:, :0], sx[:, :0], qw, sw, masked_m).shape == (2, 0, 32)
    assert fp8_grouped_gemm_masked(qx, sx, qw[:, :0], sw[:, :0], masked_m).shape == (2, 4, 0)
    assert fp8_grouped_gemm_masked(qx[:0], sx[:0], qw[:0], sw[:0], masked_m[:0]).shape == (0, 4, 32)
    z = fp8_grouped_gemm_masked(qx[..., :0], sx[..., :0], qw[..., :0], sw[..., :0], masked_m, torch.float32)
    assert torch.equal(z, torch.zeros(2, 4, 32, device=device))  # K = 0: the empty sum


def test_bad_inputs_raise_naming_the_argument(device):
    _, _, qx, sx, qw, sw = _operands(2, 4, 64, 256, device)
    masked_m = torch.tensor([1, 4], dtype=torch.int32, device=device)
    with pytest.raises(TypeError, match="x: expected dtype float8_e4m3fn"):
        fp8_grouped_gemm_masked(qx.float(), sx, qw, sw, masked_m)
    with pytest.raises(ValueError, match=r"x: expected \(E=2, max_m, K=256\)"):
        fp8_grouped_gemm_masked(qx[:1], sx[:1], qw, sw, masked_m)
    with pytest.raises(ValueError, match=r"w_s: expected shape \(2, 1, 2\)"):
        fp8_grouped_gemm_masked(qx, sx, qw, sw[:, :, :1], masked_m)
    with pytest.raises(TypeError, match="masked_m: expected dtype int32/int64"):
        fp8_grouped_gemm_masked(qx, sx, qw, sw, masked_m.float())
    with pytest.raises(ValueError, match="x: the Triton fp8_grouped_gemm_masked kernel takes K .* got K=200"):
        fp8_grouped_gemm_masked(qx[..., :200], sx, qw[..., :200], sw, masked_m)
    with pytest.raises(TypeError, match="out_dtype"):
        fp8_grouped_gemm_masked(qx, sx, qw, sw, masked_m, torch.int8)


def test_fake_implementation(device):
    _, _, qx, sx, qw, sw = _operands(2, 4, 64, 128, device)
    masked_m = torch.tensor([1, 4], dtype=torch.int32, device=device)
    torch.library.opcheck(torch.ops.moela.fp8_grouped_gemm_masked.default, (qx, sx, qw, sw, masked_m),
                          test_utils=("test_faketensor",))


def test_compiles_fullgraph(device):
    """No host sync and an explicit fake: the op traces whole under torch.compile."""
    _, _, qx, sx, qw, sw = _operands(2, 4, 64, 128, device)
    masked_m = torch.tensor([3, 0], dtype=torch.int32, device=device)
    fn = torch.compile(lambda *a: fp8_grouped_gemm_masked(*a, torch.float32), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fn(qx, sx, qw, sw, masked_m),
                               fp8_grouped_gemm_masked(qx, sx, qw, sw, masked_m, torch.float32), rtol=0, atol=0)


# ------------------------------------------------------------------------------------ GPU tier

@pytest.mark.gpu
@pytest.mark.parametrize("counts", [[256] * 4, [0, 17, 256, 131]], ids=["full", "ragged"])
def test_gpu_deepgemm_masked_4x256(counts):
    max_m, N, K = 256, 7168, 2048
    x, w, _, _, _, _ = _operands(4, max_m, N, K, "cuda")
    qx, sx = quant_act(x)
    qw, sw = quant_weight(w)
    masked_m = torch.tensor(counts, dtype=torch.int32, device="cuda")
    out = fp8_grouped_gemm_masked.launch(qx, sx, qw, sw, masked_m, torch.bfloat16,
                                         out=nan_empty((4, max_m, N), torch.bfloat16, "cuda"))
    _check(out, qx, sx, qw, sw, masked_m)
    for e, m in enumerate(counts):
        if m:
            assert ref.calc_diff(out[e, :m], x[e, :m] @ w[e].T) < 1e-3
