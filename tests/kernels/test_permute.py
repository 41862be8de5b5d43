"""kernels.permute: permute / unpermute (weighted combine) and their gradients vs the reference.

CPU tests run the kernels through the Triton interpreter at small shapes, with the default
config and with 16-column blocks (several chunks per row). Outputs are NaN-poisoned so that
an unwritten element fails. What must be bitwise equal to the reference is checked with
``torch.equal``: permute (a copy), the combine (the same multiply-then-add in the same slot
order, in float32 or float64) and the combine's ``dys`` (one multiply, one rounding).
Gradients that sum in another order (``dx`` of permute, ``dw``) are checked with derived
tolerances: against the float64 reference, within 2x the error the reference
makes in the inputs' dtype; in float64, inputs are float32 values, so sums of k of them are
exact and ``dx`` must be exact too. The GPU tier runs DeepSeek shapes.
"""

from __future__ import annotations

import pytest
import torch
import triton
from moela_testing import assert_close_derived, nan_empty, random_topk_ids

from moela import reference
from moela.kernels.permute import permute, permute_fp8_op, permute_op, unpermute, unpermute_bwd_op, unpermute_op
from moela.kernels.routing import make_routing
from moela.reference import RoutingPlan

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
DTYPE_IDS = ["bf16", "fp16", "fp32", "fp64"]
CONFIGS = {"default": None, "block16": triton.Config({"BLOCK_D": 16}, num_warps=4)}

# (T, k, E, align, fraction of -1 ids, D)
CASES = {
    "T1": (1, 8, 16, 1, 0.0, 64),
    "prime-E-odd-D": (13, 3, 7, 1, 0.0, 37),
    "k1": (9, 1, 5, 1, 0.0, 48),
    "ids-of-minus-one": (11, 6, 11, 1, 0.3, 40),
    "align4-invalid": (10, 4, 7, 4, 0.2, 33),
}
# the launch config each forward case runs with: one D chunk, or several 16-column chunks
CASE_CONFIG = {"T1": "default", "prime-E-odd-D": "block16", "k1": "default", "ids-of-minus-one": "block16",
               "align4-invalid": "block16"}




def _problem(case, dtype, device):
    T, k, E, align, invalid, D = CASES[case]
    ids = random_topk_ids(T, k, E, invalid, device)
    plan = reference.make_routing(ids, E, align)
    x = torch.randn(T, D, device=device).to(dtype)  # float64: float32 values (exact sums of k)
    w = torch.rand(T, k, device=device) + 0.5
    w[ids < 0] = float("nan")  # skipped slots must not contribute, whatever their weight
    return plan, x, w


def _ys(plan, D, dtype, device):
    ys = torch.randn(plan.max_rows, D, device=device).to(dtype)
    ys[plan.row_to_token < 0] = float("nan")  # padding rows must not be read
    return ys


# ----------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", list(CASES))
def test_permute_equals_reference(case, dtype, device):
    plan, x, _ = _problem(case, dtype, device)
    out = nan_empty((plan.max_rows, x.shape[1]), dtype, device)
    config = CONFIGS[CASE_CONFIG[case]]
    assert permute_op.launch(x, plan.slot_to_row, plan.row_to_slot, out=out, config=config) is out
    assert torch.equal(out, reference.permute(x, plan))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", list(CASES))
def test_unpermute_equals_reference_bitwise(case, dtype, device):
    plan, x, w = _problem(case, dtype, device)
    ys = _ys(plan, x.shape[1], dtype, device)
    for weights in (w, None):
        out = nan_empty(x.shape, dtype, device)
        config = CONFIGS[CASE_CONFIG[case]]
        assert unpermute_op.launch(ys, plan.slot_to_row, plan.row_to_slot, weights, out=out, config=config) is out
        ref = reference.unpermute(ys, plan, weights)
        assert torch.equal(out, ref), f"max diff {(out.double() - ref.double()).abs().max()}"


