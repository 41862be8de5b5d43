"""moela.model.MoE on the Triton kernels (interpreted on CPU) against the reference backend.

bf16 forward and gradients within derived tolerances of the reference path, the FP8 experts,
torch.compile(fullgraph=True), and a GPU tier at DeepSeek size (no host sync, CUDA graphs).
"""

import pytest
import torch
from moela_testing import assert_close_derived

from moela.model import MoE
from moela.reference import ModelArgs, calc_diff

DIMS = dict(dim=32, moe_inter_dim=16, n_routed_experts=8, n_activated_experts=2, n_expert_groups=2,
            n_limited_groups=1)


def _pair(float_dtype, device, **overrides):
    """The same layer twice: on the Triton kernels and on the references; plus a float64 twin."""
    args = ModelArgs.from_name("tiny", **{**DIMS, **overrides})
    layers = {}
    for name, backend, dt in (("triton", "triton", float_dtype), ("reference", "reference", float_dtype),
                              ("exact", "reference", torch.float64)):
        torch.manual_seed(0)
        layers[name] = MoE(args.replace(backend=backend)).to(device=device, dtype=dt)
    with torch.no_grad():
        for name, p in layers["exact"].named_parameters():
            if p.dtype != torch.float8_e4m3fn and not name.endswith("scale_inv"):  # FP8 experts stay as built
                p.normal_(0, 0.3)
        for name in ("triton", "reference"):
            layers[name].load_state_dict(layers["exact"].state_dict())
    return layers


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_triton_backend_forward_and_gradients_match_the_reference(dtype, device):
    layers = _pair(dtype, device)
    x = torch.randn(2, 5, 32, device=device, dtype=torch.float64)
    dy = torch.randn_like(x)
    outs, grads = {}, {}
    for name, layer in layers.items():
        xi = x.to(layer.w13.dtype).requires_grad_(True)
        y = layer(xi)
        y.backward(dy.to(y.dtype))
        outs[name] = y
        grads[name] = {"x": xi.grad, **{k: p.grad for k, p in layer.named_parameters() if p.grad is not None}}
    # routing is identical in all three (float32 router logits from the same weights)
    assert_close_derived(outs["triton"], outs["exact"], outs["reference"], name="y")
    for key in ("x", "w13", "w2", "gate.weight", "shared_experts.w1.weight"):
        assert_close_derived(grads["triton"][key], grads["exact"][key], grads["reference"][key], name=key)


def test_triton_backend_fp8_experts(device):
    args = dict(dim=128, moe_inter_dim=128, dtype="fp8")
    layers = _pair(torch.bfloat16, device, **args)
    x = torch.randn(6, 128, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        y, y_ref = layers["triton"](x), layers["reference"](x)
    # the same quantized arithmetic (kernels bit-exact quantizers, fp32 promotion per block)
    assert calc_diff(y.float(), y_ref.float()) < 1e-5


def test_triton_backend_compiles_fullgraph(device):
    layers = _pair(torch.float32, device)
    layer = layers["triton"].eval()
    x = torch.randn(7, 32, device=device)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    with torch.no_grad():
        y = compiled(x)
        if device == "cpu":  # aot_eager runs the same ops: the same bits
            torch.testing.assert_close(y, layer(x), rtol=0, atol=0)
        else:  # inductor fuses the pointwise ops around the kernels (other roundings): derived bound
            exact, ref32 = layers["exact"].eval()(x.double()), layers["reference"].eval()(x)
            assert_close_derived(y, exact, ref32, name="compiled y")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bf16", "fp8"])  # the V3 preset is fp8: bf16 experts (grouped_gemm) named here
@pytest.mark.parametrize("tokens", [16, 4096])
def test_v3_size_layer_no_host_sync_and_cuda_graph(tokens, dtype):
    from moela.profiling.shapes import V3

    args = V3.replace(backend="triton", n_routed_experts=32, n_expert_groups=8, n_limited_groups=4,  # 8-way EP
                      dtype=dtype)
    layer = MoE(args).to(device="cuda", dtype=torch.bfloat16).eval()
    ref = MoE(args.replace(backend="reference")).to(device="cuda", dtype=torch.bfloat16).eval()
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(tokens, args.dim, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        expected = ref(x)
        y = layer(x)  # warm-up: autotuning happens here, outside the capture
        assert calc_diff(y.float(), expected.float()) < 1e-4
        torch.cuda.set_sync_debug_mode("error")
        try:
            layer(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        graph = torch.cuda.CUDAGraph()
        static_x = x.clone()
        with torch.cuda.graph(graph):
            static_y = layer(static_x)
        static_x.copy_(torch.randn_like(x))
        graph.replay()
        assert calc_diff(static_y.float(), ref(static_x).float()) < 1e-4
