"""The op and shapes registries: every op of the contract, sets non-empty, DeepSeek shapes,
inputs built on the CPU, kernels resolved lazily."""

from __future__ import annotations

import pytest
import torch

import moela.kernels
from moela.profiling import NOT_IMPLEMENTED, Unavailable, all_ops, get_op, shapes
from moela.profiling.registry import expand_sets, make_plan, resolve_kernel

CONTRACT = ("route", "gate", "make_routing", "permute", "unpermute", "grouped_gemm", "quant_act", "quant_weight",
            "dequant", "fp8_gemm", "fp8_grouped_gemm", "fp8_grouped_gemm_masked")


def test_every_contract_op_is_registered():
    ops = all_ops()
    assert set(CONTRACT) <= set(ops)
    for name in CONTRACT:
        assert ops[name].kernel == name  # moela.kernels.<name>


@pytest.mark.parametrize("name", list(all_ops()))
def test_op_sets_are_non_empty_and_named_uniquely(name):
    op = get_op(name)
    for s in shapes.STANDARD_SETS:
        assert op.problems(s), s
    assert op.full_sets(), "an op needs at least one op-specific set for `full`"
    for s, problems in op.shape_sets.items():
        assert len({p.name for p in problems}) == len(problems)
        assert all(p.op == name and p.set == s for p in problems)
    names = [i.name for i in op.impls()]
    assert names[:2] == ["moela", "reference"] and op.truth in names


@pytest.mark.parametrize("name", list(all_ops()))
def test_tiny_inputs_build_on_cpu_random_and_counted(name):
    op = get_op(name)
    for p in op.problems("tiny"):
        case = op.make_case(p, torch.device("cpu"), seed=0)
        assert case.bytes > 0 and case.flops >= 0
        tensors = {k: v for k, v in case.inputs.items() if isinstance(v, torch.Tensor)}
        assert tensors
        for t in tensors.values():  # (packed 8-bit rows such as FlashMLA's FP8 cache: as bytes)
            data = t.view(torch.uint8) if t.is_floating_point() and t.element_size() == 1 else t
            assert data.float().abs().sum() > 0, "never time on zeros"
        floats = [k for k, v in tensors.items() if v.is_floating_point()]
        if floats:  # random data follows the seed (routing ids follow the problem)
            again = op.make_case(p, torch.device("cpu"), seed=0).inputs[floats[0]]
            other = op.make_case(p, torch.device("cpu"), seed=1).inputs[floats[0]]
            assert torch.equal(tensors[floats[0]].float(), again.float())
            assert not torch.equal(tensors[floats[0]].float(), other.float())


def test_deepseek_shapes():
    v3 = shapes.moe_dims(shapes.V3, "v3")
    assert (v3.dim, v3.inter, v3.experts, v3.topk) == (7168, 2048, 256, 8)
    assert shapes.expert_gemms(v3) == (("up", 4096, 7168), ("down", 7168, 2048))
    v2 = shapes.moe_dims(shapes.V2_LITE, "v2lite")
    assert (v2.dim, v2.inter, v2.experts, v2.topk) == (2048, 1408, 64, 6)
    dense = get_op("fp8_gemm").problems("deepgemm-dense")
    assert len(dense) == 18 and {(p.params["n"], p.params["k"]) for p in dense} >= {(2112, 7168), (7168, 16384)}
    grouped = get_op("grouped_gemm").problems("deepgemm-grouped")
    assert [p.params["group_rows"] for p in grouped] == [[8192] * 4, [4096] * 8, [256] * 4]
    mla = get_op("mla_decode").problems("flashmla-decode")
    assert len(mla) == 16 and {p.params["heads"] for p in mla} == {16, 32, 64, 128}
    tokens = {p.tokens for p in get_op("grouped_gemm").problems("v3-decode")}
    assert min(tokens) == 1 and max(tokens) == 256
    assert {p.tokens for p in get_op("grouped_gemm").problems("v3-prefill")} == {4096, 8192, 16384}