def test_combine_error_vs_float64_is_what_float32_costs(device):
    plan, x, w = _problem("ids-of-minus-one", torch.bfloat16, device)
    w = w.nan_to_num(0.0)
    ys = _ys(plan, x.shape[1], torch.bfloat16, device).nan_to_num(0.0)
    out = unpermute(ys, plan, w)
    ref_hi = reference.unpermute(ys.double(), plan, w.double())
    assert_close_derived(out, ref_hi, reference.unpermute(ys, plan, w), name="y")


def test_edge_plans(device):
    D = 24
    for ids, E, align in (
        (torch.full((7, 1), 2, dtype=torch.int32), 4, 1),  # every token to one expert, empty experts
        (torch.full((3, 2), -1, dtype=torch.int32), 5, 4),  # every slot skipped: all rows padding
        (torch.tensor([[0, 3, 1]], dtype=torch.int32), 5, 8),  # T = 1 with padding
    ):
        ids = ids.to(device)
        plan = make_routing(ids, E, align)
        x = torch.randn(ids.shape[0], D, device=device)
        w = torch.rand(ids.shape, device=device)
        assert torch.equal(permute(x, plan), reference.permute(x, plan))
        ys = torch.randn(plan.max_rows, D, device=device)
        assert torch.equal(unpermute(ys, plan, w), reference.unpermute(ys, plan, w))


def test_strided_inputs(device):
    """Non-contiguous x, ys, weights and plan tensors give the same results (copied where needed)."""
    plan, x, w = _problem("align4-invalid", torch.float32, device)
    w = w.nan_to_num(0.5)
    ys = _ys(plan, x.shape[1], torch.float32, device)
    x_t = x.t().contiguous().t()  # column-major
    w_t = w.t().contiguous().t()
    ys_wide = torch.zeros(ys.shape[0], 2 * ys.shape[1], device=device)[:, ::2]  # column stride 2
    ys_wide.copy_(ys)
    s2r_t = plan.slot_to_row.t().contiguous().t()
    assert torch.equal(permute_op(x_t, s2r_t, plan.row_to_slot), reference.permute(x, plan))
    assert torch.equal(unpermute_op(ys_wide, s2r_t, plan.row_to_slot, w_t), reference.unpermute(ys, plan, w))
    dy = torch.randn_like(x)
    dys, dw = unpermute_bwd_op(dy.t().contiguous().t(), ys_wide.nan_to_num(0), s2r_t, plan.row_to_slot, w_t, True)
    ref = unpermute_bwd_op(dy, ys.nan_to_num(0), plan.slot_to_row, plan.row_to_slot, w, True)
    assert torch.equal(dys, ref[0]) and torch.equal(dw, ref[1])


def test_repeated_runs_are_identical(device):
    plan, x, w = _problem("ids-of-minus-one", torch.bfloat16, device)
    ys = _ys(plan, x.shape[1], torch.bfloat16, device)
    first = (permute(x, plan), unpermute(ys, plan, w), unpermute_bwd_op(x, ys.nan_to_num(0), plan.slot_to_row,
                                                                         plan.row_to_slot, w.nan_to_num(0), True))
    for _ in range(2):
        again = (permute(x, plan), unpermute(ys, plan, w), unpermute_bwd_op(x, ys.nan_to_num(0), plan.slot_to_row,
                                                                             plan.row_to_slot, w.nan_to_num(0), True))
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
        assert all(torch.equal(a, b) for a, b in zip(again[2], first[2], strict=True))


