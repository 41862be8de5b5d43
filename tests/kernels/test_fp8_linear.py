"""kernels.fp8_linear: on-the-fly activation quantization + block-scaled GEMM (+ bias), any leading shape.

Its definition (kernels/fp8_linear.py) is the reference composition: ``reference.quant_act`` then
``reference.fp8_gemm`` in float32, plus the bias, cast to x.dtype. The quantization is bit-exact
(tests/kernels/test_fp8_quant.py), so the whole is near exact within the GEMM bound of
tests/fp8_testing.py plus the bias rounding; against the unquantized bf16 linear, calc_diff < 1e-3.
"""

from __future__ import annotations

import pytest
import torch
from fp8_testing import abs_fp8, assert_gemm_close

from moela import reference as ref
from moela.kernels.fp8_gemm import fp8_gemm
from moela.kernels.fp8_grouped_gemm import fp8_grouped_gemm
from moela.kernels.fp8_linear import fp8_linear
from moela.kernels.fp8_quant import dequant, quant_act, quant_weight


def _weights(N, K, device, bias=True):
    w = (torch.randn(N, K, device=device) * K**-0.5).bfloat16()
    w8, w_s = quant_weight(w)
    b = torch.randn(N, device=device, dtype=torch.bfloat16) if bias else None
    return w, w8, w_s, b


def _check(y, x, w8, w_s, b, scale_fmt=None):
    x2 = x.reshape(-1, x.shape[-1])
    q, s = ref.quant_act(x2, 128, scale_fmt)
    ref32 = ref.fp8_gemm(q, s, w8, w_s, torch.float32)
    mag = ref.fp8_gemm(abs_fp8(q), s, abs_fp8(w8), w_s.abs(), torch.float32)
    extra = 0.0
    if b is not None:
        extra = 2.0**-24 * (ref32.abs() + b.abs().float()).double()  # the bias addition's rounding
        ref32 = ref32 + b.float()
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], w8.shape[0])
    assert_gemm_close(y.reshape(-1, w8.shape[0]), ref32, mag, x.shape[-1] // 128, 128, "y", extra=extra)


@pytest.mark.parametrize(
    "lead,bias,scale_fmt",
    [((2, 3), True, None), ((5,), False, "ue8m0"), ((), True, None)],
    ids=["3d-bias", "2d-ue8m0", "1d-x"],
)
def test_fp8_linear_near_exact_against_reference_composition(lead, bias, scale_fmt, device):
    _, w8, w_s, b = _weights(96, 256, device, bias)
    x = torch.randn(*lead, 256, device=device, dtype=torch.bfloat16)
    _check(fp8_linear(x, w8, w_s, b, scale_fmt), x, w8, w_s, b, scale_fmt)


def test_fp8_linear_float32_input_and_calc_diff_against_bf16_linear(device):
    w, w8, w_s, b = _weights(128, 384, device)
    x = torch.randn(4, 7, 384, device=device)
    y = fp8_linear(x, w8, w_s, b)
    _check(y, x, w8, w_s, b)
    assert ref.calc_diff(y, torch.nn.functional.linear(x.bfloat16(), w, b)) < 1e-3


def test_bad_inputs_raise_naming_the_argument(device):
    _, w8, w_s, b = _weights(64, 256, device)
    x = torch.randn(3, 256, device=device, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="x: expected dtype"):
        fp8_linear(x.double(), w8, w_s, b)
    with pytest.raises(ValueError, match="x: expected last dim K=256"):
        fp8_linear(x[:, :128], w8, w_s, b)
    with pytest.raises(TypeError, match="weight: expected dtype float8_e4m3fn"):
        fp8_linear(x, w8.float(), w_s, b)
    with pytest.raises(ValueError, match=r"weight_scale_inv: expected shape \(1, 2\)"):
        fp8_linear(x, w8, w_s.T, b)
    with pytest.raises(ValueError, match=r"bias: expected shape \(64\)"):
        fp8_linear(x, w8, w_s, b[:10])
    with pytest.raises(ValueError, match="scale_fmt"):
        fp8_linear(x, w8, w_s, b, "fp32")
    with pytest.raises(ValueError, match="weight: the Triton fp8_linear kernel takes K .* multiple of block=128"):
        fp8_linear(x[:, :200], w8[:, :200], w_s, b)
    with pytest.raises(ValueError, match="weight: expected device"):
        fp8_linear(x, w8.to("meta"), w_s, b)
    with pytest.raises(ValueError, match="weight_scale_inv: expected device"):
        fp8_linear(x, w8, w_s.to("meta"), b)


def test_fp8_ops_under_torch_compile_fullgraph(device):
    """Every FP8 op in one graph: the custom ops with their fake implementations trace without a
    graph break (aot_eager here; Inductor on the CPU gives the same result in ~16 s, checked by hand)."""
    _, w8, w_s, b = _weights(64, 128, device)
    x = torch.randn(2, 3, 128, device=device, dtype=torch.bfloat16)
    offsets = torch.tensor([4], dtype=torch.int32, device=device)

    def f(x):
        y = fp8_linear(x, w8, w_s, b)  # (2, 3, 64)
        q, s = quant_act(y.reshape(-1, 64).repeat(1, 2))  # (6, 128)
        z = fp8_gemm(q, s, w8, w_s) + fp8_grouped_gemm(q, s, w8[None], w_s[None], offsets)
        return z, dequant(q, s, 128, torch.bfloat16)

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    want = f(x)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    torch.library.opcheck(torch.ops.moela.fp8_linear.default, (x, w8, w_s, b, None, 128),
                          test_utils=("test_faketensor",))


@pytest.mark.gpu
@pytest.mark.parametrize("T,N,K", [(1, 2112, 7168), (128, 24576, 1536), (4096, 7168, 2048)], ids=str)
def test_gpu_fp8_linear_deepseek_shapes(T, N, K):
    w, w8, w_s, b = _weights(N, K, "cuda")
    x = torch.randn(T, K, device="cuda", dtype=torch.bfloat16)
    y = fp8_linear(x, w8, w_s, b)
    _check(y, x, w8, w_s, b)
    assert ref.calc_diff(y, torch.nn.functional.linear(x, w, b)) < 1e-3
