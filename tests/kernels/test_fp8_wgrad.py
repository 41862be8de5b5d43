"""kernels.fp8_wgrad: dW = dyᵀ · x in FP8 from both operands' token-direction (B×1) quantizations,
against reference.fp8_wgrad.

Near exact within tests/fp8_testing.py's bound (the reduction is the M tokens, blocks of B);
DeepGEMM's calc_diff < 1e-3 against the float32 dyᵀ · x of the unquantized inputs. CPU: ragged
token counts (a masked last block), ragged N and K, bf16 outputs, explicit configs. GPU tier:
DeepSeek-V3 projection weights at T=4096.
"""

from __future__ import annotations

import pytest
import torch
from fp8_testing import abs_fp8, assert_gemm_close
from moela_testing import nan_empty

from moela import reference as ref
from moela.kernels import fp8_wgrad, quant_act_t


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


V3_WGRAD = {"wq_b": (4096, 24576, 1536), "wkv_a": (4096, 576, 7168), "shared-up": (4096, 4096, 7168)}


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(V3_WGRAD))
def test_gpu_fp8_wgrad_deepseek_shapes(case):
    M, N, K = V3_WGRAD[case]
    dy, x, a, a_s, b, b_s = _operands(M, N, K, "cuda")
    out = fp8_wgrad.launch(a, a_s, b, b_s, out=nan_empty((N, K), torch.float32, "cuda"))
    _check(out, a, a_s, b, b_s)
    assert ref.calc_diff(out, dy.float().T @ x.float()) < 1e-3
