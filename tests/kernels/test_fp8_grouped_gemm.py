"""kernels.fp8_grouped_gemm: the FP8 grouped expert GEMM against reference.fp8_grouped_gemm.

Ragged groups (empty ones, a tail of rows past offsets[-1], one group holding every row, no
groups), int32 and int64 offsets, outputs pre-filled with NaN so a tile the device-side schedule
forgets fails. Near exact within the bound of tests/fp8_testing.py; calc_diff < 1e-3 against the
bf16 grouped GEMM of the unquantized inputs. GPU tier: DeepGEMM's grouped shapes and a
DeepSeek-V3 decode step.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from fp8_testing import abs_fp8, assert_gemm_close
from hypothesis import given, settings
from hypothesis import strategies as st
from moela_testing import nan_empty

from moela import reference as ref
from moela.kernels.fp8_grouped_gemm import fp8_grouped_gemm
from moela.kernels.fp8_quant import quant_act, quant_weight, to_col_major

fp8_grouped_gemm_module = importlib.import_module("moela.kernels.fp8_grouped_gemm")
factory = importlib.import_module("moela.kernels.factory")

try:
    from moela.profiling.shapes import DEEPGEMM_GROUPED
except ImportError:  # DeepGEMM's grouped shapes: (label, groups, rows per group, n, k)
    DEEPGEMM_GROUPED = (("contiguous 4x8192", 4, 8192, 4096, 7168), ("contiguous 8x4096", 8, 4096, 7168, 2048),
                        ("masked 4x256", 4, 256, 7168, 2048))

# triton 3.6's interpreter turns a loop bound computed in the kernel into a Python int through a
# 1-element array, which numpy 2.3 deprecates.


def _operands(sizes, tail, N, K, device, dtype=torch.bfloat16, offsets_dtype=torch.int32):
    M, E = sum(sizes) + tail, len(sizes)
    x = torch.randn(M, K, device=device, dtype=dtype)
    w = (torch.randn(E, N, K, device=device) * K**-0.5).to(dtype)
    offsets = torch.tensor(sizes, dtype=torch.int64).cumsum(0).to(device=device, dtype=offsets_dtype)
    xs, xs_s = ref.quant_act(x)
    w8, w_s = ref.quant_weight(w)
    return x, w, xs, xs_s, w8, w_s, offsets


def _check(out, xs, xs_s, w8, w_s, offsets, name="out"):
    ref32 = ref.fp8_grouped_gemm(xs, xs_s, w8, w_s, offsets, torch.float32)
    mag = ref.fp8_grouped_gemm(abs_fp8(xs), xs_s.abs(), abs_fp8(w8), w_s.abs(), offsets, torch.float32)
    assert_gemm_close(out, ref32, mag, xs.shape[1] // 128, 128, name)


# (group sizes, rows past the last group, N, K)
CASES = {
    "ragged-tail": ([5, 0, 15, 13], 7, 128, 256),
    "leading-and-trailing-empty": ([0, 0, 21, 0], 0, 64, 128),
    "single-group": ([37], 0, 96, 256),
    "one-of-many": ([0, 0, 0, 9, 0, 0, 0], 2, 48, 128),
    "all-tail": ([0, 0], 6, 64, 128),
    "no-experts": ([], 5, 32, 128),
    "no-rows": ([0, 0, 0], 0, 64, 128),
    "multi-tile-group": ([70, 3], 1, 40, 128),  # > one default 64-row tile in the medium class
}


@pytest.mark.parametrize(
    "case,offsets_dtype",
    [(c, torch.int32) for c in CASES] + [(c, torch.int64) for c in ("ragged-tail", "multi-tile-group")],
    ids=[f"{c}-int32" for c in CASES] + [f"{c}-int64" for c in ("ragged-tail", "multi-tile-group")],
)
def test_fp8_grouped_gemm_near_exact_against_reference(case, offsets_dtype, device):
    sizes, tail, N, K = CASES[case]
    _, _, xs, xs_s, w8, w_s, offsets = _operands(sizes, tail, N, K, device, offsets_dtype=offsets_dtype)
    out = nan_empty((xs.shape[0], N), torch.float32, device)
    assert fp8_grouped_gemm.launch(xs, xs_s, w8, w_s, offsets, torch.float32, out=out) is out
    _check(out, xs, xs_s, w8, w_s, offsets)
    assert (out[int(offsets[-1]) if len(sizes) else 0:] == 0).all()  # the tail is zero


CONFIGS = {  # config, N
    "vector-b-scales": (dict(BLOCK_M=16, BLOCK_N=256, GROUP_M=1, num_warps=4), 160),
    "tiles-of-16-rows": (dict(BLOCK_M=16, BLOCK_N=32, GROUP_M=4, num_warps=4), 48),
}


@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_fp8_grouped_gemm_configs(cfg, device):
    config, N = CONFIGS[cfg]
    _, _, xs, xs_s, w8, w_s, offsets = _operands([17, 0, 3, 17], 1, N, 256, device)
    out = nan_empty((xs.shape[0], N), torch.float32, device)
    fp8_grouped_gemm.launch(xs, xs_s, w8, w_s, offsets, torch.float32, out=out, config=config)
    _check(out, xs, xs_s, w8, w_s, offsets)


def test_strided_offsets(device):
    """A strided (non-contiguous) offsets view: the kernel indexes offsets flat, the launcher makes
    them contiguous."""
    sizes = [5, 0, 15, 13]
    _, _, xs, xs_s, w8, w_s, offsets = _operands(sizes, 7, 64, 128, device, offsets_dtype=torch.int64)
    strided = torch.stack([offsets, torch.full_like(offsets, xs.shape[0])], 1)[:, 0]
    assert strided.stride() == (2,)
    out = nan_empty((xs.shape[0], 64), torch.float32, device)
    fp8_grouped_gemm.launch(xs, xs_s, w8, w_s, strided, torch.float32, out=out)
    _check(out, xs, xs_s, w8, w_s, offsets)


def test_worst_case_tile_count_fits_the_grid(device):
    """Every group one row longer than a tile, plus a one-row tail: Σ ceil(count/BLOCK_M) reaches
    its maximum relative to cdiv(M, BLOCK_M) + E, and every tile must still run."""
    sizes = [17] * 5
    _, _, xs, xs_s, w8, w_s, offsets = _operands(sizes, 1, 16, 128, device)
    out = nan_empty((xs.shape[0], 16), torch.float32, device)
    fp8_grouped_gemm.launch(xs, xs_s, w8, w_s, offsets, torch.float32, out=out,
                         config=dict(BLOCK_M=16, BLOCK_N=16, GROUP_M=8, num_warps=4))
    _check(out, xs, xs_s, w8, w_s, offsets)


def test_decode_grid_launches_no_idle_row_tiles(monkeypatch, device):
    """More experts than rows (a decode step): the grid has at most one row tile per row, not
    cdiv(M, BLOCK_M) + E of them (E - 1 idle ones per column tile here), and one-row groups
    (as many tiles as rows: the bound is tight) are all written."""
    kernel, launched = fp8_grouped_gemm_module._fp8_grouped_gemm_kernel, []

    class _RecordGrid:
        def __getitem__(self, grid):
            launched.append(grid)
            return kernel[grid]

    monkeypatch.setattr(fp8_grouped_gemm_module, "_fp8_grouped_gemm_kernel", _RecordGrid())
    sizes = [1, 0, 1, 1, 0, 0, 1] + [0] * 25  # E = 32, four one-row groups and a one-row tail
    _, _, xs, xs_s, w8, w_s, offsets = _operands(sizes, 1, 32, 128, device)
    out = nan_empty((5, 32), torch.float32, device)
    fp8_grouped_gemm.launch(xs, xs_s, w8, w_s, offsets, torch.float32, out=out,
                         config=dict(BLOCK_M=16, BLOCK_N=16, GROUP_M=8, num_warps=4))
    assert launched == [(5 * 2,)], "row tiles: min(cdiv(M, BLOCK_M) + E, M) = 5, times 2 column tiles"
    _check(out, xs, xs_s, w8, w_s, offsets)


@settings(max_examples=8)
@given(sizes=st.lists(st.integers(0, 20), min_size=0, max_size=6), tail=st.integers(0, 3))
def test_random_group_sizes_property(sizes, tail):
    """Any group layout: every row written once, by its own expert (16-row tiles, 32-wide N)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"  # hypothesis: no fixtures
    _, _, xs, xs_s, w8, w_s, offsets = _operands(sizes, tail, 32, 128, device)
    out = nan_empty((xs.shape[0], 32), torch.float32, device)
    fp8_grouped_gemm.launch(xs, xs_s, w8, w_s, offsets, torch.float32, out=out,
                         config=dict(BLOCK_M=16, BLOCK_N=32, GROUP_M=2, num_warps=4))
    _check(out, xs, xs_s, w8, w_s, offsets)


