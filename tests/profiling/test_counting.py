"""FLOP and byte counts, derived throughput, fractions of the ceilings, speedups, timer statistics."""

from __future__ import annotations

import pytest
import torch

from moela.profiling import get_op
from moela.profiling.ops.mla_decode import ragged_lengths
from moela.profiling.runner import add_speedups, derive
from moela.profiling.shapes import Problem
from moela.profiling.timing import rotation_sets, summarize, time_cpu

CPU = torch.device("cpu")


def case_of(op_name: str, set_name: str, problem_name: str):
    op = get_op(op_name)
    p = next(p for p in op.problems(set_name) if p.name == problem_name)
    return op.make_case(p, CPU, 0)


def test_grouped_gemm_counts_only_experts_with_rows():
    c = case_of("grouped_gemm", "tiny", "empty groups [0,5,0,11] n=48 k=64")
    M, N, K = 16, 48, 64
    assert c.flops == 2 * M * N * K
    assert c.bytes == (M * K + 2 * N * K + M * N) * 2  # 2 of 4 experts have rows, bf16
    assert c.info["active_experts"] == 2


def test_grouped_gemm_backward_counts():
    """dX reads only the active experts' weights; dW writes every expert's gradient (zeros too)."""
    M, N, K, E = 16, 48, 64, 4
    dx = case_of("grouped_gemm_dx", "tiny", "empty groups [0,5,0,11] n=48 k=64")
    dw = case_of("grouped_gemm_dw", "tiny", "empty groups [0,5,0,11] n=48 k=64")
    assert dx.bytes == (M * N + 2 * N * K + M * K) * 2
    assert dw.bytes == (M * N + E * N * K + M * K) * 2
    assert dx.flops == dw.flops == 2 * M * N * K


def test_chunked_calc_diff_matches_calc_diff_and_counts_non_finite():
    from moela.profiling.ops._common import chunked_calc_diff
    from moela.reference import calc_diff

    x = torch.randn(1000, 37)
    y = x + 1e-3 * torch.randn_like(x)
    whole, bad = chunked_calc_diff(x, y, chunk=1 << 30)
    assert bad == 0 and whole == pytest.approx(calc_diff(x, y), rel=1e-9, abs=1e-15)
    assert chunked_calc_diff(x, y, chunk=777)[0] == pytest.approx(whole, rel=1e-9, abs=1e-15)
    y[3, 4], x[5, 6], x[7, 8] = float("nan"), float("inf"), float("nan")  # ref NaN: skipped; out inf/NaN: counted
    _, bad = chunked_calc_diff(x, y, chunk=100)
    assert bad == 2  # (close() fails on these before reading the diff)
    assert chunked_calc_diff(torch.zeros(5), torch.zeros(5)) == (0.0, 0)


def test_fp8_gemm_counts():
    c = case_of("fp8_gemm", "tiny", "m=16 n=128 k=256")
    assert c.flops == 2 * 16 * 128 * 256
    assert c.bytes == 16 * 256 + 128 * 256 + (16 * 2 + 1 * 2) * 4 + 16 * 128 * 2


def test_memory_bound_counts():
    q = case_of("quant_act", "tiny", "K=200 T=3")
    assert (q.flops, q.bytes) == (0.0, 3 * 200 * 2 + 3 * 200 + 3 * 2 * 4)
    p = case_of("permute", "tiny", "tiny T=8")
    M, D = 8 * 4, 64  # tiny config: k=4, dim=64
    assert p.bytes == (8 * D + M * D) * 2 + M * 4
    m = case_of("mla_decode", "tiny", "B=2 L=40 H=4 S=2")
    assert m.flops == 2 * 2 * 2 * 4 * 40 * (576 + 512)
    assert m.bytes == (2 * 40 * 576 + 2 * 2 * 4 * 576 + 2 * 2 * 4 * 512) * 2
    w = case_of("swiglu", "tiny", "N=96 T=3")  # 3 tokens × k=2 rows: both halves read, the product written
    assert (w.flops, w.bytes) == (0.0, 2 * 6 * 96 * 2 + 6 * 96 * 2)
    w8 = case_of("swiglu", "tiny", "N=256 T=3 fp8")  # e4m3 values and two scales per row written
    assert w8.bytes == 2 * 6 * 256 * 2 + 6 * 256 + 6 * 2 * 4
    r = case_of("mla_decode", "tiny", "B=3 L=48 H=2 S=2 ragged")  # the keys each sequence holds
    lens = r.inputs["cache_seqlens"].tolist()
    assert lens == ragged_lengths(3, 48, 2, 0) and all(2 <= n <= 48 for n in lens) and len(set(lens)) > 1
    assert r.flops == 2 * 2 * 2 * sum(lens) * (576 + 512)
    assert r.bytes == (sum(lens) * 576 + 3 * 2 * 2 * 576 + 3 * 2 * 2 * 512) * 2 + 3 * 4
    pg = case_of("mla_decode", "tiny", "B=2 L=128 H=2 S=1 paged")  # + the block table and lengths
    assert pg.bytes == (2 * 128 * 576 + 2 * 1 * 2 * 576 + 2 * 1 * 2 * 512) * 2 + 2 * 2 * 4 + 2 * 4
    f8 = case_of("mla_decode", "tiny", "B=2 L=128 H=2 S=2 paged fp8")  # FlashMLA's 656-byte rows
    assert f8.inputs["kv"].shape == (4, 64, 656) and f8.inputs["kv"].dtype == torch.float8_e4m3fn
    assert f8.bytes == 2 * 128 * 656 + (2 * 2 * 2 * 576 + 2 * 2 * 2 * 512) * 2 + 2 * 2 * 4 + 2 * 4
    assert f8.flops == 2 * 2 * 2 * 2 * 128 * (576 + 512)