# (case, quantization block, scale format, dtype): D = 300 / 37 leave partial last blocks
FP8_CASES = {
    "align4-block128-bf16": ("align4-invalid", 128, None, torch.bfloat16, 300),
    "minus-one-ue8m0-fp32": ("ids-of-minus-one", 128, "ue8m0", torch.float32, 256),
    "prime-E-block32-fp64": ("prime-E-odd-D", 32, None, torch.float64, 77),
    "T1-block7-fp16": ("T1", 7, None, torch.float16, 37),
}


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy on the NaN / inf inputs
@pytest.mark.parametrize("name", list(FP8_CASES))
def test_permute_fp8_is_quant_act_of_permute_bitwise(name, device):
    case, block, fmt, dtype, D = FP8_CASES[name]
    T, k, E, align, invalid, _ = CASES[case]
    ids = random_topk_ids(T, k, E, invalid, device)
    plan = reference.make_routing(ids, E, align)
    x = (torch.randn(T, D, device=device) * 3).to(dtype)
    x[0, : min(D, block)] = 0  # an all-zero block: the floored scale
    if T > 2:
        x[1, 3], x[2, -1] = float("nan"), float("inf")  # specials, as quant_act treats them
    q_ref, s_ref = reference.quant_act(reference.permute(x, plan), block, fmt)
    q = nan_empty(q_ref.shape, q_ref.dtype, device)
    s = nan_empty(s_ref.shape, s_ref.dtype, device)
    permute_fp8_op.launch(x, plan.slot_to_row, plan.row_to_slot, block, fmt, out=(q, s))
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    assert torch.equal(s.view(torch.int32), s_ref.view(torch.int32))
    q2, s2 = permute(x, plan, fp8=True, block=block, scale_fmt=fmt)
    assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(s2.view(torch.int32), s.view(torch.int32))


def test_permute_fp8_checks_and_fake(device):
    plan, x, _ = _problem("align4-invalid", torch.bfloat16, device)
    with pytest.raises(ValueError, match="scale_fmt"):
        permute(x, plan, fp8=True, scale_fmt="e5m2")
    with pytest.raises(ValueError, match="block: expected a positive int, got 0"):
        permute_fp8_op(x, plan.slot_to_row, plan.row_to_slot, 0)
    torch.library.opcheck(torch.ops.moela.permute_fp8.default, (x, plan.slot_to_row, plan.row_to_slot, 128, None),
                          test_utils=("test_schema", "test_faketensor"))


# ----------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------


def _ref_grads(fn, inputs, dy):
    inputs = [t.detach().requires_grad_() if t is not None and t.is_floating_point() else t for t in inputs]
    fn(*inputs).backward(dy)
    return [t.grad if t is not None and t.is_floating_point() else None for t in inputs]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", ["prime-E-odd-D", "ids-of-minus-one", "align4-invalid"])
def test_permute_backward(case, dtype, device):
    plan, x, _ = _problem(case, dtype, device)
    dxs = torch.randn(plan.max_rows, x.shape[1], device=device).to(dtype)
    x.requires_grad_()
    permute(x, plan).backward(dxs)
    (ref_hi,) = _ref_grads(lambda a: reference.permute(a, plan), [x.double()], dxs.double())
    if dtype == torch.float64:
        assert torch.equal(x.grad, ref_hi)  # sums of k float32 values: exact in float64
    else:
        (ref_lo,) = _ref_grads(lambda a: reference.permute(a, plan), [x], dxs)
        assert_close_derived(x.grad, ref_hi, ref_lo, name="dx")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", ["T1", "ids-of-minus-one", "align4-invalid"])
def test_unpermute_backward(case, dtype, device):
    plan, x, w = _problem(case, dtype, device)
    w = w.nan_to_num(0.7).to(torch.float64 if dtype == torch.float64 else torch.float32)
    ys = _ys(plan, x.shape[1], dtype, device).nan_to_num(0.0)
    dy = torch.randn(x.shape, device=device).to(dtype)
    ys_k, w_k = ys.clone().requires_grad_(), w.clone().requires_grad_()
    unpermute(ys_k, plan, w_k).backward(dy)
    dys_lo, dw_lo = _ref_grads(lambda a, b: reference.unpermute(a, plan, b), [ys, w], dy)
    assert torch.equal(ys_k.grad, dys_lo)  # w·dy rounded once, zeros on padding rows: bitwise
    dys_hi, dw_hi = _ref_grads(lambda a, b: reference.unpermute(a, plan, b), [ys.double(), w.double()], dy.double())
    if dtype == torch.float64:  # dot products of D float32 values: error bound D·eps·Σ|terms|
        terms = (dy.abs()[:, None, :] * ys[plan.slot_to_row.clamp(min=0).long()].abs()).sum(-1)
        assert ((w_k.grad - dw_hi).abs() <= x.shape[1] * torch.finfo(dtype).eps * terms).all()
    else:
        assert_close_derived(w_k.grad, dw_hi, dw_lo, name="dw")
    assert (w_k.grad[plan.slot_to_row < 0] == 0).all()
    # without weight gradients the scatter kernel computes dys alone
    ys_k.grad = None
    unpermute(ys_k, plan, w).backward(dy)
    assert torch.equal(ys_k.grad, dys_lo)
    ys_k.grad = None
    unpermute(ys_k, plan).backward(dy)  # unit weights: the rows get dy
    assert torch.equal(ys_k.grad, _ref_grads(lambda a: reference.unpermute(a, plan), [ys], dy)[0])


