"""kernels.fp8_grouped_gemm: the FP8 grouped expert GEMM against reference.fp8_grouped_gemm.

Ragged groups (empty ones, a tail of rows past offsets[-1], one group holding every row, no
groups), int32 and int64 offsets, outputs pre-filled with NaN so a tile the device-side schedule
forgets fails. Near exact within the bound of tests/fp8_testing.py; calc_diff < 1e-3 against the
bf16 grouped GEMM of the unquantized inputs. Both paths of ``fp8_mainloop.fp8_path`` (the Hopper
kernel, persistent over 3 "SMs" and finding tiles with ``locate_m_tile_by_chunks``, and the
pointer kernel). GPU tier: DeepGEMM's grouped shapes and a DeepSeek-V3 decode step.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import triton
import triton.language as tl
from fp8_testing import PATHS, abs_fp8, assert_gemm_close, record_launches
from hypothesis import given, settings
from hypothesis import strategies as st
from moela_testing import nan_empty

from moela import reference as ref
from moela.kernels._common import INTERPRETER_SMS
from moela.kernels.fp8_grouped_gemm import fp8_grouped_gemm, launch_fp8_grouped_gemm
from moela.kernels.fp8_quant import quant_act, quant_weight, to_col_major
from moela.kernels.tl_helpers import locate_m_tile, locate_m_tile_by_chunks

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


@pytest.mark.parametrize("case", ["ragged-tail", "one-of-many", "all-tail", "multi-tile-group"])
def test_fp8_grouped_gemm_pointer_path_near_exact(case, device):
    """The pre-Hopper path (the rule given sm_89) on the same layouts."""
    sizes, tail, N, K = CASES[case]
    _, _, xs, xs_s, w8, w_s, offsets = _operands(sizes, tail, N, K, device)
    out = nan_empty((xs.shape[0], N), torch.float32, device)
    launch_fp8_grouped_gemm(out, xs, xs_s, w8, w_s, offsets, 128, None, capability=PATHS["pointer"])
    _check(out, xs, xs_s, w8, w_s, offsets)


CONFIGS = {  # path, config, N
    "vector-b-scales": ("pointer", dict(BLOCK_M=16, BLOCK_N=256, GROUP_M=1, num_warps=4), 160),
    "tiles-of-16-rows": ("pointer", dict(BLOCK_M=16, BLOCK_N=32, GROUP_M=4, num_warps=4), 48),
    "tma-vector-b-scales": ("tma", dict(BLOCK_M=64, BLOCK_N=256, GROUP_M=1, num_warps=4, num_stages=2), 160),
    "tma-warp-specialized": ("tma", dict(BLOCK_M=128, BLOCK_N=64, WARP_SPECIALIZE=True, num_warps=4, num_stages=4), 72),
}


@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_fp8_grouped_gemm_configs(cfg, device):
    path, config, N = CONFIGS[cfg]
    _, _, xs, xs_s, w8, w_s, offsets = _operands([17, 0, 3, 17], 1, N, 256, device)
    out = nan_empty((xs.shape[0], N), torch.float32, device)
    launch_fp8_grouped_gemm(out, xs, xs_s, w8, w_s, offsets, 128, config, capability=PATHS[path])
    _check(out, xs, xs_s, w8, w_s, offsets)


@triton.jit
def _locate_both_kernel(offsets_ptr, out_ptr, M, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr,
                        CHUNK: tl.constexpr):
    t = tl.program_id(0)
    g0, s0, e0 = locate_m_tile(offsets_ptr, t, M, E, BLOCK_M, BLOCK_E)
    g1, s1, e1, _first = locate_m_tile_by_chunks(offsets_ptr, t, M, E, BLOCK_M, CHUNK)
    base = out_ptr + t * 6
    tl.store(base + 0, g0)
    tl.store(base + 1, g1)
    tl.store(base + 2, s0)
    tl.store(base + 3, s1)
    tl.store(base + 4, e0)
    tl.store(base + 5, e1)


TILE_SEARCH = {
    "ragged": [3, 3, 10, 40, 41, 41, 60, 77, 77, 80],  # empty groups, a tail (M = 90)
    "malformed": [5, 2, 50, -4, 200, 95, 30, 88, 89, 90],  # decreasing, negative, past M
    "all-tail": [0] * 10,  # every row in the tail
}


@pytest.mark.parametrize("case,dtype", [("ragged", torch.int32), ("malformed", torch.int32),
                                        ("malformed", torch.int64), ("all-tail", torch.int32)],
                         ids=["ragged-int32", "malformed-int32", "malformed-int64", "all-tail-int32"])
def test_tile_search_without_scans_matches_locate_m_tile(case, dtype, device):
    """The Hopper kernel's scan-free tile search (4 groups at a time here: three chunks) finds
    the same (group, first row, end row) as ``locate_m_tile`` for every tile and one past."""
    M, BLOCK_M = 90, 16
    off = torch.tensor(TILE_SEARCH[case], dtype=dtype, device=device)
    E = off.shape[0]
    tiles = min(-(-M // BLOCK_M) + E, M) + 1
    out = torch.full((tiles * 6 + 2,), -7, dtype=torch.int32, device=device)
    _locate_both_kernel[(tiles,)](off, out, M, E, BLOCK_M=BLOCK_M, BLOCK_E=16, CHUNK=4)
    both = out[: tiles * 6].view(tiles, 3, 2)
    assert torch.equal(both[..., 0], both[..., 1]), both


@triton.jit
def _locate_aligned_kernel(offsets_ptr, out_ptr, M, E, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr):
    t = tl.program_id(0)
    g, s, e, first = locate_m_tile_by_chunks(offsets_ptr, t, M, E, BLOCK_M, CHUNK, 4)
    tl.store(out_ptr + t * 4 + 0, g)
    tl.store(out_ptr + t * 4 + 1, s)
    tl.store(out_ptr + t * 4 + 2, e)
    tl.store(out_ptr + t * 4 + 3, first)


def _aligned_tiles(offsets: list[int], M: int, block_m: int) -> list[tuple[int, int, int, int]]:
    """The aligned tile search written out: (group, first row of the tile, end row, the group's
    first row) for each tile, groups in order (the tail last), tiles from the group's first row
    rounded down to 4, none for an empty group."""
    tiles, prev = [], 0
    for g, raw in enumerate([*offsets, M]):
        start = prev
        end = max(start, min(max(raw, 0), M))
        prev = end
        if end > start:
            first_tile = start // 4 * 4
            tiles += [(g, first_tile + j * block_m, end, start) for j in range(-(-(end - first_tile) // block_m))]
    return tiles


@pytest.mark.parametrize("case", list(TILE_SEARCH))
def test_aligned_tile_search(case, device):
    """ALIGN = 4 (the Hopper kernel with descriptor-read scales): every tile as written out in
    Python, within the grid's bound, and tiles past the last get (0, 0, 0, 0)."""
    M, BLOCK_M = 90, 16
    offsets = TILE_SEARCH[case]
    E = len(offsets)
    bound = min(-(-(M + (E + 1) * 3) // BLOCK_M) + E, M)
    want = _aligned_tiles(offsets, M, BLOCK_M)
    assert len(want) <= bound
    out = torch.full((bound * 4,), -7, dtype=torch.int32, device=device)
    off = torch.tensor(offsets, dtype=torch.int32, device=device)
    _locate_aligned_kernel[(bound,)](off, out, M, E, BLOCK_M=BLOCK_M, CHUNK=4)
    got = [tuple(r) for r in out.view(bound, 4).tolist()]
    assert got == want + [(0, 0, 0, 0)] * (bound - len(want))


@pytest.mark.parametrize("tail", [0, 5])
def test_fp8_grouped_gemm_warp_specialized_scales_through_descriptors(tail, device):
    """Column-major xs_s and Kb = 12: the warp-specialised schedule reads the scales
    through descriptors (SCALE_TMA), each group's tiles from its first row rounded down to 4
    (groups at rows 17, 20, 150 here: the rows of the group before are computed, never stored),
    each expert's weight-scale rows at expert · N/B."""
    N = 160
    _, _, xs, xs_s, w8, w_s, offsets = _operands([17, 0, 3, 130], tail, N, 1536, device)  # Kb 12: boxes at 0, 4, 8
    out = nan_empty((xs.shape[0], N), torch.float32, device)
    col = to_col_major(xs_s)
    grouped_module = importlib.import_module("moela.kernels.fp8_grouped_gemm")
    w2 = w8.reshape(-1, w8.shape[-1])
    assert grouped_module.tma_launch_args(out, xs, col, w2, w_s, offsets, 128)[1]["SCALE_TMA"]
    assert not grouped_module.tma_launch_args(out, xs, xs_s, w2, w_s, offsets, 128)[1]["SCALE_TMA"]
    config = dict(BLOCK_M=128, BLOCK_N=64, WARP_SPECIALIZE=True, num_warps=4, num_stages=4)
    launch_fp8_grouped_gemm(out, xs, col, w8, w_s, offsets, 128, config, capability=PATHS["tma"])
    _check(out, xs, xs_s, w8, w_s, offsets)


@pytest.mark.parametrize("path", list(PATHS))
def test_strided_offsets(path, device):
    """A strided (non-contiguous) offsets view: the kernel indexes offsets flat, the launcher makes
    them contiguous."""
    sizes = [5, 0, 15, 13]
    _, _, xs, xs_s, w8, w_s, offsets = _operands(sizes, 7, 64, 128, device, offsets_dtype=torch.int64)
    strided = torch.stack([offsets, torch.full_like(offsets, xs.shape[0])], 1)[:, 0]
    assert strided.stride() == (2,)
    out = nan_empty((xs.shape[0], 64), torch.float32, device)
    if path == "tma":
        fp8_grouped_gemm.launch(xs, xs_s, w8, w_s, strided, torch.float32, out=out)
    else:
        launch_fp8_grouped_gemm(out, xs, xs_s, w8, w_s, strided.contiguous(), 128, None, capability=PATHS[path])
    _check(out, xs, xs_s, w8, w_s, offsets)


@pytest.mark.parametrize("path", list(PATHS))
def test_worst_case_tile_count_fits_the_grid(path, device):
    """Every group one row longer than a tile, plus a one-row tail: Σ ceil(count/BLOCK_M) reaches
    its maximum relative to cdiv(M, BLOCK_M) + E, and every tile must still run."""
    sizes = [17] * 5
    _, _, xs, xs_s, w8, w_s, offsets = _operands(sizes, 1, 16, 128, device)
    out = nan_empty((xs.shape[0], 16), torch.float32, device)
    launch_fp8_grouped_gemm(out, xs, xs_s, w8, w_s, offsets, 128, dict(BLOCK_M=16, BLOCK_N=16, GROUP_M=8, num_warps=4),
                            capability=PATHS[path])
    _check(out, xs, xs_s, w8, w_s, offsets)


@pytest.mark.parametrize("path", list(PATHS))
def test_decode_grid_launches_no_idle_row_tiles(path, monkeypatch, device):
    """More experts than rows (a decode step): at most one row tile per row, not cdiv(M, BLOCK_M)
    + E of them (E - 1 idle ones per column tile here), and one-row groups (as many tiles as rows:
    the bound is tight) are all written. The pointer kernel runs one program per tile, the Hopper
    one min(tiles, SMs) persistent programs; E = 32 makes its tile search take three chunks."""
    name = "_fp8_grouped_gemm_kernel" if path == "pointer" else "_fp8_grouped_gemm_tma_kernel"
    launched = record_launches(monkeypatch, fp8_grouped_gemm_module, (name,))
    sizes = [1, 0, 1, 1, 0, 0, 1] + [0] * 25  # E = 32, four one-row groups and a one-row tail
    _, _, xs, xs_s, w8, w_s, offsets = _operands(sizes, 1, 32, 128, device)
    out = nan_empty((5, 32), torch.float32, device)
    launch_fp8_grouped_gemm(out, xs, xs_s, w8, w_s, offsets, 128, dict(BLOCK_M=16, BLOCK_N=16, GROUP_M=8, num_warps=4),
                            capability=PATHS[path])
    tiles = 5 * 2  # row tiles min(cdiv(M, BLOCK_M) + E, M) = 5, times 2 column tiles
    assert launched == [(name, (tiles if path == "pointer" else min(tiles, INTERPRETER_SMS),))]
    _check(out, xs, xs_s, w8, w_s, offsets)


@settings(max_examples=5)
@given(sizes=st.lists(st.integers(0, 20), min_size=0, max_size=6), tail=st.integers(0, 3))
def test_random_group_sizes_property(sizes, tail):
    """Any group layout, both paths: every row written once, by its own expert (16-row tiles,
    32-wide N)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"  # hypothesis: no fixtures
    _, _, xs, xs_s, w8, w_s, offsets = _operands(sizes, tail, 32, 128, device)
    if xs.shape[0] == 0:
        return  # M = 0: nothing to launch (the op returns before the kernels)
    for cap in PATHS.values():
        out = nan_empty((xs.shape[0], 32), torch.float32, device)
        launch_fp8_grouped_gemm(out, xs, xs_s, w8, w_s, offsets, 128, dict(BLOCK_M=16, BLOCK_N=32, GROUP_M=2,
                                                                           num_warps=4), capability=cap)
        _check(out, xs, xs_s, w8, w_s, offsets)


def test_fp8_grouped_gemm_public_op_and_calc_diff_against_bf16(device):
    x, w, _, _, _, _, offsets = _operands([20, 0, 44], 3, 128, 256, device)
    xs, xs_s = quant_act(x)  # the kernel quantizers, end to end
    w8, w_s = quant_weight(w)
    out = fp8_grouped_gemm(xs, to_col_major(xs_s), w8, w_s, offsets)
    assert out.dtype == torch.bfloat16
    _check(out, xs, xs_s, w8, w_s, offsets)
    assert ref.calc_diff(out, ref.grouped_gemm(x, w, offsets)) < 1e-3


@pytest.mark.parametrize("path", list(PATHS))
def test_malformed_offsets_validate_or_stay_in_bounds(path, monkeypatch, device):
    monkeypatch.setattr(fp8_grouped_gemm_module, "device_capability", lambda device: PATHS[path])
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
