"""kernels.fp8_gemm: the block-scaled FP8 GEMM against reference.fp8_gemm (emulated, float32 per block).

Near exact: within the bound derived in tests/fp8_testing.py (summation order of one 128-deep
block, one scale rounding, the final cast). Against the bf16 product of the unquantized inputs:
DeepGEMM's calc_diff < 1e-3. CPU: the interpreter at small shapes, both paths of the rule
``fp8_mainloop.fp8_path`` (the Hopper tensor-descriptor kernel, persistent over 3 "SMs" so each
program walks several tiles, and the pointer kernel for pre-Hopper GPUs), the default config of
each M class and explicit configs for the other code paths (BLOCK_N > block reads a vector of
weight scales, BLOCK_M = 16, the warp-specialised schedule, an odd number of K blocks). GPU tier:
DeepGEMM's dense grid. The sm_90 compile of the Hopper configs: test_fp8_sm90.py.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from fp8_testing import PATHS, abs_fp8, assert_gemm_close
from moela_testing import nan_empty

from moela import reference as ref
from moela.kernels._common import INTERPRETER_SMS
from moela.kernels.fp8_gemm import fp8_gemm, launch_fp8_gemm, m_class
from moela.kernels.fp8_mainloop import fp8_path, tma_ready
from moela.kernels.fp8_quant import FP8_DTYPE, quant_act, quant_weight, to_col_major

# the modules (moela.kernels.fp8_gemm is the op once the package exports it)
factory = importlib.import_module("moela.kernels.factory")
fp8_gemm_module = importlib.import_module("moela.kernels.fp8_gemm")

try:
    from moela.profiling.shapes import DEEPGEMM_DENSE
except ImportError:  # the shapes registry is optional for the kernel tests (DeepGEMM's grid)
    DEEPGEMM_DENSE = {"m": (64, 128, 4096), "nk": ((2112, 7168), (24576, 1536), (32768, 512), (7168, 16384),
                                                   (4096, 7168), (7168, 2048))}


def _operands(M, N, K, device, block=128, dtype=torch.bfloat16):
    """Quantized random operands (unquantized x, w kept for calc_diff)."""
    x = torch.randn(M, K, device=device, dtype=dtype)
    w = (torch.randn(N, K, device=device) * K**-0.5).to(dtype)
    a, a_s = ref.quant_act(x, block)
    b, b_s = ref.quant_weight(w, block)
    return x, w, a, a_s, b, b_s


def _check(out, a, a_s, b, b_s, block=128, name="out"):
    ref32 = ref.fp8_gemm(a, a_s, b, b_s, torch.float32, block)
    mag = ref.fp8_gemm(abs_fp8(a), a_s.abs(), abs_fp8(b), b_s.abs(), torch.float32, block)
    assert_gemm_close(out, ref32, mag, a.shape[1] // block, block, name)


# (M, N, K): one per M class at the class edges, N not a multiple of the tile (masked), K several blocks.
SHAPES = {
    "decode-M1": (1, 128, 256),
    "small-ragged-N": (5, 200, 384),
    "small-edge-M64": (64, 96, 256),
    "medium-M65": (65, 64, 256),
    "medium-M300": (300, 48, 128),
    "large-M520": (520, 40, 128),
}


@pytest.mark.parametrize("case", list(SHAPES))
def test_fp8_gemm_near_exact_against_reference(case, device):
    M, N, K = SHAPES[case]
    _, _, a, a_s, b, b_s = _operands(M, N, K, device)
    out = nan_empty((M, N), torch.float32, device)
    assert fp8_gemm.launch(a, a_s, b, b_s, torch.float32, out=out) is out
    _check(out, a, a_s, b, b_s)


@pytest.mark.parametrize("case", ["decode-M1", "small-ragged-N", "medium-M65", "large-M520"])
def test_fp8_gemm_pointer_path_near_exact(case, device):
    """The pre-Hopper path (the rule given sm_89) on the same shapes."""
    M, N, K = SHAPES[case]
    _, _, a, a_s, b, b_s = _operands(M, N, K, device)
    out = nan_empty((M, N), torch.float32, device)
    launch_fp8_gemm(out, a, a_s, b, b_s, 128, None, None, capability=PATHS["pointer"])
    _check(out, a, a_s, b, b_s)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fp8_gemm_16bit_outputs_and_column_major_scales(out_dtype, device):
    _, _, a, a_s, b, b_s = _operands(24, 160, 256, device)
    out = fp8_gemm(a, to_col_major(a_s), b, b_s, out_dtype)  # the public op
    assert out.dtype == out_dtype and out.shape == (24, 160)
    _check(out, a, a_s, b, b_s)


CONFIGS = {  # the code paths a single default config cannot reach: path, config, (M, N, K)
    "vector-b-scales": ("pointer", dict(BLOCK_M=16, BLOCK_N=256, GROUP_M=1, num_warps=4), (70, 200, 256)),
    "scalar-b-scales-32": ("pointer", dict(BLOCK_M=32, BLOCK_N=32, GROUP_M=2, num_warps=4), (70, 200, 256)),
    "tall-tiles": ("pointer", dict(BLOCK_M=64, BLOCK_N=16, GROUP_M=4, num_warps=4), (70, 100, 256)),
    "decode-16x16": ("pointer", dict(BLOCK_M=16, BLOCK_N=16, GROUP_M=1, num_warps=1, num_stages=8), (20, 72, 256)),
    "tma-vector-b-scales": ("tma", dict(BLOCK_M=64, BLOCK_N=256, GROUP_M=1, num_warps=4, num_stages=2), (70, 300, 256)),
    "tma-warp-specialized": ("tma", dict(BLOCK_M=128, BLOCK_N=64, WARP_SPECIALIZE=True, num_warps=4, num_stages=4),
                             (130, 72, 384)),
    "tma-decode-64x16-odd-kb": ("tma", dict(BLOCK_M=64, BLOCK_N=16, GROUP_M=2, num_warps=4, num_stages=8),
                                (3, 80, 640)),
}


@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_fp8_gemm_configs(cfg, device):
    path, config, (M, N, K) = CONFIGS[cfg]
    _, _, a, a_s, b, b_s = _operands(M, N, K, device)
    out = nan_empty((M, N), device=device)
    launch_fp8_gemm(out, a, a_s, b, b_s, 128, None, config, capability=PATHS[path])
    _check(out, a, a_s, b, b_s)


WS = dict(BLOCK_M=128, BLOCK_N=64, WARP_SPECIALIZE=True, num_warps=4, num_stages=4)


def test_fp8_gemm_warp_specialized_scales_through_descriptors(monkeypatch, device):
    """Column-major activation scales (column stride padded to 16 bytes) and Kb a multiple of 4:
    the warp-specialised schedule reads both scales through descriptors (SCALE_TMA); two
    weight-scale rows (N > 128), a ragged M, the last K blocks' (1, 4) boxes past Kb."""
    M, N, K = 130, 200, 512
    _, _, a, a_s, b, b_s = _operands(M, N, K, device)
    out = nan_empty((M, N), device=device)
    col = to_col_major(a_s)
    assert fp8_gemm_module.tma_launch_args(out, a, col, b, b_s, 128, None)[1]["SCALE_TMA"]
    assert not fp8_gemm_module.tma_launch_args(out, a, a_s, b, b_s, 128, None)[1]["SCALE_TMA"]  # row-major
    monkeypatch.setenv("MOELA_SCALE_TMA", "0")
    assert not fp8_gemm_module.tma_launch_args(out, a, col, b, b_s, 128, None)[1]["SCALE_TMA"]
    monkeypatch.delenv("MOELA_SCALE_TMA")
    launch_fp8_gemm(out, a, col, b, b_s, 128, None, WS, capability=PATHS["tma"])
    _check(out, a, a_s, b, b_s)


