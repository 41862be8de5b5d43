"""kernels.routing: the Triton routing plan equals the reference plan, tensor for tensor.

Both schedules run on CPU through the interpreter: the one-launch schedule (grid E) and the
three-launch one (sort, scan, scatter), forced on small inputs with 16-slot sort blocks so
that a plan spans several blocks. Output buffers are poisoned with a value no plan holds, so
an element the kernels forget to write fails. The GPU tier runs DeepSeek shapes.
"""

from __future__ import annotations

import pytest
import torch
from moela_testing import check_plan_invariants, random_topk_ids

from moela import reference
from moela.kernels.routing import SMALL_MAX_SLOTS, make_routing
from moela.reference import RoutingPlan, max_rows
from moela.reference.dispatch import check_plan, validate_plan

# triton 3.6's interpreter turns runtime loop bounds into Python ints through 1-element arrays,
# which numpy 2.3 deprecates.

POISON = 0x5EED5EED  # no plan holds this value

# schedule name -> the launch config (make_routing.launch's ``config``)
SCHEDULES = {"one-launch": dict(small_max_slots=SMALL_MAX_SLOTS), "sort-scan-scatter": dict(small_max_slots=0,
                                                                                         sort_block=16)}




def _poisoned(T, k, E, align, device):
    M = max_rows(T, k, E, align)
    full = lambda *shape: torch.full(shape, POISON, dtype=torch.int32, device=device)
    return RoutingPlan(full(E), full(E), full(T, k), full(M), full(M))


def _plan(ids, E, align, schedule):
    out = _poisoned(*ids.shape, E, align, ids.device)
    got = make_routing.launch(ids, E, align, out=out, config=SCHEDULES[schedule])
    assert all(a is b for a, b in zip(got, out, strict=True))
    return RoutingPlan(*got)




def _assert_same_plan(plan, ref):
    for name, a, b in zip(RoutingPlan._fields, plan, ref, strict=True):
        assert a.dtype == torch.int32 and a.shape == b.shape, name
        assert torch.equal(a.cpu(), b.cpu()), f"{name}: {a.tolist()} != {b.tolist()}"


# (T, k, E, align, fraction of -1 ids)
CASES = {
    "T1": (1, 8, 16, 1, 0.0),
    "prime-E": (23, 3, 13, 1, 0.0),
    "k1": (17, 1, 5, 1, 0.0),
    "ids-of-minus-one": (31, 6, 11, 1, 0.3),
    "align8": (19, 4, 7, 8, 0.0),
    "align4-invalid": (19, 4, 7, 4, 0.5),
    "few-tokens-many-experts": (2, 2, 32, 16, 0.0),
    "align3-prime": (12, 3, 5, 3, 0.1),
    "no-tokens": (0, 4, 6, 2, 0.0),
}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_plan_equals_reference(case, schedule, device):
    T, k, E, align, invalid = CASES[case]
    ids = random_topk_ids(T, k, E, invalid, device)
    plan = _plan(ids, E, align, schedule)
    _assert_same_plan(plan, reference.make_routing(ids, E, align))
    check_plan_invariants(plan, ids, E, align)
    validate_plan(plan)


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_all_tokens_to_one_expert_and_empty_experts(schedule, device):
    T, E = 40, 6
    ids = torch.full((T, 1), 4, dtype=torch.int32, device=device)
    plan = _plan(ids, E, 1, schedule)
    assert plan.tokens_per_expert.tolist() == [0, 0, 0, 0, T, 0]
    assert plan.offsets.tolist() == [0, 0, 0, 0, T, T]
    assert plan.slot_to_row.view(-1).tolist() == list(range(T))
    check_plan_invariants(plan, ids, E, 1)
    validate_plan(plan)
    ids = torch.full((9, 3), -1, dtype=torch.int32, device=device)  # every expert remote
    plan = _plan(ids, E, 4, schedule)
    assert plan.offsets.tolist() == [0] * E and (plan.row_to_token == -1).all() and (plan.slot_to_row == -1).all()


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_int64_ids_outside_the_range_are_skipped(schedule, device):
    E = 5
    ids = torch.tensor([[0, 2**40], [-(2**35), 4], [5, -1], [3, 3]], dtype=torch.int64, device=device)
    plan = _plan(ids, E, 2, schedule)
    _assert_same_plan(plan, reference.make_routing(ids, E, 2))
    assert plan.slot_to_row.tolist() == [[0, -1], [-1, 4], [-1, -1], [2, 3]]


def test_both_schedules_and_repeated_runs_are_identical(device):
    T, k, E, align = 30, 4, 9, 4
    ids = random_topk_ids(T, k, E, 0.2, device)
    ids[::7] = 3  # hot expert
    first = _plan(ids, E, align, "one-launch")
    for schedule in SCHEDULES:
        for _ in range(2):
            _assert_same_plan(_plan(ids, E, align, schedule), first)


