"""moela.integrations.vllm.fused_experts against a dense reference written per (token, slot).

vLLM's layouts: w1 (E, 2N, K) gate over up, w2 (E, K, N); an expert_map sends global ids to
local ones or -1 (another rank's expert: the slot adds nothing). bf16/fp32 are held to the
derived bound (twice the error the same dense computation makes in torch at that precision,
against float64); block FP8 to calc_diff < 2e-3 against the float64 result of the dequantized
weights (the bound tests/model/test_moe.py holds FP8 MoE layers to).
"""

import pytest
import torch
import torch.nn.functional as F
from moela_testing import assert_close_derived

from moela.integrations.vllm import fused_experts
from moela.reference import calc_diff, dequant, quant_weight

T, K, N, E, TOPK = 7, 64, 32, 6, 2


def dense_experts(x, w1, w2, weights, ids, expert_map=None):
    """y[t] = Σ_j w[t, j] · w2_e (silu(w1_e[:N] x) · w1_e[N:] x), e the (local) expert of slot j."""
    n = w2.shape[-1]
    y = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if expert_map is not None:
                e = int(expert_map[e]) if 0 <= e < expert_map.numel() else -1
            if not 0 <= e < w1.shape[0]:
                continue
            h = w1[e] @ x[t]
            y[t] += weights[t, j].to(x.dtype) * (w2[e] @ (F.silu(h[:n]) * h[n:]))
    return y


def _problem(dtype, k=TOPK, e=E):
    x = torch.randn(T, K, dtype=dtype)
    w1 = (torch.randn(e, 2 * N, K) * K**-0.5).to(dtype)
    w2 = (torch.randn(e, K, N) * N**-0.5).to(dtype)
    weights = torch.rand(T, k)
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(T)]).to(torch.int32)
    return x, w1, w2, weights, ids


def _derived(out, x, w1, w2, weights, ids, name, **kw):
    hi = dense_experts(x.double(), w1.double(), w2.double(), weights.double(), ids, **kw)
    lo = dense_experts(x, w1, w2, weights, ids, **kw)
    assert_close_derived(out, hi, lo, name=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_experts_matches_dense(dtype):
    x, w1, w2, weights, ids = _problem(dtype)
    out = fused_experts(x, w1, w2, weights, ids, backend="reference")
    assert out.dtype == dtype and out.shape == x.shape
    _derived(out, x, w1, w2, weights, ids, name=str(dtype))


def test_fused_experts_on_the_kernels(device):
    x, w1, w2, weights, ids = _problem(torch.bfloat16)
    out = fused_experts(*(t.to(device) for t in (x, w1, w2, weights, ids)), backend="triton")
    _derived(out, x, w1, w2, weights, ids, name="triton")


def test_expert_map_skips_other_ranks_experts():
    g, local = 12, E  # 12 experts in all, this rank holds global experts 3, 5, 6, 8, 9, 11
    x, w1, w2, weights, _ = _problem(torch.float32)
    owned = torch.tensor([3, 5, 6, 8, 9, 11])
    expert_map = torch.full((g,), -1, dtype=torch.int32)
    expert_map[owned] = torch.arange(local, dtype=torch.int32)
    ids = torch.stack([torch.randperm(g)[:TOPK] for _ in range(T)]).to(torch.int32)
    ids[0] = torch.tensor([0, 1])  # a token whose experts all live elsewhere: zeros
    ids[1, 0] = 17  # out of range: skipped, never read out of bounds
    out = fused_experts(x, w1, w2, weights, ids, expert_map=expert_map, global_num_experts=g, backend="reference")
    assert torch.equal(out[0], torch.zeros(K))
    _derived(out, x, w1, w2, weights, ids, name="expert_map", expert_map=expert_map)


def test_inplace_and_router_weight_on_input():
    x, w1, w2, weights, ids = _problem(torch.float32, k=1)
    want = fused_experts(x.clone(), w1, w2, weights, ids, backend="reference")
    buf = x.clone()
    assert fused_experts(buf, w1, w2, weights, ids, inplace=True, backend="reference") is buf
    assert torch.equal(buf, want)
    out = fused_experts(x, w1, w2, weights, ids, apply_router_weight_on_input=True, backend="reference")
    _derived(out, x * weights, w1, w2, torch.ones_like(weights), ids, name="weight on input")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_block_fp8_matches_dequantized_dense(backend, device):
    x = torch.randn(T, 128, dtype=torch.bfloat16)
    w1 = torch.randn(E, 256, 128) * 128**-0.5
    w2 = torch.randn(E, 128, 128) * 128**-0.5
    (q1, s1), (q2, s2) = quant_weight(w1), quant_weight(w2)
    weights = torch.rand(T, TOPK)
    ids = torch.stack([torch.randperm(E)[:TOPK] for _ in range(T)]).to(torch.int64)
    expert_map = torch.arange(E, dtype=torch.int64).flip(0)  # a permutation: every expert local
    args = (t.to(device) for t in (x, q1, q2, weights, ids))
    out = fused_experts(*args, use_fp8_w8a8=True, w1_scale=s1.to(device), w2_scale=s2.to(device),
                        block_shape=[128, 128], expert_map=expert_map.to(device), backend=backend)
    assert out.dtype == torch.bfloat16
    want = dense_experts(x.double(), dequant(q1, s1).double(), dequant(q2, s2).double(), weights.double(), ids,
                         expert_map=expert_map)
    assert calc_diff(out.cpu().double(), want) < 2e-3


def test_slots_routed_nowhere_give_zeros():
    x, w1, w2, weights, ids = _problem(torch.float32)
    ids[:] = -1  # every expert on another rank: zeros, never the input's old contents
    assert torch.equal(fused_experts(x, w1, w2, weights, ids, inplace=True, backend="reference"), torch.zeros_like(x))


@pytest.mark.parametrize("kwargs, match", [
    (dict(activation="gelu"), "activation"),
    (dict(use_int8_w8a8=True), "use_int8_w8a8"),
    (dict(use_int4_w4a16=True), "use_int4_w4a16"),
    (dict(w1_zp=torch.zeros(1)), "w1_zp"),
    (dict(w1_scale=torch.ones(1)), "w1_scale"),
    (dict(use_fp8_w8a8=True), "block_shape"),
    (dict(global_num_experts=99), "global_num_experts"),
    (dict(apply_router_weight_on_input=True), "apply_router_weight_on_input"),
    (dict(quant_config=object()), "quant_config"),
    (dict(backend="cuda"), "backend"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_unsupported_arguments_are_rejected(kwargs, match):
    x, w1, w2, weights, ids = _problem(torch.float32)
    with pytest.raises(ValueError, match=match):
        fused_experts(x, w1, w2, weights, ids, **kwargs)


def test_shapes_and_dtypes_are_checked():
    x, w1, w2, weights, ids = _problem(torch.float32)
    with pytest.raises(ValueError, match="w1"):
        fused_experts(x, w1[:, :, :-1], w2, weights, ids)
    with pytest.raises(ValueError, match="w2"):
        fused_experts(x, w1, w2[:, :, :-1], weights, ids)
    with pytest.raises(ValueError, match="w1"):
        fused_experts(x, w1.bfloat16(), w2, weights, ids)
    with pytest.raises(ValueError, match="topk_weights"):
        fused_experts(x, w1, w2, weights[:, :1], ids)
    with pytest.raises(TypeError, match="topk_ids"):
        fused_experts(x, w1, w2, weights, ids.float())
    with pytest.raises(TypeError, match="expert_map"):
        fused_experts(x, w1, w2, weights, ids, expert_map=torch.zeros(E))