def test_unpermute_bwd_launcher_writes_every_element(device):
    plan, x, w = _problem("align4-invalid", torch.float32, device)
    w = w.nan_to_num(0.3)
    ys = _ys(plan, x.shape[1], torch.float32, device).nan_to_num(1.0)
    ref = unpermute_bwd_op(x, ys, plan.slot_to_row, plan.row_to_slot, w, True)
    for config in CONFIGS.values():
        out = (nan_empty(ys.shape, ys.dtype, device), nan_empty(w.shape, w.dtype, device))
        dys, dw = unpermute_bwd_op.launch(x, ys, plan.slot_to_row, plan.row_to_slot, w, True, out=out, config=config)
        assert dys is out[0] and dw is out[1]
        assert torch.equal(dys, ref[0]) and not dw.isnan().any()
        assert (dys[plan.row_to_token < 0] == 0).all()


# ----------------------------------------------------------------------------------------
# Checks, torch.library, torch.compile
# ----------------------------------------------------------------------------------------


def test_input_checks_and_validate(device):
    plan, x, w = _problem("align4-invalid", torch.float32, device)
    ys = torch.randn(plan.max_rows, x.shape[1], device=device)
    with pytest.raises(TypeError, match="x: expected dtype float16/bfloat16/float32/float64, got torch.int32"):
        permute(x.int(), plan)
    with pytest.raises(ValueError, match="plan.slot_to_row: expected 9 tokens"):
        permute(x[:9], plan)
    with pytest.raises(ValueError, match=r"ys: expected \d+ rows \(plan.max_rows\), got shape \(32, 33\)"):
        unpermute(ys[:32], plan, w)
    with pytest.raises(ValueError, match=r"topk_weights: expected shape \(10, 4\)"):
        unpermute(ys, plan, w[:, :3])
    with pytest.raises(TypeError, match="plan: expected a RoutingPlan"):
        permute(x, plan.slot_to_row)
    with pytest.raises(TypeError, match="plan.row_to_token: expected dtype int32"):
        permute(x, plan._replace(row_to_token=plan.row_to_token.long()))
    broken = plan._replace(row_to_slot=plan.row_to_slot.roll(1))
    permute(x, broken)  # not validated: no sync, the plan is trusted
    for fn in (lambda: permute(x, broken, validate=True), lambda: unpermute(ys, broken, w, validate=True)):
        with pytest.raises(ValueError, match="plan: "):
            fn()


def test_opcheck(device):
    """Schemas, fake implementations and autograd registration (torch.compile: the next test)."""
    plan, x, w = _problem("align4-invalid", torch.float32, device)
    w = w.nan_to_num(0.5)
    ys = _ys(plan, x.shape[1], torch.float32, device).nan_to_num(0.0)
    s2r, r2s = plan.slot_to_row, plan.row_to_slot
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.moela.permute.default, (x.requires_grad_(), s2r, r2s), test_utils=utils)
    for weights in (w.requires_grad_(), None):
        torch.library.opcheck(torch.ops.moela.unpermute.default, (ys.requires_grad_(), s2r, r2s, weights),
                              test_utils=utils)