def test_public_op_validate_and_checks(device):
    ids = torch.tensor([[1, 0], [1, -1]], dtype=torch.int32, device=device)
    plan = make_routing(ids, n_experts=3, validate=True)
    assert isinstance(plan, RoutingPlan)
    assert plan.offsets.tolist() == [1, 3, 3]
    assert plan.slot_to_row.tolist() == [[1, 0], [2, -1]]
    assert plan.row_to_token.tolist() == [0, 0, 1, -1]
    for bad in (3, -2):
        ids_bad = torch.tensor([[1, bad]], dtype=torch.int32, device=device)
        with pytest.raises(ValueError, match=r"topk_ids: expected ids in \[0, 3\) or -1"):
            make_routing(ids_bad, 3, validate=True)
        assert make_routing(ids_bad, 3).slot_to_row.tolist() == [[0, -1]]  # skipped without validate
    with pytest.raises(TypeError, match="topk_ids: expected dtype int32/int64, got torch.float32"):
        make_routing(ids.float(), 3)
    with pytest.raises(ValueError, match="topk_ids: expected a 2-D tensor"):
        make_routing(ids.view(-1), 3)
    with pytest.raises(ValueError, match="n_experts: expected a positive int, got 0"):
        make_routing(ids, 0)
    with pytest.raises(ValueError, match="align: expected a positive int"):
        make_routing(ids, 3, align=0)
    with pytest.raises(ValueError, match=r"out\[0\]: expected shape \(3,\)"):
        make_routing.launch(ids, 3, out=_poisoned(2, 2, 4, 1, device))


def test_validate_plan_finds_inconsistencies(device):
    ids = random_topk_ids(6, 2, 4, 0.2, device)
    plan = make_routing(ids, 4)
    validate_plan(plan)
    broken = plan._replace(row_to_token=plan.row_to_token.clone())
    broken.row_to_token[plan.slot_to_row[0, 0]] = 5
    with pytest.raises(ValueError, match="plan: row_to_token"):
        validate_plan(broken)
    broken = plan._replace(slot_to_row=plan.slot_to_row.flip(0).contiguous())
    with pytest.raises(ValueError, match="plan: "):
        validate_plan(broken)
    with pytest.raises(TypeError, match="plan: expected a RoutingPlan"):
        check_plan(plan.offsets)
    with pytest.raises(TypeError, match="plan.offsets: expected dtype int32"):
        check_plan(plan._replace(offsets=plan.offsets.long()))
    with pytest.raises(ValueError, match="plan.slot_to_row: expected 7 tokens"):
        check_plan(plan, num_tokens=7)


def test_fake_and_compile(device):
    ids = random_topk_ids(5, 3, 7, 0.2, device)
    torch.library.opcheck(torch.ops.moela.make_routing.default, (ids, 7, 2))
    compiled = torch.compile(lambda i: tuple(make_routing(i, 7, 2)), fullgraph=True, backend="aot_eager")
    _assert_same_plan(compiled(ids), reference.make_routing(ids, 7, 2))


# ----------------------------------------------------------------------------------------
# GPU tier: DeepSeek shapes (skipped without CUDA)
# ----------------------------------------------------------------------------------------


def _gpu_cases():
    try:
        from moela.profiling.shapes import DECODE_TOKENS, PREFILL_TOKENS, V2_LITE, V3
    except ImportError:
        from moela.reference import ModelArgs

        V3, V2_LITE = ModelArgs.from_name("deepseek-v3"), ModelArgs.from_name("deepseek-v2-lite")
        DECODE_TOKENS, PREFILL_TOKENS = (1, 4, 16, 64, 128, 256), (4096, 8192, 16384)
    out = []
    for args in (V3, V2_LITE):
        for T in (*DECODE_TOKENS, *PREFILL_TOKENS):
            for align in (1, 128):
                out.append((T, args.n_activated_experts, args.n_routed_experts, align))
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("T,k,E,align", _gpu_cases() if torch.cuda.is_available() else [])
def test_gpu_deepseek_shapes(T, k, E, align):
    for invalid in (0.0, 0.1):
        ids = random_topk_ids(T, k, E, invalid, "cuda")
        plan = make_routing(ids, E, align)
        _assert_same_plan(plan, reference.make_routing(ids, E, align))
        validate_plan(plan)


@pytest.mark.gpu
def test_gpu_no_host_sync_and_cuda_graph():
    for T in (64, 4096):  # both schedules
        ids = random_topk_ids(T, 8, 256, 0.05, "cuda")
        make_routing(ids, 256, 128)  # warm-up: autotuning syncs, once
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            make_routing(ids, 256, 128)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            plan = make_routing(ids, 256, 128)
        ids.copy_(random_topk_ids(T, 8, 256, 0.05, "cuda"))  # new ids, same graph
        graph.replay()
        _assert_same_plan(plan, reference.make_routing(ids, 256, 128))
