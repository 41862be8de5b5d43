"""The DeepSeek gate and the MoE layer against independent formulations."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from moela.reference import ModelArgs, MoE, grouped_gemm, make_routing, permute, route, swiglu, unpermute


def deepseek_gate(logits, bias, topk, n_groups, topk_groups, score_func, route_scale):
    """DeepSeek-V3's Gate.forward, transcribed from its published description with torch.topk
    (valid where there are no ties)."""
    scores = logits.softmax(-1) if score_func == "softmax" else logits.sigmoid()
    original = scores
    if bias is not None:
        scores = scores + bias
    if n_groups > 1:
        s = scores.view(scores.size(0), n_groups, -1)
        group_scores = s.amax(-1) if bias is None else s.topk(2, dim=-1)[0].sum(-1)
        idx = group_scores.topk(topk_groups, dim=-1)[1]
        mask = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, idx, False)
        scores = s.masked_fill(mask.unsqueeze(-1), float("-inf")).flatten(1)
    ids = scores.topk(topk, dim=-1)[1]
    weights = original.gather(1, ids)
    if score_func == "sigmoid":
        weights = weights / weights.sum(-1, keepdim=True)
    return weights * route_scale, ids


GATE_CASES = {
    "v3-like": dict(E=32, topk=8, n_groups=8, topk_groups=4, score_func="sigmoid", route_scale=2.5, bias=True),
    "v3-nobias": dict(E=32, topk=8, n_groups=8, topk_groups=4, score_func="sigmoid", route_scale=2.5, bias=False),
    "v2-lite": dict(E=64, topk=6, n_groups=1, topk_groups=1, score_func="softmax", route_scale=1.0, bias=False),
    "softmax-groups": dict(E=16, topk=3, n_groups=4, topk_groups=2, score_func="softmax", route_scale=16.0, bias=False),
    "k1": dict(E=7, topk=1, n_groups=1, topk_groups=1, score_func="sigmoid", route_scale=1.0, bias=True),
}


def _gate_inputs(case, T=64, dtype=torch.float64):
    logits = torch.randn(T, case["E"], dtype=dtype) * 2
    bias = torch.randn(case["E"], dtype=dtype) * 0.5 if case["bias"] else None
    kw = {k: case[k] for k in ("topk", "n_groups", "topk_groups", "score_func", "route_scale")}
    return logits, bias, kw


@pytest.mark.parametrize("case", list(GATE_CASES.values()), ids=list(GATE_CASES))
def test_route_matches_deepseek(case):
    logits, bias, kw = _gate_inputs(case)
    weights, ids = route(logits, bias, **kw)
    ref_w, ref_ids = deepseek_gate(logits, bias, **kw)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float64
    # the same set of experts (order inside a row may differ only among equal scores: none here)
    torch.testing.assert_close(ids.long(), ref_ids, rtol=0, atol=0)
    torch.testing.assert_close(weights, ref_w, rtol=1e-12, atol=0)


@pytest.mark.parametrize("case", [c for c in GATE_CASES.values() if c["n_groups"] > 1],
                         ids=[k for k, c in GATE_CASES.items() if c["n_groups"] > 1])
def test_group_limited_routing_never_picks_a_masked_group(case):
    logits, bias, kw = _gate_inputs(case, T=256)
    _, ids = route(logits, bias, **kw)
    G, per = kw["n_groups"], case["E"] // kw["n_groups"]
    scores = logits.softmax(-1) if kw["score_func"] == "softmax" else logits.sigmoid()
    sel = scores + (bias if bias is not None else 0)
    grouped = sel.view(-1, G, per)
    group_score = grouped.amax(-1) if bias is None else grouped.sort(-1, descending=True)[0][..., :2].sum(-1)
    kept = group_score.argsort(-1, descending=True)[:, : kw["topk_groups"]]
    chosen_groups = ids.long() // per
    for t in range(ids.shape[0]):
        assert set(chosen_groups[t].tolist()) <= set(kept[t].tolist())
    assert (chosen_groups.sort(-1)[0].unique_consecutive(dim=-1).shape[-1]) <= G


def test_bias_changes_selection_not_the_weight_formula():
    case = GATE_CASES["v3-like"]
    logits, bias, kw = _gate_inputs(case, T=128)
    w0, ids0 = route(logits, None, **kw)
    big = torch.zeros(case["E"], dtype=logits.dtype)
    big[5] = 10.0  # expert 5 (group 1) always wins with this bias
    w1, ids1 = route(logits, big, **kw)
    assert (ids1 == 5).any(-1).all()
    assert not torch.equal(ids0, ids1)
    # weights are the *unbiased* sigmoid scores of the chosen experts, normalised, times route_scale
    for w, ids in ((w0, ids0), (w1, ids1)):
        s = logits.sigmoid().gather(1, ids.long())
        torch.testing.assert_close(w, s / s.sum(-1, keepdim=True) * kw["route_scale"], rtol=1e-13, atol=0)


def test_sigmoid_weights_sum_to_route_scale_softmax_weights_do_not_normalise():
    logits, bias, kw = _gate_inputs(GATE_CASES["v3-like"])
    w, _ = route(logits, bias, **kw)
    torch.testing.assert_close(w.sum(-1), torch.full_like(w[:, 0], 2.5), rtol=1e-13, atol=0)
    logits, bias, kw = _gate_inputs(GATE_CASES["v2-lite"])
    w, ids = route(logits, bias, **kw)
    torch.testing.assert_close(w, logits.softmax(-1).gather(1, ids.long()), rtol=1e-13, atol=0)
    assert (w.sum(-1) < 1).all()


def test_ties_go_to_the_lower_index():
    T, E = 3, 16
    logits = torch.zeros(T, E)
    _, ids = route(logits, None, topk=4, score_func="sigmoid")
    assert ids.tolist() == [[0, 1, 2, 3]] * T
    _, ids = route(logits, None, topk=4, n_groups=4, topk_groups=2, score_func="sigmoid")
    assert ids.tolist() == [[0, 1, 2, 3]] * T  # groups 0 and 1 win the tie, then experts 0..3
    logits[:, 9] = 1.0  # expert 9 (group 2) is best; tie among the rest goes low
    _, ids = route(logits, None, topk=3, n_groups=4, topk_groups=2, score_func="sigmoid")
    assert ids.tolist() == [[9, 0, 1]] * T


@given(
    T=st.integers(1, 40), G=st.sampled_from([1, 2, 4]), per=st.integers(2, 6), data=st.data(),
    score_func=st.sampled_from(["softmax", "sigmoid"]), use_bias=st.booleans(),
)
def test_route_properties(T, G, per, data, score_func, use_bias):
    E = G * per
    topk_groups = data.draw(st.integers(1, G))
    topk = data.draw(st.integers(1, topk_groups * per))
    logits = torch.randn(T, E, dtype=torch.float64)
    bias = torch.randn(E, dtype=torch.float64) if use_bias else None
    w, ids = route(logits, bias, topk=topk, n_groups=G, topk_groups=topk_groups,
                   score_func=score_func, route_scale=1.5)
    assert w.shape == ids.shape == (T, topk)
    assert ((ids >= 0) & (ids < E)).all()
    assert (ids.sort(-1)[0].diff(dim=-1) > 0).all()  # k distinct experts per token
    assert ((ids.long() // per).unique(dim=None).numel() <= G)
    for t in range(T):
        assert len(set((ids[t].long() // per).tolist())) <= topk_groups
    if score_func == "sigmoid":
        torch.testing.assert_close(w.sum(-1), torch.full((T,), 1.5, dtype=w.dtype))
    assert (w > 0).all()


def test_route_rejects_bad_arguments():
    logits = torch.randn(4, 8)
    with pytest.raises(ValueError, match="logits"):
        route(logits[0], None, topk=2)
    with pytest.raises(TypeError, match="logits"):
        route(logits.long(), None, topk=2)
    with pytest.raises(ValueError, match="bias"):
        route(logits, torch.zeros(7), topk=2)
    with pytest.raises(ValueError, match="n_groups"):
        route(logits, None, topk=2, n_groups=3)
    with pytest.raises(ValueError, match="topk"):
        route(logits, None, topk=5, n_groups=4, topk_groups=2)
    with pytest.raises(ValueError, match="score_func"):
        route(logits, None, topk=2, score_func="tanh")


# ----------------------------------------------------------------------------- the MoE layer
def _moe(dtype=torch.float64, **overrides):
    args = ModelArgs.from_name("tiny", **overrides)
    moe = MoE(args).to(dtype)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.2)
    return moe


def dense_moe(moe, x):
    """Every expert on every token, masked by the routing: an independent formulation."""
    weights, ids = moe.gate(x)
    E = len(moe.experts)
    dense_w = torch.zeros(x.shape[0], E, dtype=weights.dtype).scatter_(1, ids.long(), weights)  # (T, E)
    outs = torch.stack([e.w2(F.silu(e.w1(x)) * e.w3(x)) for e in moe.experts])  # (E, T, D)
    y = torch.einsum("te,etd->td", dense_w.to(x.dtype), outs)
    if moe.shared_experts is not None:
        y = y + moe.shared_experts(x)
    return y


@pytest.mark.parametrize("overrides", [
    {}, {"score_func": "softmax", "n_expert_groups": 1, "n_limited_groups": 1, "gate_bias": False},
    {"n_shared_experts": 0}, {"n_activated_experts": 1},
], ids=["v3-like", "v2-lite-like", "no-shared", "k1"])
def test_moe_loop_equals_dense_formulation(overrides):
    moe = _moe(**overrides)
    x = torch.randn(37, moe.dim, dtype=torch.float64)
    torch.testing.assert_close(moe(x), dense_moe(moe, x), rtol=1e-12, atol=1e-12)


def test_moe_float32_within_float32_error():
    moe64 = _moe()
    moe32 = _moe(torch.float32)
    moe32.load_state_dict({k: v.float() for k, v in moe64.state_dict().items()})
    x = torch.randn(2, 9, moe64.dim, dtype=torch.float64)
    y64, y32 = moe64(x), moe32(x.float())
    assert y32.dtype == torch.float32 and y32.shape == x.shape
    # same routing in both precisions for random data; the error is float32 matmul error
    assert (y32.double() - y64).abs().max() < 1e-5 * y64.abs().max()


def test_moe_equals_the_op_chain():
    """permute -> grouped_gemm -> swiglu -> grouped_gemm -> unpermute == the expert loop."""
    moe = _moe()
    x = torch.randn(29, moe.dim, dtype=torch.float64)
    weights, ids = moe.gate(x)
    w1 = torch.stack([e.w1.weight for e in moe.experts])
    w2 = torch.stack([e.w2.weight for e in moe.experts])
    w3 = torch.stack([e.w3.weight for e in moe.experts])
    for align in (1, 4):
        plan = make_routing(ids, len(moe.experts), align=align)
        xs = permute(x, plan)
        h = swiglu(grouped_gemm(xs, w1, plan.offsets), grouped_gemm(xs, w3, plan.offsets))
        y = unpermute(grouped_gemm(h, w2, plan.offsets), plan, weights)
        torch.testing.assert_close(y, moe.routed(x, weights, ids), rtol=1e-12, atol=1e-12)


def test_expert_is_swiglu_and_parameter_names_match_deepseek():
    moe = _moe()
    e = moe.experts[3]
    x = torch.randn(5, moe.dim, dtype=torch.float64)
    manual = (F.silu(x @ e.w1.weight.T) * (x @ e.w3.weight.T)) @ e.w2.weight.T
    torch.testing.assert_close(e(x), manual)
    keys = set(moe.state_dict())
    assert {"gate.weight", "gate.bias", "experts.0.w1.weight", "experts.15.w3.weight",
            "shared_experts.w1.weight", "shared_experts.w2.weight", "shared_experts.w3.weight"} <= keys
    assert moe.gate.bias.dtype == torch.float64  # .to(dtype) moved it; DeepSeek keeps it float32
    args = ModelArgs.from_name("deepseek-v3")
    with torch.device("meta"):
        v3 = MoE(args)
    sd = v3.state_dict()
    assert sd["gate.weight"].shape == (256, 7168) and sd["gate.bias"].shape == (256,)
    assert sd["experts.255.w1.weight"].shape == (2048, 7168)
    assert sd["experts.0.w2.weight"].shape == (7168, 2048)
    assert sd["shared_experts.w1.weight"].shape == (2048, 7168)
    lite = MoE(ModelArgs.from_name("deepseek-v2-lite").replace(n_routed_experts=6, n_activated_experts=2))
    assert lite.gate.bias is None and lite.shared_experts.w1.weight.shape == (2816, 2048)


def test_moe_keeps_leading_shape_and_rejects_bad_input():
    moe = _moe(torch.float32)
    x = torch.randn(2, 3, moe.dim)
    assert moe(x).shape == x.shape
    with pytest.raises(ValueError, match="x"):
        moe(torch.randn(2, moe.dim + 1))
    with pytest.raises(TypeError, match="x"):
        moe(torch.ones(2, moe.dim, dtype=torch.int64))


def test_softmax_scores_use_float32_even_for_bf16_input():
    moe = _moe(torch.bfloat16)
    x = torch.randn(8, moe.dim, dtype=torch.bfloat16)
    w, ids = moe.gate(x)
    assert w.dtype == torch.float32 and ids.dtype == torch.int32
    with torch.no_grad():
        assert math.isfinite(float(moe(x).float().abs().sum()))