def test_path_rule():
    """One rule picks the kernel: Hopper's when the GPU has TMA and a, b are TMA-readable."""
    a = torch.zeros(8, 256, dtype=FP8_DTYPE)
    b = torch.zeros(32, 256, dtype=FP8_DTYPE)
    assert fp8_path((9, 0), 128, a, b) == "tma"
    assert fp8_path((10, 0), 128, a, b) == "tma"
    assert fp8_path((8, 9), 128, a, b) == "pointer"  # Ada: FP8 but no TMA / wgmma
    assert fp8_path((9, 0), 64, a, b) == "pointer"  # the Hopper configs are sized for 128-blocks
    assert not tma_ready(a[:, 1:129]) and fp8_path((9, 0), 128, a[:, 1:129], b) == "pointer"  # base not aligned
    assert fp8_path((9, 0), 128, torch.zeros(8, 272, dtype=FP8_DTYPE)[:, :256], b) == "tma"  # row stride 272
    assert fp8_path((9, 0), 128, torch.zeros(8, 264, dtype=FP8_DTYPE)[:, :256], b) == "pointer"  # 264: not 16·n
    assert fp8_path((9, 0), 128, a.t().contiguous().t(), b) == "pointer"  # column-major values
    assert fp8_path((9, 0), 128, a[:, :0], b[:, :0]) == "pointer"  # K = 0
    assert fp8_path((9, 0), 128, a, None) == "pointer"  # no 2-D view (grouped weights)