def test_routing_draws_are_deterministic_distinct_and_skewed():
    ids = shapes.routing_ids(512, 64, 6, "balanced")
    assert ids.dtype == torch.int32 and ids.shape == (512, 6)
    assert torch.equal(ids, shapes.routing_ids(512, 64, 6, "balanced"))
    assert all(len(set(row)) == 6 for row in ids.tolist())  # k distinct experts per token
    balanced = shapes.group_sizes(ids, 64)
    zipf = shapes.group_sizes(shapes.routing_ids(512, 64, 6, "zipf"), 64)
    assert sum(balanced) == sum(zipf) == 512 * 6
    assert max(zipf) > 2 * max(balanced)  # a few hot experts
    with pytest.raises(ValueError, match="load"):
        shapes.expert_probabilities(8, "uniformish")


def test_expand_sets_and_plan_order():
    op = get_op("grouped_gemm")
    assert "tiny" not in expand_sets(op, ["full"]) and "v3-decode" in expand_sets(op, ["full"])
    assert expand_sets(get_op("quant_weight"), ["v3-decode"]) == []
    plan = make_plan([get_op("fp8_gemm"), get_op("grouped_gemm")], ["full"])
    sets = [p.set for _, p in plan]
    assert sets.index("deepgemm-dense") < sets.index("v3-decode") < sets.index("v2lite-prefill")


def test_interleaved_plan_gives_every_op_its_first_problems():
    ops = [get_op("fp8_gemm"), get_op("grouped_gemm"), get_op("quant_weight")]
    plan = make_plan(ops, ["full"])
    mixed = make_plan(ops, ["full"], interleave=True)
    assert sorted(map(id, (p for _, p in plan))) == sorted(map(id, (p for _, p in mixed)))  # same problems
    for op in ops:  # each op's own order is kept
        assert [p for o, p in mixed if o is op] == [p for o, p in plan if o is op]
    assert [o.name for o, _ in mixed[:6]] == ["fp8_gemm", "grouped_gemm", "quant_weight"] * 2
    # the first 3 * 5 problems hold all five of quant_weight's: a budget cuts none of them
    assert sum(o.name == "quant_weight" for o, _ in mixed[:15]) == 5
    assert sum(o.name == "quant_weight" for o, _ in plan[:15]) == 0


def test_missing_kernel_is_a_skip_and_a_present_one_resolves(monkeypatch, fake_op):
    with pytest.raises(Unavailable, match=NOT_IMPLEMENTED):
        resolve_kernel("zz_no_such_op")
    fn = lambda x: x
    monkeypatch.setattr(moela.kernels, "zz_present", fn, raising=False)
    assert resolve_kernel("zz_present") is fn
    assert fake_op(kernel="zz_present").resolve_kernel() is fn


def test_op_definition_errors(fake_op):
    op = fake_op()
    with pytest.raises(ValueError, match="missing"):
        type(op)(**{**op.__dict__, "shape_sets": {"tiny": op.shape_sets["tiny"]}})
    with pytest.raises(ValueError, match="empty"):
        type(op)(**{**op.__dict__, "shape_sets": {**op.shape_sets, "quick": []}})
    with pytest.raises(ValueError, match="truth"):
        type(op)(**{**op.__dict__, "truth": "nobody"})
    with pytest.raises(KeyError, match="no shape set"):
        op.problems("nope")


def test_the_gpu_script_reads_its_ops_from_the_registry(capsys):
    """profiling/gpu_run.sh takes its default op list and warm-up groups from ``list --names`` and
    ``list --warm-groups``: every op benchmarked, every op warmed exactly once."""
    from pathlib import Path

    import moela.profiling
    from moela.profiling.cli import main
    from moela.profiling.registry import warm_groups

    script = (Path(moela.profiling.__file__).parent / "gpu_run.sh").read_text()
    assert "list --names" in script and "list --warm-groups" in script
    ops = list(all_ops())
    assert main(["list", "--names"]) == 0
    assert capsys.readouterr().out.split() == ops
    groups = warm_groups()
    assert sorted(n for g in groups for n in g) == sorted(ops)
    assert main(["list", "--warm-groups"]) == 0
    assert [line.split() for line in capsys.readouterr().out.strip().splitlines()] == groups
