"""moela.distributed dispatchers on 2 and 4 spawned gloo ranks against one process holding every expert.

Each expert is an elementwise function (``rows · s_e``), so every row's output is the same bits
wherever it is computed: the all-to-all dispatcher must then match one process bit for bit,
forward and backward (the same plan order, the same slot sums), and hand each rank exactly the
rows, in the order, that one process's routing plan gives its experts. The all-reduce
dispatcher adds the ranks' partial sums in another order: its output and input gradient are
held to ``(k + W) · eps · Σ_j |w_j · ys_j|`` (the rounding bound of the two sums, its magnitude
computed by the same path on absolute values). Cases: uneven token counts with a rank that has
none, ids of -1 and past E, all ids on rank 0's experts (the other ranks receive nothing), both
layouts (masked blocks poisoned with NaN past their counts).
"""

from __future__ import annotations

import pytest
import torch
from distributed_testing import Rank, register_checks

import moela.reference as R
from moela.distributed import (
    AllReduceDispatcher,
    AllToAllDispatcher,
    ContiguousLayout,
    DeepEPDispatcher,
    MaskedLayout,
    deep_ep_available,
)

E, D, K = 8, 16, 3
TOKENS = {1: [8], 2: [7, 4], 4: [5, 0, 9, 3]}  # tokens per rank: uneven, one rank without any


def _ids(T: int, only_rank0: bool, world: int) -> torch.Tensor:
    """(T, K) int32: distinct experts per token; ~20 % of slots -1 or E (skipped); or every id on
    rank 0's experts (slots beyond its E/W experts -1)."""
    n = E // world if only_rank0 else E
    ids = torch.rand(T, max(n, K)).argsort(-1)[:, :K]
    ids[ids >= n] = -1
    if not only_rank0:
        r = torch.rand(T, K)
        ids[r < 0.1] = -1
        ids[(r >= 0.1) & (r < 0.2)] = E
    return ids.to(torch.int32)


def _apply_experts(xs: torch.Tensor, layout, scales: torch.Tensor) -> torch.Tensor:
    """The test's experts: expert e multiplies its rows by scales[e]. Contiguous rows (M, D) or
    masked blocks (E_l, max_m, D), whose rows past each count become NaN (they must never be read)."""
    if isinstance(layout, MaskedLayout):
        valid = torch.arange(xs.shape[1], device=xs.device)[None, :] < layout.tokens_per_expert[:, None]
        return torch.where(valid[..., None], xs * scales[:, None, None], float("nan"))
    r = torch.arange(xs.shape[0], device=xs.device)
    e = torch.searchsorted(layout.offsets.long(), r, right=True).clamp(max=len(scales) - 1)
    return torch.where((r < layout.offsets[-1])[:, None], xs * scales[e][:, None], 0.0)


def _one_process(x, w, ids, scales, dy):
    """The same experts on one process with moela.reference's plan: y, dx, dw, the plan and the rows."""
    x, w = x.detach().requires_grad_(True), w.detach().requires_grad_(True)
    plan = R.make_routing(ids, E)
    xs = R.permute(x, plan)
    y = R.unpermute(_apply_experts(xs, ContiguousLayout(plan.offsets, plan.tokens_per_expert), scales), plan, w)
    y.backward(dy)
    return y.detach(), x.grad, w.grad, plan, xs.detach()


def _inputs(rank: Rank, only_rank0: bool, replicated: bool):
    T_all = sum(TOKENS[rank.world]) if not replicated else 6
    dev = rank.device
    x = torch.randn(T_all, D, device=dev)
    w = torch.rand(T_all, K, device=dev)
    ids = _ids(T_all, only_rank0, rank.world).to(dev)
    dy = torch.randn(T_all, D, device=dev)
    scales = torch.rand(E, device=dev) + 0.5
    return x, w, ids, dy, scales


