"""moela.distributed without a group: the masked <-> contiguous layouts, expert blocks per rank and
the errors a user meets before any process group exists (DeepEP missing, no init)."""

from __future__ import annotations

import pytest
import torch
from moela_testing import random_topk_ids

import moela.reference as R
from moela.distributed import (
    AllToAllDispatcher,
    ContiguousLayout,
    DeepEPDispatcher,
    MaskedLayout,
    deep_ep_available,
    from_masked,
    local_experts,
    to_masked,
)


@pytest.mark.parametrize("T,k,E", [(9, 3, 5), (1, 1, 1), (0, 2, 4), (6, 4, 4)], ids=["uneven", "one", "empty", "full"])
def test_masked_round_trip(T, k, E):
    ids = random_topk_ids(T, k, E, invalid_frac=0.2)
    plan = R.make_routing(ids, E)
    layout = ContiguousLayout(plan.offsets, plan.tokens_per_expert)
    xs = R.permute(torch.randn(T, 8), plan).requires_grad_(True)
    max_m = max(int(plan.tokens_per_expert.max()) if E and T else 0, 1) + 1  # one spare row per block
    blocks, masked = to_masked(xs, layout, max_m)
    assert isinstance(masked, MaskedLayout) and torch.equal(masked.tokens_per_expert, plan.tokens_per_expert)
    assert blocks.shape == (E, max_m, 8)
    starts = plan.offsets - plan.tokens_per_expert
    for e in range(E):
        n, s = int(plan.tokens_per_expert[e]), int(starts[e])
        assert torch.equal(blocks[e, :n], xs[s:s + n]) and (blocks[e, n:] == 0).all()
    valid = torch.arange(max_m)[None, :] < plan.tokens_per_expert[:, None]
    poisoned = torch.where(valid[..., None], blocks * 2, float("nan"))  # rows past the counts: never read
    back = from_masked(poisoned, layout, plan.max_rows)
    n_valid = int(plan.offsets[-1]) if E else 0
    assert torch.equal(back[:n_valid], 2 * xs[:n_valid]) and (back[n_valid:] == 0).all()
    back.sum().backward()  # differentiable both ways: each valid row's gradient is 2, the padding's 0
    assert torch.equal(xs.grad[:n_valid], torch.full_like(xs[:n_valid], 2.0)) and (xs.grad[n_valid:] == 0).all()


def test_layout_errors():
    plan = R.make_routing(random_topk_ids(4, 2, 3), 3)
    layout = ContiguousLayout(plan.offsets, plan.tokens_per_expert)
    with pytest.raises(ValueError, match="max_m"):
        to_masked(torch.zeros(plan.max_rows, 4), layout, 0)
    with pytest.raises(ValueError, match="ys: expected 3 expert blocks"):
        from_masked(torch.zeros(2, 4, 4), layout, plan.max_rows)
    with pytest.raises(TypeError, match="xs: expected dtype"):
        to_masked(torch.zeros(plan.max_rows, 4, dtype=torch.int32), layout, 2)


def test_local_experts_are_contiguous_blocks():
    assert [local_experts(256, 8, r) for r in (0, 7)] == [range(0, 32), range(224, 256)]
    blocks = [list(local_experts(12, 4, r)) for r in range(4)]
    assert sum(blocks, []) == list(range(12))
    with pytest.raises(ValueError, match="n_experts: expected a multiple of the group size 4"):
        local_experts(10, 4, 0)
    with pytest.raises(ValueError, match="rank: expected 0 <= rank < 4"):
        local_experts(8, 4, 4)


def test_dispatcher_needs_an_initialised_group():
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        AllToAllDispatcher(8)


@pytest.mark.skipif(deep_ep_available(), reason="deep_ep is installed here")
def test_deep_ep_dispatcher_without_deep_ep_says_so():
    with pytest.raises(ImportError, match="DeepEPDispatcher needs the deep_ep package"):
        DeepEPDispatcher(8)