@pytest.mark.parametrize("path", list(PATHS))
def test_launcher_follows_the_rule_and_the_persistent_grid(path, monkeypatch, device):
    """The launcher runs the kernel the rule names; the Hopper kernel's grid is min(tiles, SMs)."""
    launched = []
    for name in ("_fp8_gemm_kernel", "_fp8_gemm_tma_kernel"):
        kernel = getattr(fp8_gemm_module, name)

        class _Record:
            def __init__(self, kernel, name):
                self.kernel, self.name = kernel, name

            def __getitem__(self, grid):
                launched.append((self.name, grid))
                return self.kernel[grid]

        monkeypatch.setattr(fp8_gemm_module, name, _Record(kernel, name))
    M, N, K = 70, 200, 256
    _, _, a, a_s, b, b_s = _operands(M, N, K, device)
    out = nan_empty((M, N), device=device)
    config = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4)
    launch_fp8_gemm(out, a, a_s, b, b_s, 128, None, config, capability=PATHS[path])
    tiles = 2 * 4
    if path == "tma":
        assert launched == [("_fp8_gemm_tma_kernel", (min(tiles, INTERPRETER_SMS),))]
    else:
        assert launched == [("_fp8_gemm_kernel", (tiles,))]
    _check(out, a, a_s, b, b_s)


@pytest.mark.parametrize("block", [32, 64])
def test_fp8_gemm_other_scale_blocks(block, device):
    _, _, a, a_s, b, b_s = _operands(9, 80, 2 * block, device, block)
    _check(fp8_gemm(a, a_s, b, b_s, torch.float32, block), a, a_s, b, b_s, block)


def test_fp8_gemm_matches_bf16_product_of_unquantized_inputs(device):
    """DeepGEMM's acceptance test: calc_diff against the bf16 GEMM of x and w before quantization."""
    x, w, _, _, _, _ = _operands(48, 256, 512, device)
    a, a_s = quant_act(x)  # the kernel quantizers, end to end
    b, b_s = quant_weight(w)
    out = fp8_gemm(a, a_s, b, b_s)
    assert ref.calc_diff(out, x @ w.T) < 1e-3
    assert ref.calc_diff(out, x.float() @ w.float().T) < 1e-3


@pytest.mark.parametrize("path", list(PATHS))
def test_fp8_gemm_bias_strided_out_and_no_out_of_bounds_writes(path, device):
    _, _, a, a_s, b, b_s = _operands(20, 72, 128, device)
    guard = nan_empty((24, 80), torch.float32, device)
    out = guard[2:22, 3:75]  # a strided window: everything around it must stay NaN
    bias = torch.randn(72, 2, device=device, dtype=torch.bfloat16)[:, 0]  # strided: the kernel reads it flat
    launch_fp8_gemm(out, a, a_s, b, b_s, 128, bias, None, capability=PATHS[path])
    inside = torch.zeros_like(guard, dtype=torch.bool)
    inside[2:22, 3:75] = True
    assert guard[~inside].isnan().all()
    ref32 = ref.fp8_gemm(a, a_s, b, b_s, torch.float32)
    mag = ref.fp8_gemm(abs_fp8(a), a_s.abs(), abs_fp8(b), b_s.abs(), torch.float32)
    # The bias is added to the float32 accumulator: one more rounding of |result|.
    extra = 2.0**-24 * (ref32.abs() + bias.abs().float()).double()
    assert_gemm_close(out, ref32 + bias.float(), mag, 1, 128, "bias", extra=extra)


@pytest.mark.parametrize("path", list(PATHS))
def test_fp8_gemm_empty_and_special_values(path, device):
    _, _, a, a_s, b, b_s = _operands(6, 64, 384, device)
    assert fp8_gemm(a[:0], a_s[:0], b, b_s).shape == (0, 64)
    assert fp8_gemm(a, a_s, b[:0], b_s[:0]).shape == (6, 0)
    z = fp8_gemm(a[:, :0], a_s[:, :0], b[:, :0], b_s[:, :0], torch.float32)
    assert torch.equal(z, torch.zeros(6, 64, device=device))  # K = 0: the empty sum
    a_s = a_s.clone()
    a_s[1, 1] = float("nan")  # a NaN block scale poisons its row (never a silent number)
    a_s[3, 0] = float("inf")
    a_s[4, 2] = float("inf")  # the last of an odd number of blocks (the Hopper loop's unpaired one)
    out = nan_empty((6, 64), device=device)
    launch_fp8_gemm(out, a, a_s, b, b_s, 128, None, None, capability=PATHS[path])
    ref32 = ref.fp8_gemm(a, a_s, b, b_s, torch.float32)
    assert out[1].isnan().all() and torch.equal(out.isnan(), ref32.isnan())
    assert torch.equal(out.isinf(), ref32.isinf())


