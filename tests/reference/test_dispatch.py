"""Routing plan, permute and unpermute: invariants of the references."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from moela_testing import check_plan_invariants, random_topk_ids

from moela.reference import make_routing, permute, unpermute

CASES = {
    "T1": (1, 8, 16, 1, 0.0),
    "prime-E": (23, 3, 13, 1, 0.0),
    "k1": (17, 1, 5, 1, 0.0),
    "invalid-ids": (31, 6, 11, 1, 0.3),
    "align8": (19, 4, 7, 8, 0.0),
    "align-invalid": (19, 4, 7, 4, 0.5),
    "few-tokens-many-experts": (2, 2, 64, 16, 0.0),
}


@pytest.mark.parametrize("T,k,E,align,invalid", list(CASES.values()), ids=list(CASES))
def test_plan_invariants(T, k, E, align, invalid):
    ids = random_topk_ids(T, k, E, invalid)
    check_plan_invariants(make_routing(ids, E, align), ids, E, align)


def test_plan_all_tokens_to_one_expert_and_empty_experts():
    T, E = 9, 6
    ids = torch.full((T, 1), 4, dtype=torch.int32)
    plan = make_routing(ids, E)
    assert plan.tokens_per_expert.tolist() == [0, 0, 0, 0, 9, 0]
    assert plan.offsets.tolist() == [0, 0, 0, 0, 9, 9]
    assert plan.slot_to_row.view(-1).tolist() == list(range(T))
    check_plan_invariants(plan, ids, E, 1)
    ids = torch.full((3, 2), -1, dtype=torch.int32)  # every expert remote
    plan = make_routing(ids, E, align=4)
    assert plan.offsets.tolist() == [0] * E and (plan.row_to_token == -1).all()


def test_plan_example_from_the_docstring():
    plan = make_routing(torch.tensor([[1, 0], [1, -1]]), n_experts=3)
    assert plan.offsets.tolist() == [1, 3, 3]
    assert plan.slot_to_row.tolist() == [[1, 0], [2, -1]]
    assert plan.row_to_token.tolist() == [0, 0, 1, -1]


def test_ids_past_n_experts_are_skipped_and_bad_args_raise():
    ids = torch.tensor([[0, 5], [7, 1]], dtype=torch.int64)
    plan = make_routing(ids, 5)
    assert plan.slot_to_row.tolist() == [[0, -1], [-1, 1]]
    with pytest.raises(TypeError, match="topk_ids"):
        make_routing(ids.float(), 5)
    with pytest.raises(ValueError, match="topk_ids"):
        make_routing(ids[0], 5)
    with pytest.raises(ValueError, match="n_experts"):
        make_routing(ids, 0)
    with pytest.raises(ValueError, match="align"):
        make_routing(ids, 5, align=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_permute_then_unpermute_with_unit_weights_and_k1_is_identity(dtype):
    T, E, D = 33, 7, 24
    x = torch.randn(T, D).to(dtype)
    for align in (1, 8):
        plan = make_routing(random_topk_ids(T, 1, E), E, align)
        xs = permute(x, plan)
        assert (xs[plan.row_to_token < 0] == 0).all()
        assert torch.equal(unpermute(xs, plan, torch.ones(T, 1)), x)
        assert torch.equal(unpermute(xs, plan), x)


def test_unpermute_is_the_weighted_sum_and_skips_invalid_slots():
    T, k, E, D = 21, 4, 9, 16
    ids = random_topk_ids(T, k, E, invalid_frac=0.25)
    plan = make_routing(ids, E, align=2)
    x = torch.randn(T, D, dtype=torch.float64)
    w = torch.rand(T, k, dtype=torch.float64)
    ys = permute(x, plan) * 3.0  # stand-in "expert": times three
    y = unpermute(ys, plan, w)
    expected = 3.0 * x * (w * (ids >= 0)).sum(-1, keepdim=True)
    torch.testing.assert_close(y, expected, rtol=1e-14, atol=1e-14)


def test_unpermute_accumulates_in_float32_for_bf16():
    T, k, E, D = 4, 8, 8, 32
    ids = torch.arange(k).repeat(T, 1).to(torch.int32)
    plan = make_routing(ids, E)
    ys = torch.full((plan.max_rows, D), 1.0 + 2**-7, dtype=torch.bfloat16)  # exactly representable
    w = torch.full((T, k), 1.0)
    y = unpermute(ys, plan, w)
    # 8 · (1 + 2^-7) = 8.0625 is exact in fp32 and rounds once to bf16 (8.0625 -> 8.0625)
    assert y.dtype == torch.bfloat16 and (y.float() == torch.tensor(8.0625).bfloat16().float()).all()


def test_permute_and_unpermute_reject_bad_input():
    plan = make_routing(random_topk_ids(5, 2, 4), 4)
    with pytest.raises(ValueError, match="x"):
        permute(torch.randn(6, 3), plan)
    with pytest.raises(ValueError, match="ys"):
        unpermute(torch.randn(3, 3), plan)
    with pytest.raises(ValueError, match="topk_weights"):
        unpermute(torch.randn(plan.max_rows, 3), plan, torch.ones(5, 3))


@given(T=st.integers(1, 50), k=st.integers(1, 6), E=st.integers(1, 20), align=st.sampled_from([1, 2, 16]),
       invalid=st.sampled_from([0.0, 0.2]))
def test_plan_properties(T, k, E, align, invalid):
    k = min(k, E)
    ids = random_topk_ids(T, k, E, invalid)
    plan = make_routing(ids, E, align)
    check_plan_invariants(plan, ids, E, align)
    x = torch.randn(T, 5, dtype=torch.float64)
    y = unpermute(permute(x, plan), plan)
    torch.testing.assert_close(y, x * (ids >= 0).sum(-1, keepdim=True), rtol=1e-14, atol=1e-14)


def test_permute_fp8_is_quant_act_of_the_rows():
    from moela.reference import quant_act

    T, k, E, D = 9, 2, 5, 256
    plan = make_routing(random_topk_ids(T, k, E), E, align=4)
    x = torch.randn(T, D, dtype=torch.bfloat16)
    q, s = permute(x, plan, fp8=True, scale_fmt="ue8m0")
    q_ref, s_ref = quant_act(permute(x, plan), 128, "ue8m0")
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)


def test_empty_plans_keep_the_gradient_path():
    """T = 0 tokens or M = 0 rows: the results are zeros that still belong to the inputs' graph
    (a rank with nothing to do joins the backward)."""
    x = torch.randn(0, 4, requires_grad=True)
    plan = make_routing(torch.zeros(0, 2, dtype=torch.int32), 3)
    xs = permute(x, plan)
    assert xs.shape == (0, 4) and xs.requires_grad
    xs.sum().backward()
    assert x.grad.shape == (0, 4)
    ys = torch.randn(0, 4, requires_grad=True)  # M = 0 rows
    y = unpermute(ys, plan, torch.rand(0, 2, requires_grad=True))
    assert y.shape == (0, 4) and y.requires_grad
    y.sum().backward()
    assert ys.grad.shape == (0, 4)
    plan = make_routing(torch.full((3, 2), -1, dtype=torch.int32), 3)  # every slot skipped
    ys = torch.randn(plan.max_rows, 4, requires_grad=True)
    w = torch.rand(3, 2, requires_grad=True)
    y = unpermute(ys, plan, w)
    assert torch.equal(y, torch.zeros(3, 4)) and y.requires_grad
    y.sum().backward()
    assert torch.equal(ys.grad, torch.zeros_like(ys)) and torch.equal(w.grad, torch.zeros(3, 2))
