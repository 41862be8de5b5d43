"""kernels.fp8_dgrad: dx = dy · W in FP8 with the forward's weight blocks used transposed, against
reference.fp8_dgrad (= fp8_gemm on the transposed views).

Near exact within the derived bound of tests/fp8_testing.py (the reduction here is N); DeepGEMM's
calc_diff < 1e-3 against the bf16 product of the unquantized dy and W. CPU: ragged reduction
(N not a multiple of the block: masked tail), ragged M and K, both weight layouts (as stored,
and the transposed copy), explicit configs for the code paths the default cannot reach. GPU tier:
DeepSeek-V3's projections.
"""

from __future__ import annotations

import pytest
import torch
from fp8_testing import abs_fp8, assert_gemm_close
from moela_testing import nan_empty

from moela import reference as ref
from moela.kernels import fp8_dgrad, quant_act, quant_weight


def _operands(M, N, K, device, block=128):
    dy = torch.randn(M, N, device=device, dtype=torch.bfloat16)
    w = (torch.randn(N, K, device=device) * N**-0.5).to(torch.bfloat16)
    dq, ds = ref.quant_act(dy, block)
    wq, ws = ref.quant_weight(w, block)
    return dy, w, dq, ds, wq, ws


def _check(out, dq, ds, wq, ws, block=128, name="dx"):
    ref32 = ref.fp8_dgrad(dq, ds, wq, ws, torch.float32, block)
    mag = ref.fp8_dgrad(abs_fp8(dq), ds.abs(), abs_fp8(wq), ws.abs(), torch.float32, block)
    assert_gemm_close(out, ref32, mag, -(-dq.shape[1] // block), block, name)


SHAPES = {  # (M, N: the reduction, K)
    "decode-M1": (1, 256, 128),
    "ragged-reduction": (40, 200, 192),
    "medium-M100": (100, 128, 96),
    "large-M520": (520, 128, 64),
}


@pytest.mark.parametrize("case", list(SHAPES))
def test_fp8_dgrad_near_exact_against_reference(case, device):
    M, N, K = SHAPES[case]
    _, _, dq, ds, wq, ws = _operands(M, N, K, device)
    out = nan_empty((M, K), torch.float32, device)
    assert fp8_dgrad.launch(dq, ds, wq, ws, torch.float32, out=out) is out
    _check(out, dq, ds, wq, ws)


def test_fp8_dgrad_transposed_weight_copy_and_16bit_outputs(device):
    _, _, dq, ds, wq, ws = _operands(24, 256, 160, device)
    w_t = wq.t().contiguous().t()  # (N, K) with the reduction contiguous: strides (1, N)
    assert w_t.stride() == (1, 256)
    for out_dtype in (torch.bfloat16, torch.float16):
        out = fp8_dgrad(dq, ds, w_t, ws, out_dtype)
        assert out.dtype == out_dtype and out.shape == (24, 160)
        _check(out, dq, ds, wq, ws)


CONFIGS = {  # the paths a default config does not take: config, (M, N, K)
    "vector-w-scales": (dict(BLOCK_M=16, BLOCK_K=256, GROUP_M=1, num_warps=4), (20, 256, 300)),
    "scalar-w-scales-32": (dict(BLOCK_M=32, BLOCK_K=32, GROUP_M=2, num_warps=4), (40, 136, 100)),
}


@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_fp8_dgrad_configs(cfg, device):
    config, (M, N, K) = CONFIGS[cfg]
    _, _, dq, ds, wq, ws = _operands(M, N, K, device)
    out = fp8_dgrad.launch(dq, ds, wq, ws, torch.float32, config=config, out=nan_empty((M, K), device=device))
    _check(out, dq, ds, wq, ws)


@pytest.mark.parametrize("block", [32, 64])
def test_fp8_dgrad_other_scale_blocks(block, device):
    _, _, dq, ds, wq, ws = _operands(9, 3 * block - 5, 2 * block, device, block)
    _check(fp8_dgrad(dq, ds, wq, ws, torch.float32, block), dq, ds, wq, ws, block)


def test_fp8_dgrad_matches_bf16_product_of_unquantized_inputs(device):
    """DeepGEMM's acceptance test (calc_diff < 1e-3) with the kernel quantizers end to end."""
    dy, w, _, _, _, _ = _operands(64, 384, 256, device)
    dq, ds = quant_act(dy)
    wq, ws = quant_weight(w)
    out = fp8_dgrad(dq, ds, wq, ws)
    assert ref.calc_diff(out, dy.float() @ w.float()) < 1e-3


def test_fp8_dgrad_empty_special_values_and_no_out_of_bounds_writes(device):
    _, _, dq, ds, wq, ws = _operands(20, 130, 72, device)
    assert fp8_dgrad(dq[:0], ds[:0], wq, ws).shape == (0, 72)
    z = fp8_dgrad(dq[:, :0], ds[:, :0], wq[:0], ws[:0], torch.float32)
    assert torch.equal(z, torch.zeros(20, 72, device=device))  # N = 0: the empty sum
    guard = nan_empty((24, 80), torch.float32, device)
    out = fp8_dgrad.launch(dq, ds, wq, ws, torch.float32, out=guard[2:22, 3:75])
    inside = torch.zeros_like(guard, dtype=torch.bool)
    inside[2:22, 3:75] = True
    assert guard[~inside].isnan().all()
    _check(out, dq, ds, wq, ws)
    ds = ds.clone()
    ds[1, 1] = float("nan")  # a NaN block scale poisons its row, never a silent number
    out = fp8_dgrad(dq, ds, wq, ws, torch.float32)
    assert out[1].isnan().all() and torch.equal(out.isnan(), ref.fp8_dgrad(dq, ds, wq, ws, torch.float32).isnan())


def test_fp8_dgrad_bad_inputs_raise_naming_the_argument(device):
    _, _, dq, ds, wq, ws = _operands(4, 256, 128, device)
    for op in (fp8_dgrad, ref.fp8_dgrad):
        with pytest.raises(TypeError, match="dy: expected dtype float8_e4m3fn"):
            op(dq.float(), ds, wq, ws)
        with pytest.raises(ValueError, match=r"w: expected N=256 rows per weight"):
            op(dq, ds, wq.t(), ws)
        with pytest.raises(ValueError, match=r"w_s: expected shape \(2, 1\)"):
            op(dq, ds, wq, ws.t())
        with pytest.raises(ValueError, match=r"dy_s: expected shape \(4, 2\)"):
            op(dq, ds[:, :1], wq, ws)
        with pytest.raises(TypeError, match="out_dtype"):
            op(dq, ds, wq, ws, torch.int8)
    with pytest.raises(ValueError, match="block: the Triton fp8_dgrad kernel takes one of"):
        fp8_dgrad(dq, ref.quant_act(dq.float(), 100)[1], wq, ref.quant_weight(wq.float(), 100)[1], block=100)
    torch.library.opcheck(torch.ops.moela.fp8_dgrad.default, (dq, ds, wq, ws), test_utils=("test_faketensor",))


V3_DGRAD = {  # (M, N, K) of dx = dy · W for V3's projections: wq_b, wo, shared expert down
    "wq_b": (4096, 24576, 1536), "wo": (4096, 7168, 16384), "down": (4096, 7168, 2048)}


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(V3_DGRAD))
def test_gpu_fp8_dgrad_deepseek_shapes(case):
    M, N, K = V3_DGRAD[case]
    dy, w, dq, ds, wq, ws = _operands(M, N, K, "cuda")
    out = fp8_dgrad.launch(dq, ds, wq, ws, torch.float32, out=nan_empty((M, K), torch.float32, "cuda"))
    _check(out, dq, ds, wq, ws)
    assert ref.calc_diff(out, dy.float() @ w.float()) < 1e-3