def test_m_class_boundaries():
    classes = [m_class(m) for m in (1, 64, 65, 512, 513, 16384)]
    assert classes == ["small", "small", "medium", "medium", "large", "large"]


def test_bad_inputs_raise_naming_the_argument(device):
    _, _, a, a_s, b, b_s = _operands(4, 64, 256, device)
    with pytest.raises(TypeError, match="a: expected dtype float8_e4m3fn"):
        fp8_gemm(a.float(), a_s, b, b_s)
    with pytest.raises(ValueError, match="b: expected a 2-D tensor"):
        fp8_gemm(a, a_s, b[None], b_s)
    with pytest.raises(ValueError, match="b: expected K=256 columns"):
        fp8_gemm(a, a_s, b[:, :128], b_s)
    with pytest.raises(ValueError, match="a: the Triton fp8_gemm kernel takes K .* multiple of block=128, got K=200"):
        fp8_gemm(a[:, :200], a_s, b[:, :200], b_s)
    with pytest.raises(ValueError, match=r"a_s: expected shape \(4, 2\)"):
        fp8_gemm(a, a_s[:, :1], b, b_s)
    with pytest.raises(TypeError, match="a_s: expected dtype float32"):
        fp8_gemm(a, a_s.double(), b, b_s)
    with pytest.raises(ValueError, match=r"b_s: expected shape \(1, 2\)"):
        fp8_gemm(a, a_s, b, b_s.repeat(2, 1))
    with pytest.raises(TypeError, match="out_dtype"):
        fp8_gemm(a, a_s, b, b_s, torch.float64)
    with pytest.raises(ValueError, match="block: the Triton fp8_gemm kernel takes one of"):
        fp8_gemm(a, a_s[:, :1], b, b_s[:, :1], torch.bfloat16, 512)  # scale shapes that fit block 512
    with pytest.raises(ValueError, match="b: expected device"):
        fp8_gemm.launch(a, a_s, b.to("meta"), b_s)
    with pytest.raises(ValueError, match=r"out: expected shape \(4, 64\)"):
        fp8_gemm.launch(a, a_s, b, b_s, out=torch.empty(4, 63, dtype=torch.bfloat16, device=device))


def test_launcher_checks_the_fp8_capability(monkeypatch, device):
    def refuse(name, dev):
        raise RuntimeError(f"{name}: old GPU")

    monkeypatch.setattr(factory, "check_fp8_capability", refuse)
    factory.forget_checked()  # signatures checked before this test were checked with the real capability
    _, _, a, a_s, b, b_s = _operands(4, 64, 128, device)
    with pytest.raises(RuntimeError, match="fp8_gemm: old GPU"):
        fp8_gemm(a, a_s, b, b_s)


def test_fake_implementation(device):
    _, _, a, a_s, b, b_s = _operands(4, 64, 128, device)
    torch.library.opcheck(torch.ops.moela.fp8_gemm.default, (a, a_s, b, b_s, torch.bfloat16, 128),
                          test_utils=("test_faketensor",))


# ------------------------------------------------------------------------------------ GPU tier

GPU_SHAPES = [(m, n, k) for n, k in DEEPGEMM_DENSE["nk"] for m in DEEPGEMM_DENSE["m"]]
GPU_SHAPES += [(1, 2112, 7168), (77, 4096, 7168)]  # decode M = 1, an M no tile divides


@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K", GPU_SHAPES, ids=[f"m{m}-n{n}-k{k}" for m, n, k in GPU_SHAPES])
def test_gpu_fp8_gemm_deepgemm_grid(M, N, K):
    x, w, _, _, _, _ = _operands(M, N, K, "cuda")
    a, a_s = quant_act(x)
    b, b_s = quant_weight(w)
    out = fp8_gemm.launch(a, to_col_major(a_s), b, b_s, torch.bfloat16, out=nan_empty((M, N), torch.bfloat16, "cuda"))
    _check(out, a, a_s, b, b_s)
    assert ref.calc_diff(out, x @ w.T) < 1e-3


@pytest.mark.gpu
def test_gpu_fp8_gemm_rejects_pre_ada_gpus_cleanly():
    if torch.cuda.get_device_capability() >= (8, 9):
        pytest.skip("this GPU supports FP8")
    a = torch.zeros(4, 128, device="cuda").to(FP8_DTYPE)
    s = torch.ones(4, 1, device="cuda")
    with pytest.raises(RuntimeError, match="compute capability >= 8.9"):
        fp8_gemm(a, s, a, s[:1])