def test_fp8_grouped_gemm_public_op_and_calc_diff_against_bf16(device):
    x, w, _, _, _, _, offsets = _operands([20, 0, 44], 3, 128, 256, device)
    xs, xs_s = quant_act(x)  # the kernel quantizers, end to end
    w8, w_s = quant_weight(w)
    out = fp8_grouped_gemm(xs, to_col_major(xs_s), w8, w_s, offsets)
    assert out.dtype == torch.bfloat16
    _check(out, xs, xs_s, w8, w_s, offsets)
    assert ref.calc_diff(out, ref.grouped_gemm(x, w, offsets)) < 1e-3


def test_malformed_offsets_validate_or_stay_in_bounds(device):
    _, _, xs, xs_s, w8, w_s, _ = _operands([6, 6, 6], 2, 32, 128, device)
    M = xs.shape[0]
    for bad in ([4, 2, 20], [-3, 5, 10], [5, 10, M + 7]):
        offsets = torch.tensor(bad, dtype=torch.int32, device=device)
        with pytest.raises(ValueError, match="offsets: expected non-decreasing cumulative row ends"):
            fp8_grouped_gemm(xs, xs_s, w8, w_s, offsets, validate=True)
        with pytest.raises(ValueError, match="offsets: expected non-decreasing cumulative row ends"):
            ref.fp8_grouped_gemm(xs, xs_s, w8, w_s, offsets, validate=True)
        guard = nan_empty((M + 4, 40), torch.float32, device)
        out = fp8_grouped_gemm.launch(xs, xs_s, w8, w_s, offsets, torch.float32, out=guard[2:M + 2, 4:36])
        inside = torch.zeros_like(guard, dtype=torch.bool)
        inside[2:M + 2, 4:36] = True
        assert guard[~inside].isnan().all(), f"offsets {bad}: wrote outside the output"
        # the documented result: offsets clamped into [0, M] with a running max, as the reference
        torch.testing.assert_close(out, ref.fp8_grouped_gemm(xs, xs_s, w8, w_s, offsets, torch.float32),
                                   rtol=1e-6, atol=1e-6)