CEILINGS = {"copy": {"value": 1000.0, "unit": "GB/s"}, "matmul_bf16": {"value": 500.0, "unit": "TFLOP/s"},
            "matmul_fp8": {"value": 1000.0, "unit": "TFLOP/s"}}


def test_derive_compute_bound_row():
    row = {"flops": 1e12, "bytes": 1e9, "median_ms": 4.0}
    derive(row, CEILINGS, "bf16")
    assert row["tflops"] == pytest.approx(250.0) and row["gbps"] == pytest.approx(250.0)
    assert row["frac_compute"] == pytest.approx(0.5) and row["frac_bandwidth"] == pytest.approx(0.25)
    assert row["roofline_ms"] == pytest.approx(2.0) and row["frac_roofline"] == pytest.approx(0.5)
    assert row["bound"] == "compute" and row["intensity"] == pytest.approx(1000.0)
    derive(row, CEILINGS, "fp8")
    assert row["compute_ceiling"] == "matmul_fp8" and row["frac_compute"] == pytest.approx(0.25)


def test_derive_memory_bound_row_without_flops():
    row = {"flops": 0.0, "bytes": 2e9, "median_ms": 4.0}
    derive(row, CEILINGS, "none")
    assert row["tflops"] is None and row["gbps"] == pytest.approx(500.0)
    assert row["bound"] == "memory" and row["frac_roofline"] == pytest.approx(0.5)
    bare = {"flops": 1.0, "bytes": 1.0, "median_ms": 1.0}
    derive(bare, {}, "bf16")  # no ceilings measured: throughput only
    assert bare["frac_compute"] is None and "frac_roofline" not in bare


def test_speedups_use_the_first_baseline_that_ran():
    rows = [{"impl": "moela", "median_ms": 1.0}, {"impl": "reference", "median_ms": 8.0},
            {"impl": "torch a", "median_ms": None}, {"impl": "torch b", "median_ms": 2.0}]
    add_speedups(rows, ("torch a", "torch b", "reference"))
    assert rows[0]["baseline"] == "torch b" and rows[0]["speedup"] == pytest.approx(2.0)
    assert rows[1]["speedup"] == pytest.approx(0.25) and "speedup" not in rows[2]


def test_summarize_quantiles():
    t = summarize([5.0, 1.0, 4.0, 2.0, 3.0], "cuda-events", rotation=3)
    assert (t.median_ms, t.min_ms, t.max_ms, t.mean_ms, t.reps) == (3.0, 1.0, 5.0, 3.0, 5)
    assert t.p20_ms == pytest.approx(1.8) and t.p80_ms == pytest.approx(4.2) and t.rotation == 3
    with pytest.raises(ValueError):
        summarize([], "cpu-wall")


