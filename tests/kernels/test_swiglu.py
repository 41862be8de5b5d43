"""moela.kernels.swiglu against moela.reference.swiglu (derived tolerances, float64 truth)."""

from __future__ import annotations

import pytest
import torch
from moela_testing import assert_close_derived, nan_empty

from moela import reference as ref
from moela.kernels.fp8_quant import quant_act
from moela.kernels.swiglu import swiglu, swiglu_bwd_op, swiglu_fp8_op, swiglu_op

DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.float32, id="fp32")]


def _halves(M, N, dtype, device, scale=3.0):
    """gate and up as the two column halves of one (M, 2N) tensor (the MoE layer's layout)."""
    h = (torch.randn(M, 2 * N, device=device) * scale).to(dtype)
    return h[:, :N], h[:, N:]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N", [(1, 7), (37, 300), (5, 1030)], ids=["1x7", "37x300", "5x1030"])
def test_forward_matches_float64(M, N, dtype, device):
    g, u = _halves(M, N, dtype, device)
    out = swiglu_op.launch(g, u, out=nan_empty((M, N), dtype, device))
    assert out.is_contiguous()
    assert_close_derived(out, ref.swiglu(g.double(), u.double()), ref.swiglu(g, u), name="out")


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_match_float64(dtype, device):
    M, N = 19, 260
    g, u = _halves(M, N, dtype, device)
    dy = torch.randn(M, N, device=device).to(dtype)
    grads = {}
    for name, fn, dt in (("kernel", swiglu, dtype), ("torch", ref.swiglu, dtype), ("exact", ref.swiglu, torch.float64)):
        gi, ui = g.detach().to(dt).requires_grad_(), u.detach().to(dt).requires_grad_()
        fn(gi, ui).backward(dy.to(dt))
        grads[name] = (gi.grad, ui.grad)
    for i, what in enumerate(("d_gate", "d_up")):
        assert_close_derived(grads["kernel"][i], grads["exact"][i], grads["torch"][i], name=what)


def test_only_needed_gradients_and_direct_launcher(device):
    g, u = _halves(4, 16, torch.float32, device)
    gi = g.clone().requires_grad_()
    swiglu(gi, u).sum().backward()  # up needs no gradient
    dg, du = swiglu_bwd_op(torch.ones(4, 16, device=device), g, u)
    torch.testing.assert_close(gi.grad, dg, rtol=0, atol=0)
    assert du.shape == (4, 16)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's overflow in the interpreter's exp
def test_special_values(device):
    """Large |gate| saturates without NaN (exp overflow gives silu 0 or gate); inf and NaN propagate as in torch."""
    g = torch.tensor([[-1000.0, -90.0, 0.0, 90.0, 1000.0, float("inf"), float("-inf"), float("nan")]], device=device)
    u = torch.full_like(g, 2.0)
    got, want = swiglu(g, u), ref.swiglu(g, u)
    torch.testing.assert_close(got, want, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
@pytest.mark.parametrize("M,N,block", [(5, 256, 128), (3, 200, 128), (9, 96, 32)],
                         ids=["5x256", "3x200-tail", "9x96-b32"])
def test_fp8_is_quant_act_of_swiglu_bit_for_bit(M, N, block, scale_fmt, dtype, device):
    """One pass = the two kernels: the same e4m3 bytes and scales (a ragged last block included)."""
    g, u = _halves(M, N, dtype, device)
    g[0, :7] = 0.0  # a row whose first block is partly zero
    q, s = swiglu(g, u, fp8=True, block=block, scale_fmt=scale_fmt)
    q2, s2 = quant_act(swiglu(g, u), block, scale_fmt)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (M, N) and s.shape == (M, -(-N // block))
    assert torch.equal(q.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s, s2)
    rq, rs = ref.swiglu(g, u, fp8=True, block=block, scale_fmt=scale_fmt)  # the reference's contract
    assert rq.shape == q.shape and rs.shape == s.shape


def test_fp8_empty_errors_and_opcheck(device):
    q, s = swiglu_fp8_op(*_halves(0, 256, torch.bfloat16, device))
    assert q.shape == (0, 256) and s.shape == (0, 2)
    g, u = _halves(4, 256, torch.bfloat16, device)
    with pytest.raises(ValueError, match="block"):
        swiglu(g, u, fp8=True, block=0)
    with pytest.raises(ValueError, match="scale_fmt"):
        swiglu(g, u, fp8=True, scale_fmt="e8m0")
    torch.library.opcheck(torch.ops.moela.swiglu_fp8.default, (g, u, 128, None),
                          test_utils=("test_schema", "test_faketensor"))
    qg, sg = swiglu(g.requires_grad_(), u, fp8=True)  # no gradient through the quantization
    assert not qg.requires_grad and not sg.requires_grad
    # also while tracing: dynamo reports the check's ValueError (as its own Unsupported error)
    with pytest.raises(Exception, match="block: expected a positive int"):
        torch.compile(lambda a, b: swiglu(a, b, fp8=True, block=0), fullgraph=True, backend="aot_eager")(g, u)


def test_empty_and_errors(device):
    assert swiglu(*_halves(0, 8, torch.bfloat16, device)).shape == (0, 8)
    assert swiglu(*_halves(3, 0, torch.bfloat16, device)).shape == (3, 0)
    g, u = _halves(3, 8, torch.bfloat16, device)
    assert torch.equal(swiglu(g[0], u[0]), swiglu(g, u)[0])  # any leading shape (..., N)
    with pytest.raises(ValueError, match="gate"):
        swiglu(g[0, 0], u[0, 0])
    with pytest.raises(TypeError, match="up"):
        swiglu(g, u.float())
    with pytest.raises(ValueError, match="up"):
        swiglu(g, u[:2])
    with pytest.raises(TypeError, match="gate"):
        swiglu(g.to(torch.int32), u)
    with pytest.raises(TypeError, match="gate"):
        swiglu(g.double(), u.double())
    with pytest.raises(ValueError, match="out"):
        swiglu_op.launch(g, u, out=torch.empty(3, 9, dtype=torch.bfloat16, device=device))
    with pytest.raises(ValueError, match="share memory"):
        swiglu_op.launch(g, u, out=g)


def test_opcheck_and_compile(device):
    g, u = _halves(6, 24, torch.float32, device)
    torch.library.opcheck(torch.ops.moela.swiglu.default, (g.clone().requires_grad_(), u.clone().requires_grad_()),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    f = torch.compile(lambda a, b: swiglu(a, b) * 2, fullgraph=True,
                      backend="aot_eager" if device == "cpu" else "inductor")
    torch.testing.assert_close(f(g, u), swiglu(g, u) * 2, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [8, 8192])
def test_gpu_v3_expert_width(M):
    g, u = _halves(M, 2048, torch.bfloat16, "cuda")
    out = swiglu_op.launch(g, u, out=nan_empty((M, 2048), torch.bfloat16, "cuda"))
    assert_close_derived(out, ref.swiglu(g.double(), u.double()), ref.swiglu(g, u), name="out")


@pytest.mark.gpu
@pytest.mark.parametrize("M", [8, 8192])
def test_gpu_fp8_is_quant_act_of_swiglu(M):
    g, u = _halves(M, 2048, torch.bfloat16, "cuda")
    q, s = swiglu(g, u, fp8=True)
    q2, s2 = quant_act(swiglu(g, u))
    assert torch.equal(q.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s, s2)
