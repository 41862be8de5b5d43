"""kernels.gate: the fused routing kernel against ``reference.route`` / ``reference.gate``.

The ids must be equal to the reference's, bit for bit: on random logits (no two scores
within rounding of each other) and on tie-heavy ones (small integers: many exactly equal
scores, where the lower expert / group index must win). The weights must be within float32
rounding: derived tolerance, the kernel's error against the reference run in
float64 within 2x the error of the reference run in float32. Variants: DeepSeek-V3 (sigmoid,
bias, 8 groups, 4 kept, route_scale 2.5) scaled down to 32 experts, V2-Lite (softmax, no
groups), and odd ones (groups of 3, prime E, E not a power of two). The GPU tier runs the
DeepSeek shapes.
"""

from __future__ import annotations

import pytest
import torch
import triton
from moela_testing import assert_close_derived, nan_empty

from moela import reference
from moela.kernels.gate import gate, route
from moela.reference import ModelArgs

# name -> (E, topk, n_groups, topk_groups, score_func, has bias, route_scale)
VARIANTS = {
    "v3-small": (32, 8, 8, 4, "sigmoid", True, 2.5),
    "v3-no-bias": (32, 8, 8, 4, "sigmoid", False, 2.5),
    "v2-lite": (64, 6, 1, 1, "softmax", False, 1.0),
    "softmax-groups-bias": (16, 3, 4, 2, "softmax", True, 1.5),
    "groups-of-3": (12, 4, 4, 2, "sigmoid", True, 1.0),
    "prime-E-k1": (13, 1, 1, 1, "sigmoid", False, 1.0),
    "E72-softmax": (72, 6, 1, 1, "softmax", True, 1.0),  # 4 elements per lane in the warp order
}


def _kwargs(variant):
    E, k, G, kg, sf, _, rs = VARIANTS[variant]
    return dict(topk=k, n_groups=G, topk_groups=kg, score_func=sf, route_scale=rs)


def _inputs(variant, T, kind, dtype, device):
    E, *_, has_bias, _ = VARIANTS[variant]
    if kind == "integer":  # tie-heavy: 4 distinct values (non-negative: no sigmoid(x) + sigmoid(-x) = 1 ties)
        logits = torch.randint(0, 4, (T, E), device=device).to(dtype)
        bias = torch.randint(0, 2, (E,), device=device).float() * 0.25 if has_bias else None
    else:
        logits = (torch.randn(T, E, device=device) * 2).to(dtype)
        bias = torch.randn(E, device=device) * 0.1 if has_bias else None
    return logits, bias