def test_rotation_sets():
    l2 = 60 << 20
    assert rotation_sets(10 * l2, 10 * l2, l2) == 1  # far bigger than L2: no rotation
    assert rotation_sets(l2, l2, l2) == 3  # rotate until 3 L2s are touched
    assert rotation_sets(1e3, 1e3, l2) == 0  # would need too many sets: flush L2 instead
    assert rotation_sets(l2 // 2, 4 << 30, l2) == 0  # too much memory per set


def test_cpu_timer_labels_and_returns_first_output():
    calls = []
    timing, first = time_cpu([lambda: calls.append(1) or len(calls)], rep_ms=1, min_reps=3, max_reps=3)
    assert first == 1 and len(calls) == 4 and timing.reps == 3 and timing.method == "cpu-wall"
    t2, _ = time_cpu([lambda: None], rep_ms=1, min_reps=2, max_reps=2, interpreter=True)
    assert t2.method == "cpu-wall (triton interpreter)"


def test_problem_helpers():
    p = Problem("op", "s", "T=4", {"series": "a", "tokens": 4})
    assert (p.key, p.series, p.tokens) == ("op/s/T=4", "a", 4)
    assert Problem("op", "s", "x").tokens is None


def _moe_layer_bytes(c, backward=False):
    """Hand count: active experts' w1/w2/w3 (+ 128x128 scales), shared experts, router; x, y (dy, dx)."""
    from moela.reference import gate

    layer, x = c.inputs["layer"], c.inputs["x"]
    a = layer.args
    D, I, E = a.dim, a.moe_inter_dim, a.n_routed_experts
    active = gate(x, layer.gate.weight, layer.gate.bias, a)[1].unique().numel()
    assert c.info["active_experts"] == active  # the experts the layer's own gate picks for x
    if layer.fp8:  # e4m3 values, one float32 scale per 128x128 block: (2I/128)(D/128) + (D/128)(I/128)
        expert = 3 * D * I + 3 * (D // 128) * (I // 128) * 4
    else:
        expert = 3 * D * I * 2
    shared = expert * a.n_shared_experts
    weights = active * expert + shared + E * D * 2
    T = x.shape[0]
    return weights * (2 if backward else 1) + E * 4 + (4 if backward else 2) * T * D * 2


def test_moe_layer_counts():
    c = case_of("moe_layer", "tiny", "tiny T=4")
    T, D, I, E, k = 4, 64, 32, 16, 4  # tiny: one shared expert of width I
    assert c.flops == 2 * T * (3 * k * D * I + 3 * D * I + D * E)
    assert c.bytes == _moe_layer_bytes(c)
    b = case_of("moe_layer_fwd_bwd", "tiny", "tiny backward=True T=4")
    assert b.flops == 3 * c.flops
    assert b.bytes == _moe_layer_bytes(b, backward=True)  # + weight gradients written, dy read, dx written
    f = case_of("moe_layer_fp8", "tiny", "tiny-128 T=4")
    assert f.inputs["layer"].w13.element_size() == 1
    assert f.bytes == _moe_layer_bytes(f)  # FP8 experts: 1 byte per weight, not bf16's 2


def test_mla_layer_counts_the_causal_pairs():
    for name, mode, B, S, keys in (("tiny prefill S=8", "prefill", 1, 8, None), ("tiny decode B=2 L=12", "decode", 2,
                                                                                   1, 13)):
        c = case_of("mla_layer", "tiny", name)
        a = c.inputs["args"]
        H, C, R = a.n_heads, a.kv_lora_rank, a.qk_rope_head_dim
        proj = 2 * B * S * sum(v.numel() for k, v in c.inputs["state"].items() if k.endswith("weight") and v.ndim == 2)
        pairs = S * (S + 1) // 2 if mode == "prefill" else S * keys  # query i of a prefill sees keys 0..i
        assert c.flops == proj + 2 * B * H * pairs * (2 * C + R), name


def test_moe_layer_truth_routes_with_the_layers_float32_bias():
    """The reference loop (the truth) must select with the layer's float32 bias, not a bf16 copy."""
    from moela.model import MoE

    op = get_op("moe_layer")
    c = case_of("moe_layer", "tiny", "tiny T=4")
    layer, x = c.inputs["layer"], c.inputs["x"]
    with torch.no_grad():
        layer.gate.weight.zero_()  # equal scores: the bias alone decides
        layer.gate.bias.copy_(1 + torch.arange(16) * 2.0**-12)  # distinct in float32, all 1.0 in bf16
    truth = op.impl(op.truth).prepare(c)()
    same = MoE(layer.args.replace(backend="reference")).to(torch.bfloat16)
    same.load_state_dict(layer.state_dict())
    with torch.no_grad():
        assert op.compare(truth, same(x)).ok


def test_moe_layer_fwd_bwd_timed_call_does_not_accumulate_gradients():
    """Each timed call is one forward + backward: the parameters' gradients of a call are that
    call's, not the sum over the calls before it (an extra pass over every expert's gradient)."""
    op = get_op("moe_layer_fwd_bwd")
    c = case_of("moe_layer_fwd_bwd", "tiny", "tiny backward=True T=4")
    layer = c.inputs["layer"]
    layer.args = layer.gate.args = layer.args.replace(backend="reference")  # what is timed, not the kernels
    fn = op.impl("moela").prepare(c)
    y, dx = fn()
    once = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    assert {"w13", "w2", "gate.weight"} <= set(once)
    y2, dx2 = fn()
    assert torch.equal(y2, y) and torch.equal(dx2, dx)
    for n, g in once.items():
        assert torch.equal(layer.get_parameter(n).grad, g), n


def test_ceiling_keeps_the_best_of_its_attempts():
    from moela.profiling import ceilings

    runs = iter([{"value": 1.0, "median_ms": 2.0}, {"value": 3.0, "median_ms": 1.0}, {"value": 2.0, "median_ms": 1.5}])
    best = ceilings._best(lambda: next(runs), 3)
    assert best["value"] == 3.0 and best["median_ms"] == 1.0 and best["attempts"] == [1.0, 3.0, 2.0]
    calls = []
    assert ceilings._best(lambda: calls.append(1) or {"skipped": "no FP8"}, 3) == {"skipped": "no FP8"}
    assert len(calls) == 1  # a skipped ceiling is not retried
