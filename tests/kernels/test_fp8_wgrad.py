"""kernels.fp8_wgrad: dW = dyᵀ · x in FP8 from both operands' token-direction (B×1) quantizations,
against reference.fp8_wgrad.

Near exact within tests/fp8_testing.py's bound (the reduction is the M tokens, blocks of B). The
Hopper kernel scales each block's product as ``p · (dy_t_s ⊗ x_t_s)``, the reference as
``(p · dy_t_s) · x_t_s``: two float32 roundings each, the 4u of that bound (a fused multiply-add
into the accumulator only drops one). DeepGEMM's calc_diff < 1e-3 against the float32 dyᵀ · x of
the unquantized inputs. CPU: both kernels of the path rule ``fp8_mainloop.fp8_path`` (the Hopper
kernel whenever M is a multiple of 16 and block 128, persistent over 3 "SMs"; the pointer kernel
for odd M, other blocks, pre-Hopper), ragged N, K and M (M < 128, an odd number of token blocks:
the pipelined schedule's block past M), every output dtype, strided outputs with a NaN guard
border, the pipelined (3 and 4 live tiles) and warp-specialised schedules, the scale layouts the
descriptors read in place or copied, explicit configs of the wrong kernel. GPU tier: DeepSeek-V3
projection weights at T=4096, and each Hopper config. The sm_90 compile: test_fp8_sm90.py and the
audit (``profiling audit --kernels fp8_wgrad_tma``).
"""

from __future__ import annotations

import importlib

import pytest
import torch
from fp8_testing import PATHS, abs_fp8, assert_gemm_close, assert_same_bits, record_launches
from moela_testing import nan_empty

from moela import reference as ref
from moela.kernels import fp8_wgrad, quant_act_t
from moela.kernels._common import INTERPRETER_SMS
from moela.kernels.fp8_mainloop import fp8_path
from moela.kernels.fp8_quant import to_col_major

wgrad_module = importlib.import_module("moela.kernels.fp8_wgrad")  # the module (the package exports the op)


def _operands(M, N, K, device, block=128):
    dy = torch.randn(M, N, device=device, dtype=torch.bfloat16)
    x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
    return dy, x, *ref.quant_act_t(dy, block), *ref.quant_act_t(x, block)