def _mine(rank: Rank, t: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a tensor over all ranks' tokens (ranks hold consecutive slices)."""
    counts = TOKENS[rank.world]
    start = sum(counts[:rank.rank])
    return t[start:start + counts[rank.rank]]


def _check_rows(rank: Rank, xs, layout, plan, xs_one, dispatcher) -> None:
    """The rows this rank's experts got are one process's rows of those experts, in the same order."""
    lo, hi = dispatcher.experts.start, dispatcher.experts.stop
    counts = plan.tokens_per_expert[lo:hi]
    assert torch.equal(layout.tokens_per_expert, counts)
    first = int(plan.offsets[lo - 1]) if lo else 0
    expected = xs_one[first:int(plan.offsets[hi - 1])]
    if isinstance(layout, MaskedLayout):
        valid = torch.arange(xs.shape[1], device=xs.device)[None, :] < counts[:, None]
        assert torch.equal(xs[valid], expected)
        assert (xs[~valid] == 0).all(), "masked blocks: rows past the counts must be zeros"
    else:
        assert torch.equal(layout.offsets, torch.cumsum(counts, 0, dtype=torch.int32))
        assert torch.equal(xs[:expected.shape[0]], expected)
        assert (xs[expected.shape[0]:] == 0).all(), "rows past the last expert must be zeros"


def _all_to_all(rank: Rank, only_rank0: bool) -> None:
    x, w, ids, dy, scales = _inputs(rank, only_rank0, replicated=False)
    y1, dx1, dw1, plan, xs1 = _one_process(x, w, ids, scales, dy)
    for layout_name in ("contiguous", "masked"):
        d = AllToAllDispatcher(E, layout=layout_name)
        xr, wr = _mine(rank, x).clone().requires_grad_(True), _mine(rank, w).clone().requires_grad_(True)
        xs, layout, handle = d.dispatch(xr, wr, _mine(rank, ids), ops=R)  # R on GPUs too: bitwise slot sums
        _check_rows(rank, xs, layout, plan, xs1, d)
        y = d.combine(_apply_experts(xs, layout, scales[d.experts.start:d.experts.stop]), handle)
        y.backward(_mine(rank, dy))
        for name, got, want in (("y", y, _mine(rank, y1)), ("dx", xr.grad, _mine(rank, dx1)),
                                ("dw", wr.grad, _mine(rank, dw1))):
            assert torch.equal(got, want), f"{layout_name} {name}: max diff {(got - want).abs().max()}"


def check_all_to_all_matches_one_process(rank: Rank) -> None:
    _all_to_all(rank, only_rank0=False)


def check_all_to_all_other_ranks_receive_nothing(rank: Rank) -> None:
    _all_to_all(rank, only_rank0=True)


def check_all_to_all_backward_runs_on_ranks_without_rows(rank: Rank) -> None:
    """Data inputs (no gradient), experts with parameters, every row on rank 0's experts, and
    experts that return a fresh tensor for no rows (as ops on empty tensors may): the other
    ranks' paths to the exchanges carry nothing, yet their backward must join them."""
    x, w, ids, dy, scales = _inputs(rank, only_rank0=True, replicated=False)
    d = AllToAllDispatcher(E)
    s = scales[d.experts.start:d.experts.stop].clone().requires_grad_(True)
    xs, layout, handle = d.dispatch(_mine(rank, x), _mine(rank, w), _mine(rank, ids), ops=R)
    ys = _apply_experts(xs, layout, s) if xs.shape[0] else torch.zeros_like(xs)  # no history when empty
    d.combine(ys, handle).backward(_mine(rank, dy))
    one = scales.clone().requires_grad_(True)
    plan = R.make_routing(ids, E)
    y1 = R.unpermute(_apply_experts(R.permute(x, plan), ContiguousLayout(plan.offsets, plan.tokens_per_expert), one),
                     plan, w)
    y1.backward(dy)
    if rank.rank == 0:
        assert torch.equal(s.grad, one.grad[:len(s)]), (s.grad, one.grad[:len(s)])  # the same rows, in the same order
    else:
        assert s.grad is None and (one.grad[d.experts.start:d.experts.stop] == 0).all()


def check_all_reduce_backward_runs_on_ranks_without_rows(rank: Rank) -> None:
    """Every row on rank 0's experts, experts that return a fresh tensor when they have no rows:
    x's gradient (all-reduced in backward) still comes out whole on every rank."""
    x, w, ids, dy, scales = _inputs(rank, only_rank0=True, replicated=True)
    dx1 = _one_process(x, w, ids, scales, dy)[1]
    d = AllReduceDispatcher(E)
    xr = x.clone().requires_grad_(True)
    xs, layout, handle = d.dispatch(xr, w, ids, ops=R)
    mine = scales[d.experts.start:d.experts.stop]
    ys = _apply_experts(xs, layout, mine) if int(layout.tokens_per_expert.sum()) else torch.zeros_like(xs)
    d.combine(ys, handle).backward(dy)
    assert torch.equal(xr.grad, dx1)  # only rank 0 contributes: its share plus zeros


def _all_reduce(rank: Rank, only_rank0: bool) -> None:
    x, w, ids, dy, scales = _inputs(rank, only_rank0, replicated=True)
    y1, dx1, dw1, plan, xs1 = _one_process(x, w, ids, scales, dy)
    # Σ_j |w_j·ys_j| per element (y) and Σ_j |w_j·s_j·dy| (dx): the same path on absolute values
    mag_y, mag_dx = _one_process(x.abs(), w.abs(), ids, scales, dy.abs())[:2]
    gamma = (K + rank.world) * torch.finfo(x.dtype).eps
    for layout_name in ("contiguous", "masked"):
        d = AllReduceDispatcher(E, layout=layout_name)
        xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        xs, layout, handle = d.dispatch(xr, wr, ids, ops=R)
        _check_rows(rank, xs, layout, plan, xs1, d)
        y = d.combine(_apply_experts(xs, layout, scales[d.experts.start:d.experts.stop]), handle)
        y.backward(dy)
        for name, got, want, mag in (("y", y, y1, mag_y), ("dx", xr.grad, dx1, mag_dx)):
            err = (got - want).abs()
            assert (err <= gamma * mag).all(), f"{layout_name} {name}: error {err.max()} over bound"
        assert torch.equal(wr.grad, dw1)  # each slot's weight gradient comes from one rank, plus zeros


def check_all_reduce_matches_one_process(rank: Rank) -> None:
    _all_reduce(rank, only_rank0=False)


def check_all_reduce_other_ranks_receive_nothing(rank: Rank) -> None:
    _all_reduce(rank, only_rank0=True)


def check_bad_arguments_raise(rank: Rank) -> None:
    with pytest.raises(ValueError, match="n_experts: expected a multiple of the group size"):
        AllToAllDispatcher(rank.world * 2 + 1)
    with pytest.raises(ValueError, match="layout: expected one of"):
        AllReduceDispatcher(E, layout="blocked")
    d = AllToAllDispatcher(E)
    x = torch.randn(3, D, device=rank.device)
    with pytest.raises(ValueError, match="topk_ids: expected 3 rows"):
        d.dispatch(x, torch.rand(2, K, device=rank.device), torch.zeros(2, K, dtype=torch.int32, device=rank.device))
    with pytest.raises(TypeError, match="topk_ids: expected dtype int32/int64"):
        d.dispatch(x, torch.rand(3, K, device=rank.device), torch.zeros(3, K, device=rank.device))


def check_deep_ep_matches_one_process(rank: Rank) -> None:
    """DeepEP's normal mode (bf16 on GPUs): forward and gradients within the bound of its bf16 sums;
    its low-latency mode (masked blocks) forward likewise."""
    x, w, ids, dy, scales = _inputs(rank, only_rank0=False, replicated=False)
    x, dy = x.bfloat16(), dy.bfloat16()
    y1, dx1, dw1, *_ = _one_process(x.double(), w.double(), ids, scales.double(), dy.double())
    mag_y, mag_dx = _one_process(x.double().abs(), w.double().abs(), ids, scales.double(), dy.double().abs())[:2]
    gamma = 2 * (K + rank.world) * torch.finfo(torch.bfloat16).eps  # rows and partial sums rounded to bf16
    d = DeepEPDispatcher(E)
    xr, wr = _mine(rank, x).clone().requires_grad_(True), _mine(rank, w).clone().requires_grad_(True)
    xs, layout, handle = d.dispatch(xr, wr, _mine(rank, ids))
    y = d.combine(_apply_experts(xs, layout, scales[d.experts.start:d.experts.stop].bfloat16()), handle)
    y.backward(_mine(rank, dy))
    for name, got, want, mag in (("y", y, y1, mag_y), ("dx", xr.grad, dx1, mag_dx)):
        err = (got.double() - _mine(rank, want)).abs()
        assert (err <= gamma * _mine(rank, mag)).all(), f"{name}: error {err.max()} over bound"
    low = DeepEPDispatcher(E, mode="low_latency", max_tokens_per_rank=16)
    with torch.no_grad():
        xs, layout, handle = low.dispatch(_mine(rank, x), _mine(rank, w), _mine(rank, ids))
        y = low.combine(_apply_experts(xs, layout, scales[low.experts.start:low.experts.stop].bfloat16()), handle)
    err = (y.double() - _mine(rank, y1)).abs()
    assert (err <= gamma * _mine(rank, mag_y)).all(), f"low-latency y: error {err.max()} over bound"


_CHECKS = ["check_all_to_all_matches_one_process", "check_all_to_all_other_ranks_receive_nothing",
           "check_all_to_all_backward_runs_on_ranks_without_rows", "check_all_reduce_matches_one_process",
           "check_all_reduce_other_ranks_receive_nothing", "check_all_reduce_backward_runs_on_ranks_without_rows"]
CHECKS_2 = register_checks(__file__, 2, [*_CHECKS, "check_bad_arguments_raise"])
CHECKS_4 = register_checks(__file__, 4, _CHECKS)
CHECKS_1 = register_checks(__file__, 1, _CHECKS, backends=("nccl",))  # one GPU: NCCL in a group of one
DEEP_EP_CHECKS = ["check_deep_ep_matches_one_process"]
if deep_ep_available():
    register_checks(__file__, 2, DEEP_EP_CHECKS, backends=("nccl",))


@pytest.mark.slow  # spawns gloo process groups: half a minute on a 2-core CPU
@pytest.mark.parametrize("name", CHECKS_2)
def test_two_gloo_ranks(rank_results, name):
    rank_results(2).check(__file__, name)


@pytest.mark.slow  # spawns gloo process groups: half a minute on a 2-core CPU
@pytest.mark.parametrize("name", CHECKS_4)
def test_four_gloo_ranks(rank_results, name):
    rank_results(4).check(__file__, name)


@pytest.mark.gpu
@pytest.mark.parametrize("name", CHECKS_1)
def test_one_nccl_rank(rank_results, name):
    rank_results(1, "nccl").check(__file__, name)


@pytest.mark.gpu
@pytest.mark.skipif("__import__('torch').cuda.device_count() < 2", reason="needs 2 CUDA devices (NCCL)")
@pytest.mark.parametrize("name", CHECKS_2)
def test_two_nccl_ranks(rank_results, name):
    rank_results(2, "nccl").check(__file__, name)


@pytest.mark.gpu
@pytest.mark.skipif("__import__('torch').cuda.device_count() < 4", reason="needs 4 CUDA devices (NCCL)")
@pytest.mark.parametrize("name", CHECKS_4)
def test_four_nccl_ranks(rank_results, name):
    rank_results(4, "nccl").check(__file__, name)


@pytest.mark.gpu
@pytest.mark.skipif("__import__('torch').cuda.device_count() < 2", reason="needs 2 CUDA devices (NCCL)")
@pytest.mark.skipif(not deep_ep_available(), reason="needs the deep_ep package (DeepEP), not importable here")
@pytest.mark.parametrize("name", DEEP_EP_CHECKS)
def test_deep_ep_two_nccl_ranks(rank_results, name):
    rank_results(2, "nccl").check(__file__, name)