def test_compile_fullgraph_forward_and_backward(device):
    T, k, E, D = 6, 3, 5, 20
    ids = random_topk_ids(T, k, E, 0.2, device)
    x = torch.randn(T, D, device=device, requires_grad=True)
    w = torch.rand(T, k, device=device, requires_grad=True)

    def layer(x, ids, w):
        plan = make_routing(ids, E, 2)
        return unpermute(permute(x, plan) * 2.0, plan, w)

    y = torch.compile(layer, fullgraph=True, backend="aot_eager")(x, ids, w)
    y.sum().backward()
    x_ref, w_ref = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    plan = reference.make_routing(ids, E, 2)
    y_ref = reference.unpermute(reference.permute(x_ref, plan) * 2.0, plan, w_ref)
    y_ref.sum().backward()
    assert torch.equal(y, y_ref)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(w.grad, w_ref.grad)


# ----------------------------------------------------------------------------------------
# GPU tier: DeepSeek shapes (skipped without CUDA)
# ----------------------------------------------------------------------------------------


def _gpu_cases():
    try:
        from moela.profiling.shapes import V2_LITE, V3
    except ImportError:
        from moela.reference import ModelArgs

        V3, V2_LITE = ModelArgs.from_name("deepseek-v3"), ModelArgs.from_name("deepseek-v2-lite")
    out = []
    for args in (V3, V2_LITE):
        for T in (1, 256, 4096, 16384):
            out.append((T, args.n_activated_experts, args.n_routed_experts, args.dim))
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("T,k,E,D", _gpu_cases() if torch.cuda.is_available() else [])
def test_gpu_deepseek_shapes(T, k, E, D):
    ids = random_topk_ids(T, k, E, 0.05, "cuda")
    plan = make_routing(ids, E, 128 if T >= 4096 else 1)
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(permute(x, plan), reference.permute(x, plan))
    ys = torch.randn(plan.max_rows, D, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(T, k, device="cuda")
    assert torch.equal(unpermute(ys, plan, w), reference.unpermute(ys, plan, w))
    q, s = permute(x, plan, fp8=True)
    q_ref, s_ref = reference.quant_act(reference.permute(x, plan))
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=["bf16", "fp32", "fp64"])
def test_gpu_gradients(dtype):
    T, k, E, D = 512, 8, 64, 2048
    ids = random_topk_ids(T, k, E, 0.05, "cuda")
    plan = make_routing(ids, E, 16)
    x = torch.randn(T, D, device="cuda").to(dtype)
    ys = torch.randn(plan.max_rows, D, device="cuda").to(dtype)
    w = torch.rand(T, k, device="cuda")
    dxs, dy = torch.randn_like(ys), torch.randn_like(x)
    xk, ysk, wk = (t.clone().requires_grad_() for t in (x, ys, w))
    permute(xk, plan).backward(dxs)
    unpermute(ysk, plan, wk).backward(dy)
    (dx_hi,) = _ref_grads(lambda a: reference.permute(a, plan), [x.double()], dxs.double())
    (dx_lo,) = _ref_grads(lambda a: reference.permute(a, plan), [x], dxs)
    dys_lo, dw_lo = _ref_grads(lambda a, b: reference.unpermute(a, plan, b), [ys, w], dy)
    _, dw_hi = _ref_grads(lambda a, b: reference.unpermute(a, plan, b), [ys.double(), w.double()], dy.double())
    assert torch.equal(ysk.grad, dys_lo)
    if dtype != torch.float64:
        assert_close_derived(xk.grad, dx_hi, dx_lo, name="dx")
        assert_close_derived(wk.grad, dw_hi, dw_lo, name="dw")


@pytest.mark.gpu
def test_gpu_no_host_sync_and_cuda_graph():
    T, k, E, D = 256, 8, 256, 7168
    ids = random_topk_ids(T, k, E, 0.0, "cuda")
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(T, k, device="cuda")

    def step():
        plan = make_routing(ids, E, 1)
        return plan, unpermute(permute(x, plan), plan, w)

    step()  # warm-up: autotuning syncs, once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        plan, y = step()
    ids.copy_(random_topk_ids(T, k, E, 0.0, "cuda"))
    graph.replay()
    ref_plan = reference.make_routing(ids, E, 1)
    assert torch.equal(y, reference.unpermute(reference.permute(x, ref_plan), ref_plan, w))
    assert all(torch.equal(a, b) for a, b in zip(plan, RoutingPlan(*ref_plan), strict=True))