def _check(out, a, a_s, b, b_s, block=128, name="dw"):
    ref32 = ref.fp8_wgrad(a, a_s, b, b_s, torch.float32, block)
    mag = ref.fp8_wgrad(abs_fp8(a), a_s.abs(), abs_fp8(b), b_s.abs(), torch.float32, block)
    assert_gemm_close(out, ref32, mag, -(-a.shape[1] // block), block, name)


SHAPES = {  # (M tokens: the reduction, N, K)
    "aligned": (256, 128, 128),
    "ragged-tokens": (300, 96, 72),
    "few-tokens": (7, 200, 130),
    "wide": (128, 64, 300),
}


@pytest.mark.parametrize("case", list(SHAPES))
def test_fp8_wgrad_near_exact_against_reference(case, device):
    M, N, K = SHAPES[case]
    _, _, a, a_s, b, b_s = _operands(M, N, K, device)
    out = nan_empty((N, K), torch.float32, device)
    assert fp8_wgrad.launch(a, a_s, b, b_s, out=out) is out
    _check(out, a, a_s, b, b_s)


def test_fp8_wgrad_bf16_output_configs_and_other_blocks(device):
    _, _, a, a_s, b, b_s = _operands(200, 100, 140, device)
    out = fp8_wgrad(a, a_s, b, b_s, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.shape == (100, 140)
    _check(out, a, a_s, b, b_s)
    for config in (dict(BLOCK_N=16, BLOCK_K=256, GROUP_N=1, num_warps=4), dict(BLOCK_N=64, BLOCK_K=32, GROUP_N=2)):
        out = fp8_wgrad.launch(a, a_s, b, b_s, config=config, out=nan_empty((100, 140), device=device))
        _check(out, a, a_s, b, b_s)
    _, _, a, a_s, b, b_s = _operands(100, 48, 40, device, 32)
    _check(fp8_wgrad(a, a_s, b, b_s, torch.float32, 32), a, a_s, b, b_s, 32)


def test_fp8_wgrad_matches_unquantized_product(device):
    """DeepGEMM's acceptance test (calc_diff < 1e-3), the kernel quantizer end to end."""
    dy, x, *_ = _operands(512, 128, 192, device)
    out = fp8_wgrad(*quant_act_t(dy), *quant_act_t(x))
    assert ref.calc_diff(out, dy.float().T @ x.float()) < 1e-3


def test_fp8_wgrad_empty_special_values_and_no_out_of_bounds_writes(device):
    _, _, a, a_s, b, b_s = _operands(130, 40, 72, device)
    z = fp8_wgrad(a[:, :0], a_s[:, :0], b[:, :0], b_s[:, :0])
    assert torch.equal(z, torch.zeros(40, 72, device=device))  # no tokens: the empty sum
    assert fp8_wgrad(a[:0], a_s[:0], b, b_s).shape == (0, 72)
    guard = nan_empty((44, 80), torch.float32, device)
    out = fp8_wgrad.launch(a, a_s, b, b_s, out=guard[2:42, 3:75])
    inside = torch.zeros_like(guard, dtype=torch.bool)
    inside[2:42, 3:75] = True
    assert guard[~inside].isnan().all()
    _check(out, a, a_s, b, b_s)
    b_s = b_s.clone()
    b_s[5, 1] = float("nan")  # a NaN token-block scale poisons its column of dw
    out = fp8_wgrad(a, a_s, b, b_s)
    assert out[:, 5].isnan().all() and torch.equal(out.isnan(), ref.fp8_wgrad(a, a_s, b, b_s).isnan())


def test_fp8_wgrad_bad_inputs_raise_naming_the_argument(device):
    _, _, a, a_s, b, b_s = _operands(256, 64, 32, device)
    for op in (fp8_wgrad, ref.fp8_wgrad):
        with pytest.raises(TypeError, match="dy_t: expected dtype float8_e4m3fn"):
            op(a.float(), a_s, b, b_s)
        with pytest.raises(ValueError, match=r"x_t: expected M=256 columns"):
            op(a, a_s, b[:, :128], b_s)
        with pytest.raises(ValueError, match=r"x_t_s: expected shape \(32, 2\)"):
            op(a, a_s, b, b_s[:, :1])
        with pytest.raises(ValueError, match="dy_t: expected a 2-D tensor"):
            op(a[None], a_s, b, b_s)
    with pytest.raises(ValueError, match="block: the Triton fp8_wgrad kernel takes one of"):
        fp8_wgrad(a, a_s[:, :1], b, b_s[:, :1], block=300)
    torch.library.opcheck(torch.ops.moela.fp8_wgrad.default, (a, a_s, b, b_s), test_utils=("test_faketensor",))


# ------------------------------------------------------------------------------------ the Hopper kernel

TMA_SHAPES = {  # (M tokens, N, K): M a multiple of 16 (TMA-readable rows), not of 128
    "one-partial-block": (48, 200, 130),  # M < 128: Mb = 1, ragged N and K
    "odd-blocks": (272, 136, 72),  # Mb = 3: the pipelined pair past M
    "even-blocks-wide": (400, 72, 300),  # Mb = 4: x_t_s read in place, three column tiles
}


def _launch(a, a_s, b, b_s, out, path="tma", config=None, block=128):
    wgrad_module.launch_fp8_wgrad(out, a, a_s, b, b_s, block, config, capability=PATHS[path])
    return out


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("case", list(TMA_SHAPES))
def test_fp8_wgrad_tma_near_exact(case, out_dtype, device):
    M, N, K = TMA_SHAPES[case]
    _, _, a, a_s, b, b_s = _operands(M, N, K, device)
    assert fp8_path(PATHS["tma"], 128, a, b) == "tma"
    out = _launch(a, a_s, b, b_s, nan_empty((N, K), out_dtype, device))
    _check(out, a, a_s, b, b_s)


TMA_CONFIGS = {  # the schedules a single default config cannot reach: config, (M, N, K)
    "pipelined-64-wide-4-tiles": (dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=4), (272, 200, 130)),
    "pipelined-64x128": (dict(BLOCK_M=64, BLOCK_N=128, GROUP_M=2, num_warps=4, num_stages=3), (400, 136, 72)),
    "warp-specialized-128x128": (dict(BLOCK_M=128, BLOCK_N=128, WARP_SPECIALIZE=True, num_warps=4, num_stages=4),
                                 (272, 200, 130)),
    "warp-specialized-128x64": (dict(BLOCK_M=128, BLOCK_N=64, WARP_SPECIALIZE=True, num_warps=4, num_stages=6),
                                (48, 136, 200)),
}


@pytest.mark.parametrize("cfg", list(TMA_CONFIGS))
def test_fp8_wgrad_tma_configs(cfg, device):
    config, (M, N, K) = TMA_CONFIGS[cfg]
    _, _, a, a_s, b, b_s = _operands(M, N, K, device)
    _check(_launch(a, a_s, b, b_s, nan_empty((N, K), device=device), config=config), a, a_s, b, b_s)


@pytest.mark.parametrize("config", [None, TMA_CONFIGS["warp-specialized-128x64"][0]], ids=["default", "ws"])
def test_fp8_wgrad_tma_strided_out_writes_nothing_outside(config, device):
    M, N, K = 272, 136, 72
    _, _, a, a_s, b, b_s = _operands(M, N, K, device)
    guard = nan_empty((N + 5, 2 * K + 8), torch.bfloat16, device)
    out = guard[2:N + 2, 3:2 * K + 3:2]  # strides (2K + 8, 2): everything around it must stay NaN
    _launch(a, a_s, b, b_s, out, config=config)
    inside = torch.zeros_like(guard, dtype=torch.bool)
    inside[2:N + 2, 3:2 * K + 3:2] = True
    assert guard[~inside].isnan().all()
    _check(out, a, a_s, b, b_s)


def test_fp8_wgrad_tma_bound_sees_a_per_tile_x_scale(device):
    """The test bound is tight enough to see x_t's scale applied per tile (the first column's for
    all) instead of per column of dW, and dy_t's per tile instead of per row."""
    M, N, K = 272, 136, 72
    _, _, a, a_s, b, b_s = _operands(M, N, K, device)
    per_tile = b_s[:1].expand_as(b_s)
    with pytest.raises(AssertionError, match="exceed the derived bound"):
        _check(ref.fp8_wgrad(a, a_s, b, per_tile), a, a_s, b, b_s)
    with pytest.raises(AssertionError, match="exceed the derived bound"):
        _check(ref.fp8_wgrad(a, a_s[:1].expand_as(a_s), b, b_s), a, a_s, b, b_s)


def test_fp8_wgrad_tma_scale_layouts(device):
    """The descriptors read dy_t_sᵀ (Mb, N) and x_t_s (K, Mb) with 16-byte aligned rows: in place
    for column-major dy_t_s and views of padded buffers (the padding NaN: never read), copied
    otherwise (row-major dy_t_s, Mb = 5 rows of 20 bytes); the same bits either way."""
    M, N, K = 560, 72, 136  # Mb = 5
    _, _, a, a_s, b, b_s = _operands(M, N, K, device)
    assert (M + 127) // 128 == 5
    first, second = wgrad_module.tma_scales(a_s, b_s)
    assert first.data_ptr() != a_s.data_ptr() and second.data_ptr() != b_s.data_ptr()  # copied
    assert torch.equal(first, a_s.t()) and torch.equal(second, b_s)
    col = to_col_major(a_s)
    buf = torch.full((K, 8), float("nan"), device=device)
    buf[:, :5] = b_s
    padded = buf[:, :5]
    first, second = wgrad_module.tma_scales(col, padded)
    assert first.data_ptr() == col.data_ptr() and second.data_ptr() == padded.data_ptr()  # in place
    base = _launch(a, a_s, b, b_s, nan_empty((N, K), device=device))
    _check(base, a, a_s, b, b_s)
    for config in (None, TMA_CONFIGS["warp-specialized-128x64"][0]):
        assert_same_bits(_launch(a, col, b, padded, nan_empty((N, K), device=device), config=config), base)


def test_fp8_wgrad_tma_nan_scales_poison_their_row_and_column(device):
    M, N, K = 400, 72, 136
    _, _, a, a_s, b, b_s = _operands(M, N, K, device)
    a_s, b_s = a_s.clone(), b_s.clone()
    a_s[7, 3] = float("nan")  # the last token block's scale of dW's row 7
    b_s[130, 1] = float("nan")  # a middle block's scale of dW's column 130
    out = _launch(a, a_s, b, b_s, nan_empty((N, K), device=device))
    expect = torch.zeros(N, K, dtype=torch.bool, device=device)
    expect[7, :] = True
    expect[:, 130] = True
    assert torch.equal(out.isnan(), expect)
    _check(out, a, a_s, b, b_s)


@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")  # inf · 0 past K, masked
def test_fp8_wgrad_tma_blocks_outside_the_range_are_promoted_with_zero(device):
    """Mb = 3: the pipelined schedule's last pair reaches block 3, past M (zero-filled), and its
    first pair's previous block does not exist; both are promoted with scale 0, not with block 0's
    scales (an infinite one would make 0 · inf = NaN where the reference has ±inf)."""
    M, N, K = 272, 72, 136
    _, _, a, a_s, b, b_s = _operands(M, N, K, device)
    a_s, b_s = a_s.clone(), b_s.clone()
    a_s[5, 0] = float("inf")
    b_s[9, 0] = float("inf")
    ref32 = ref.fp8_wgrad(a, a_s, b, b_s)
    assert ref32[5].isinf().any() and ref32[:, 9].isinf().any()
    for config in (None, TMA_CONFIGS["pipelined-64-wide-4-tiles"][0]):
        _check(_launch(a, a_s, b, b_s, nan_empty((N, K), device=device), config=config), a, a_s, b, b_s)


def test_path_rule():
    """Hopper's kernel when the GPU has TMA, block 128 and both operands TMA-readable (M a multiple
    of 16 for contiguous rows); the pointer kernel otherwise."""
    f8 = torch.float8_e4m3fn
    a, b = torch.zeros(72, 48, dtype=f8), torch.zeros(40, 48, dtype=f8)
    assert fp8_path((9, 0), 128, a, b) == "tma"
    assert fp8_path((10, 0), 128, a, b) == "tma"
    assert fp8_path((8, 9), 128, a, b) == "pointer"  # Ada: FP8, no TMA / wgmma
    assert fp8_path((9, 0), 64, a, b) == "pointer"  # the Hopper configs are sized for 128 tokens
    odd = torch.zeros(72, 40, dtype=f8)
    assert fp8_path((9, 0), 128, odd, torch.zeros(40, 40, dtype=f8)) == "pointer"  # M = 40: 40-byte rows
    assert fp8_path((9, 0), 128, torch.zeros(72, 64, dtype=f8)[:, :40], torch.zeros(40, 64, dtype=f8)[:, :40]) == "tma"
    assert fp8_path((9, 0), 128, a[:, :0], b[:, :0]) == "pointer"  # no tokens


@pytest.mark.parametrize("path", list(PATHS))
def test_launcher_follows_the_rule_and_the_persistent_grid(path, monkeypatch, device):
    """The launcher runs the kernel the rule names; the Hopper kernel's grid is min(tiles, SMs),
    so each of the 3 interpreter "SMs" walks several tiles."""
    launched = record_launches(monkeypatch, wgrad_module, ("_fp8_wgrad_kernel", "_fp8_wgrad_tma_kernel"))
    M, N, K = 144, 200, 136
    _, _, a, a_s, b, b_s = _operands(M, N, K, device)
    config = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4) if path == "tma" else dict(BLOCK_N=64, BLOCK_K=64)
    out = _launch(a, a_s, b, b_s, nan_empty((N, K), device=device), path, config)
    tiles = 4 * 3
    if path == "tma":
        assert launched == [("_fp8_wgrad_tma_kernel", (min(tiles, INTERPRETER_SMS),))]
    else:
        assert launched == [("_fp8_wgrad_kernel", (tiles,))]
    _check(out, a, a_s, b, b_s)


def test_default_calls_follow_the_rule(monkeypatch, device):
    """Without a capability the device's (the interpreter: 9.0) picks: Hopper's kernel for M = 48,
    the pointer kernel for M = 40 (its rows not 16-byte aligned) and with MOELA_TMA=0."""
    launched = record_launches(monkeypatch, wgrad_module, ("_tuned", "_tma_tuned"))
    for M in (48, 40):
        _, _, a, a_s, b, b_s = _operands(M, 40, 24, device)
        _check(fp8_wgrad(a, a_s, b, b_s), a, a_s, b, b_s)
    monkeypatch.setenv("MOELA_TMA", "0")
    _, _, a, a_s, b, b_s = _operands(48, 40, 24, device)
    _check(fp8_wgrad(a, a_s, b, b_s), a, a_s, b, b_s)
    assert [name for name, _ in launched] == ["_tma_tuned", "_tuned", "_tuned"]


@pytest.mark.parametrize("path, bad, match", [
    ("tma", dict(BLOCK_N=64, BLOCK_K=64), r"the Hopper fp8_wgrad kernel .*unknown: \['BLOCK_K'\], "
                                          r"missing: \['BLOCK_M'\]"),
    ("tma", dict(BLOCK_M=64, BLOCK_N=64, SPLIT_K=2), r"unknown: \['SPLIT_K'\]"),
    ("tma", dict(BLOCK_M=128, BLOCK_N=64, WARP_SPECIALIZE=True, num_warps=8), "num_warps=4 and BLOCK_M=128"),
    ("tma", dict(BLOCK_M=64, BLOCK_N=64, WARP_SPECIALIZE=True), "num_warps=4 and BLOCK_M=128"),
    ("pointer", dict(BLOCK_M=64, BLOCK_N=64), r"the pointer fp8_wgrad kernel .*unknown: \['BLOCK_M'\], "
                                              r"missing: \['BLOCK_K'\]"),
])
def test_bad_configs_raise_naming_the_kernel(path, bad, match, device):
    M = 48 if path == "tma" else 40
    _, _, a, a_s, b, b_s = _operands(M, 40, 24, device)
    with pytest.raises(ValueError, match=match):
        _launch(a, a_s, b, b_s, nan_empty((40, 24), device=device), path, bad)


V3_WGRAD = {"wq_b": (4096, 24576, 1536), "wkv_a": (4096, 576, 7168), "shared-up": (4096, 4096, 7168)}


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(V3_WGRAD))
def test_gpu_fp8_wgrad_deepseek_shapes(case):
    M, N, K = V3_WGRAD[case]
    dy, x, a, a_s, b, b_s = _operands(M, N, K, "cuda")
    out = fp8_wgrad.launch(a, a_s, b, b_s, out=nan_empty((N, K), torch.float32, "cuda"))
    _check(out, a, a_s, b, b_s)
    assert ref.calc_diff(out, dy.float().T @ x.float()) < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("index", range(len(wgrad_module.fp8_wgrad_tma_configs())))
def test_gpu_fp8_wgrad_tma_configs(index):
    """Each Hopper config at V3's shared-expert up projection (N = 4096, K = 7168, T = 4096), and
    at a partial last token block."""
    c = wgrad_module.fp8_wgrad_tma_configs()[index]
    config = {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}
    for M in (4096, 4096 + 48):
        _, _, a, a_s, b, b_s = _operands(M, 4096, 7168, "cuda")
        out = _launch(a, a_s, b, b_s, nan_empty((4096, 7168), torch.float32, "cuda"), config=config)
        _check(out, a, a_s, b, b_s)