def _check(w, ids, logits, bias, kw):
    """ids: equal to the reference's; weights: derived tolerance against the float64 reference.

    For float64 logits, and where float64 breaks a tie differently from float32 (tie-heavy
    inputs), the reference in the logits' precision is the definition and the weights are
    checked against it: they differ only by the order of the softmax / sigmoid sums, at most
    (k + 1) roundings of the weights' dtype.
    """
    w_lo, ids_lo = reference.route(logits, bias, **kw)
    assert ids.dtype == torch.int32 and ids.shape == ids_lo.shape
    assert torch.equal(ids, ids_lo), f"ids differ at tokens {(ids != ids_lo).any(1).nonzero().flatten().tolist()}"
    assert w.dtype == w_lo.dtype
    w_hi, ids_hi = reference.route(logits.double(), None if bias is None else bias.double(), **kw)
    if torch.equal(ids_hi, ids_lo) and logits.dtype != torch.float64:
        assert_close_derived(w, w_hi, w_lo, name="weights")
    else:
        rtol = (kw["topk"] + 1) * torch.finfo(w.dtype).eps
        torch.testing.assert_close(w, w_lo, rtol=rtol, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["random", "integer"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_route_equals_reference(variant, kind, dtype, device):
    logits, bias = _inputs(variant, 37, kind, dtype, device)
    kw = _kwargs(variant)
    out = (nan_empty((37, kw["topk"]), torch.float32, device), nan_empty((37, kw["topk"]), torch.int32, device))
    assert all(a is b for a, b in zip(route.launch(logits, bias, **kw, out=out), out, strict=True))
    _check(*out, logits, bias, kw)


@pytest.mark.parametrize("variant", ["v3-small", "v2-lite"])
def test_route_float64_and_float16(variant, device):
    kw = _kwargs(variant)
    for dtype in (torch.float64, torch.float16):
        logits, bias = _inputs(variant, 21, "random", dtype, device)
        w, ids = route(logits, bias if bias is None else bias.to(dtype), **kw)
        assert w.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        _check(w, ids, logits, bias if bias is None else bias.to(dtype), kw)


def test_route_scale_is_applied_in_the_weights_precision(device):
    """route_scale reaches the kernel as the bits of a double: exact in float64, rounded once in float32."""
    logits = torch.randn(5, 16, device=device)
    for rs in (0.0, 1 / 3, -2.5, 5e-324):
        for dtype in (torch.float32, torch.float64):
            kw = dict(topk=3, score_func="sigmoid", route_scale=rs)
            w, ids = route(logits.to(dtype), None, **kw)
            w_ref, ids_ref = reference.route(logits.to(dtype), None, **kw)
            assert torch.equal(ids, ids_ref)
            torch.testing.assert_close(w, w_ref, rtol=4 * torch.finfo(dtype).eps, atol=0)


@pytest.mark.parametrize("block_t", [1, 4])
def test_other_block_sizes_and_T1(block_t, device):
    config = triton.Config({"BLOCK_T": block_t}, num_warps=1)
    for variant, T in (("v3-small", 9), ("v2-lite", 1)):
        logits, bias = _inputs(variant, T, "integer", torch.float32, device)
        kw = _kwargs(variant)
        _check(*route.launch(logits, bias, **kw, config=config), logits, bias, kw)


def test_ties_go_to_the_lower_index(device):
    T, E = 3, 16
    logits = torch.zeros(T, E, device=device)
    w, ids = route(logits, None, topk=4)  # every score equal
    assert ids.tolist() == [[0, 1, 2, 3]] * T
    assert torch.equal(w, torch.full((T, 4), 1 / E, device=device))
    # groups of 4: equal group scores keep groups 0 and 1; inside them the lower experts win
    bias = torch.zeros(E, device=device)
    w, ids = route(logits, bias, topk=6, n_groups=4, topk_groups=2, score_func="sigmoid")
    assert ids.tolist() == [[0, 1, 2, 3, 4, 5]] * T
    # a tie at the top of a group counts twice in its top-2 score: group 3 (two 2s) beats
    # group 0 (one 3 and a 0): 2 + 2 > 3 + 0 after the sigmoid
    logits = torch.zeros(1, E, device=device)
    logits[0, 0], logits[0, 12], logits[0, 13] = 3.0, 2.0, 2.0
    w, ids = route(logits, bias, topk=2, n_groups=4, topk_groups=1, score_func="sigmoid")
    assert ids.tolist() == [[12, 13]]
    assert torch.equal(ids, reference.route(logits, bias, topk=2, n_groups=4, topk_groups=1,
                                            score_func="sigmoid")[1])


def test_nan_logits_sort_first_as_in_the_reference(device):
    kw = _kwargs("v3-small")
    logits, bias = _inputs("v3-small", 4, "random", torch.float32, device)
    logits[1, 5] = float("nan")
    logits[2] = float("nan")
    w, ids = route(logits, bias, **kw)
    assert torch.equal(ids, reference.route(logits, bias, **kw)[1])
    kw = _kwargs("v2-lite")
    logits, _ = _inputs("v2-lite", 3, "random", torch.float32, device)
    logits[0, 7] = float("nan")
    assert torch.equal(route(logits, None, **kw)[1], reference.route(logits, None, **kw)[1])


def test_repeated_runs_and_no_tokens(device):
    kw = _kwargs("v3-small")
    logits, bias = _inputs("v3-small", 20, "random", torch.float32, device)
    first = route(logits, bias, **kw)
    again = route(logits, bias, **kw)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    w, ids = route(logits[:0], bias, **kw)
    assert w.shape == ids.shape == (0, 8)


def test_gate_equals_reference_gate(device):
    for args in (
        ModelArgs.from_name("tiny"),  # sigmoid, bias, 4 groups of 4, 2 kept, route_scale 2.5
        ModelArgs.from_name("tiny", score_func="softmax", n_expert_groups=1, n_limited_groups=1, gate_bias=False,
                            route_scale=1.0, n_activated_experts=6),
    ):
        E, D = args.n_routed_experts, args.dim
        x = torch.randn(19, D, device=device, dtype=torch.bfloat16)
        weight = (torch.randn(E, D, device=device) * D**-0.5).to(torch.bfloat16)
        bias = torch.randn(E, device=device) * 0.1 if args.has_gate_bias else None
        w, ids = gate(x, weight, bias, args)
        w_ref, ids_ref = reference.gate(x, weight, bias, args)
        assert torch.equal(ids, ids_ref)
        torch.testing.assert_close(w, w_ref, rtol=4 * torch.finfo(torch.float32).eps, atol=0)


@pytest.mark.parametrize("variant", ["v3-small", "v2-lite"])
def test_route_backward(variant, device):
    """d weights / d logits against autograd of the reference (float64: exact formula; float32: derived)."""
    kw = _kwargs(variant)
    logits, bias = _inputs(variant, 11, "random", torch.float32, device)
    dw = torch.randn(11, kw["topk"], device=device)
    grads = {}
    for name, fn, lg in (("kernel32", route, logits), ("ref32", reference.route, logits),
                         ("kernel64", route, logits.double()), ("ref64", reference.route, logits.double())):
        lg = lg.clone().requires_grad_()
        w, _ = fn(lg, bias, **kw)
        w.backward(dw.to(w.dtype))
        grads[name] = lg.grad
    torch.testing.assert_close(grads["kernel64"], grads["ref64"], rtol=1e-12, atol=1e-15)
    assert_close_derived(grads["kernel32"], grads["ref64"], grads["ref32"], name="dlogits")


def test_input_checks(device):
    logits = torch.randn(4, 16, device=device)
    with pytest.raises(TypeError, match="logits: expected dtype float16/bfloat16/float32/float64, got torch.int64"):
        route(logits.long(), None, topk=2)
    with pytest.raises(ValueError, match="logits: expected a 2-D tensor"):
        route(logits[0], None, topk=2)
    with pytest.raises(ValueError, match="n_groups: 16 experts cannot be split into 3 equal groups"):
        route(logits, None, topk=2, n_groups=3)
    with pytest.raises(ValueError, match="topk_groups: expected at most n_groups=2, got 3"):
        route(logits, None, topk=2, n_groups=2, topk_groups=3)
    with pytest.raises(ValueError, match="topk: expected at most the 8 experts in the kept groups, got 9"):
        route(logits, None, topk=9, n_groups=2, topk_groups=1)
    with pytest.raises(ValueError, match="score_func: expected one of 'softmax', 'sigmoid', got 'relu'"):
        route(logits, None, topk=2, score_func="relu")
    with pytest.raises(ValueError, match=r"bias: expected shape \(16\)"):
        route(logits, torch.zeros(15, device=device), topk=2)
    with pytest.raises(ValueError, match="n_groups: with a bias every group needs >= 2 experts"):
        route(logits, torch.zeros(16, device=device), topk=2, n_groups=16, topk_groups=2)
    with pytest.raises(ValueError, match="logits: the Triton route kernel takes at most 1024 experts"):
        route(torch.randn(1, 1025, device=device), None, topk=2)
    args = ModelArgs.from_name("tiny")
    with pytest.raises(ValueError, match=r"weight: expected shape \(16, 64\)"):
        gate(torch.randn(2, 64, device=device), torch.randn(16, 63, device=device), None, args)


def test_opcheck_and_compile(device):
    kw = _kwargs("v3-small")
    logits, bias = _inputs("v3-small", 6, "random", torch.float32, device)
    args = (logits.requires_grad_(), bias, kw["topk"], kw["n_groups"], kw["topk_groups"], kw["score_func"],
            kw["route_scale"])
    torch.library.opcheck(torch.ops.moela.route.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    compiled = torch.compile(lambda lg, b: route(lg, b, **kw), fullgraph=True, backend="aot_eager")
    w, ids = compiled(logits.detach(), bias)
    _check(w, ids, logits.detach(), bias, kw)


# ----------------------------------------------------------------------------------------
# GPU tier: DeepSeek shapes (skipped without CUDA)
# ----------------------------------------------------------------------------------------


def _gpu_cases():
    try:
        from moela.profiling.shapes import DECODE_TOKENS, PREFILL_TOKENS, V2_LITE, V3
    except ImportError:
        V3, V2_LITE = ModelArgs.from_name("deepseek-v3"), ModelArgs.from_name("deepseek-v2-lite")
        DECODE_TOKENS, PREFILL_TOKENS = (1, 4, 16, 64, 128, 256), (4096, 8192, 16384)
    return [(name, args, T) for name, args in (("v3", V3), ("v2-lite", V2_LITE))
            for T in (*DECODE_TOKENS, *PREFILL_TOKENS)]


def _args_kwargs(args):
    return dict(topk=args.n_activated_experts, n_groups=args.n_expert_groups, topk_groups=args.n_limited_groups,
                score_func=args.score_func, route_scale=args.route_scale)


@pytest.mark.gpu
@pytest.mark.parametrize("case", _gpu_cases() if torch.cuda.is_available() else [], ids=lambda c: f"{c[0]}-T{c[2]}")
def test_gpu_deepseek_shapes(case):
    _, args, T = case
    E, kw = args.n_routed_experts, _args_kwargs(args)
    for kind in ("random", "integer"):
        logits = torch.randn(T, E, device="cuda") * 2 if kind == "random" else \
            torch.randint(0, 4, (T, E), device="cuda").float()
        bias = torch.randn(E, device="cuda") * 0.1 if args.has_gate_bias else None
        _check(*route(logits, bias, **kw), logits, bias, kw)


@pytest.mark.gpu
def test_gpu_gate_v3_dims():
    args = ModelArgs.from_name("deepseek-v3")
    x = torch.randn(256, args.dim, device="cuda", dtype=torch.bfloat16)
    weight = (torch.randn(args.n_routed_experts, args.dim, device="cuda") * args.dim**-0.5).to(torch.bfloat16)
    bias = torch.randn(args.n_routed_experts, device="cuda") * 0.1
    w, ids = gate(x, weight, bias, args)
    w_ref, ids_ref = reference.gate(x, weight, bias, args)
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(w, w_ref, rtol=4 * torch.finfo(torch.float32).eps, atol=0)


@pytest.mark.gpu
def test_gpu_no_host_sync_and_cuda_graph():
    from moela.kernels.routing import make_routing

    args = ModelArgs.from_name("deepseek-v3")
    E, kw = args.n_routed_experts, _args_kwargs(args)
    logits = torch.randn(128, E, device="cuda")
    bias = torch.randn(E, device="cuda") * 0.1

    def step():
        w, ids = route(logits, bias, **kw)
        return w, ids, make_routing(ids, E)

    step()  # warm-up: autotuning syncs, once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        w, ids, plan = step()
    logits.copy_(torch.randn_like(logits))
    graph.replay()
    _check(w, ids, logits, bias, kw)
    ref_plan = reference.make_routing(ids, E)
    assert all(torch.equal(a, b) for a, b in zip(plan, ref_plan, strict=True))