def test_bad_inputs_raise_naming_the_argument(device):
    _, _, xs, xs_s, w8, w_s, offsets = _operands([3, 5], 0, 64, 256, device)
    with pytest.raises(TypeError, match="xs: expected dtype float8_e4m3fn"):
        fp8_grouped_gemm(xs.float(), xs_s, w8, w_s, offsets)
    with pytest.raises(ValueError, match="w: expected a 3-D tensor"):
        fp8_grouped_gemm(xs, xs_s, w8[0], w_s, offsets)
    with pytest.raises(ValueError, match="xs: expected K=128 columns"):
        fp8_grouped_gemm(xs, xs_s, w8[:, :, :128], w_s, offsets)
    with pytest.raises(ValueError, match="xs: the Triton fp8_grouped_gemm kernel takes K .* block=128, got K=200"):
        fp8_grouped_gemm(xs[:, :200], xs_s, w8[:, :, :200], w_s, offsets)
    with pytest.raises(ValueError, match=r"w_s: expected shape \(2, 1, 2\)"):
        fp8_grouped_gemm(xs, xs_s, w8, w_s[:1], offsets)
    with pytest.raises(ValueError, match=r"xs_s: expected shape \(8, 2\)"):
        fp8_grouped_gemm(xs, xs_s[:4], w8, w_s, offsets)
    with pytest.raises(TypeError, match="offsets: expected dtype int32/int64"):
        fp8_grouped_gemm(xs, xs_s, w8, w_s, offsets.float())
    with pytest.raises(ValueError, match=r"offsets: expected shape \(2\)"):
        fp8_grouped_gemm(xs, xs_s, w8, w_s, offsets[:1])
    with pytest.raises(TypeError, match="out_dtype"):
        fp8_grouped_gemm(xs, xs_s, w8, w_s, offsets, torch.int8)


def test_launcher_checks_the_fp8_capability(monkeypatch, device):
    def refuse(name, dev):
        raise RuntimeError(f"{name}: old GPU")

    monkeypatch.setattr(factory, "check_fp8_capability", refuse)
    factory.forget_checked()  # signatures checked before this test were checked with the real capability
    _, _, xs, xs_s, w8, w_s, offsets = _operands([3], 0, 64, 128, device)
    with pytest.raises(RuntimeError, match="fp8_grouped_gemm: old GPU"):
        fp8_grouped_gemm(xs, xs_s, w8, w_s, offsets)


def test_fake_implementation(device):
    _, _, xs, xs_s, w8, w_s, offsets = _operands([3, 2], 1, 64, 128, device)
    torch.library.opcheck(torch.ops.moela.fp8_grouped_gemm.default, (xs, xs_s, w8, w_s, offsets),
                          test_utils=("test_faketensor",))


# ------------------------------------------------------------------------------------ GPU tier

def _v3_decode_sizes(E=256, rows=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, E, (rows,), generator=g)
    return torch.bincount(ids, minlength=E).tolist()


GPU_CASES = {label: ([rows] * groups, 0, n, k) for label, groups, rows, n, k in DEEPGEMM_GROUPED}
GPU_CASES["v3-decode 256 experts x 512 rows"] = (_v3_decode_sizes(), 3, 4096, 7168)


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_gpu_fp8_grouped_gemm_deepseek_shapes(case):
    sizes, tail, N, K = GPU_CASES[case]
    x, w, _, _, _, _, offsets = _operands(sizes, tail, N, K, "cuda")
    xs, xs_s = quant_act(x)
    w8, w_s = quant_weight(w)
    out = fp8_grouped_gemm.launch(xs, to_col_major(xs_s), w8, w_s, offsets, torch.bfloat16,
                               out=nan_empty((xs.shape[0], N), torch.bfloat16, "cuda"))
    _check(out, xs, xs_s, w8, w_s, offsets)
    assert ref.calc_diff(out, ref.grouped_gemm(x, w, offsets)) < 1e-3
