"""moela.kernels.swiglu against moela.reference.swiglu (derived tolerances, float64 truth)."""

from __future__ import annotations

import pytest
import torch
from moela_testing import assert_close_derived, nan_empty

from moela import reference as ref
from moela.kernels.swiglu import swiglu, swiglu_bwd, swiglu_fwd

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
    out = swiglu_fwd(g, u, out=nan_empty((M, N), dtype, device))
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
    dg, du = swiglu_bwd(torch.ones(4, 16, device=device), g, u)
    torch.testing.assert_close(gi.grad, dg, rtol=0, atol=0)
    assert du.shape == (4, 16)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's overflow in the interpreter's exp
def test_special_values(device):
    """Large |gate| saturates without NaN (exp overflow gives silu 0 or gate); inf and NaN propagate as in torch."""
    g = torch.tensor([[-1000.0, -90.0, 0.0, 90.0, 1000.0, float("inf"), float("-inf"), float("nan")]], device=device)
    u = torch.full_like(g, 2.0)
    got, want = swiglu(g, u), ref.swiglu(g, u)
    torch.testing.assert_close(got, want, equal_nan=True, rtol=0, atol=0)


def test_empty_and_errors(device):
    assert swiglu(*_halves(0, 8, torch.bfloat16, device)).shape == (0, 8)
    assert swiglu(*_halves(3, 0, torch.bfloat16, device)).shape == (3, 0)
    g, u = _halves(3, 8, torch.bfloat16, device)
    with pytest.raises(ValueError, match="gate"):
        swiglu(g[0], u[0])
    with pytest.raises(TypeError, match="up"):
        swiglu(g, u.float())
    with pytest.raises(ValueError, match="up"):
        swiglu(g, u[:2])
    with pytest.raises(TypeError, match="gate"):
        swiglu(g.to(torch.int32), u)
    with pytest.raises(TypeError, match="gate"):
        swiglu(g.double(), u.double())
    with pytest.raises(ValueError, match="out"):
        swiglu_fwd(g, u, out=torch.empty(3, 9, dtype=torch.bfloat16, device=device))


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
    out = swiglu_fwd(g, u, out=nan_empty((M, 2048), torch.bfloat16, "cuda"))
    assert_close_derived(out, ref.swiglu(g.double(), u.double()), ref.swiglu(g, u), name="out")
