"""Bad input to every public op: each kernel of ``moela.kernels`` and its twin in ``moela.reference``.

One table (``CASES``) drives one parametrized test. Each op has an :class:`OpSpec`: a function
building a valid call at tiny shapes and the kinds of its arguments; from it the generic rows
are made (wrong dtype, rank, type and device of every tensor, meta and fake-CUDA tensors,
transposed / strided / stride-0 views, bool/float/str where ints are expected, non-finite
floats, unknown choices and dtypes). The hand-written rows follow: out-of-range ids, offsets,
plans and lengths in int32 and int64, NaN/inf, zero sizes, blocks and ``align`` above what a
Triton tensor holds, ``out=`` buffers. A new op adds an OpSpec and its rows, not code.

Agreement (see ``COMPARE``): bitwise for the ops whose kernel is bitwise (routing plan, permute,
unpermute, quantizers, dequant), the derived tolerance of ``moela_testing.assert_close_derived``
(NaN/inf positions equal) for the GEMMs in 16-bit, swiglu and mla_decode, the FP8 GEMM bound of
``fp8_testing``, and test_gate's rule for the routing weights. Rows marked ``isolate`` (indices
far out of bounds, which used to kill the process) run together in one subprocess.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from bad_input_testing import (
    Case,
    Computes,
    KernelDomain,
    MetaShapes,
    Raises,
    assert_fp8_linear_close,
    assert_same_numbers,
    case_id,
    changed,
    expanded,
    flat_tensors,
    map_plan,
    run_case,
    run_isolated,
    strided,
    transposed,
)
from fp8_testing import abs_fp8, assert_gemm_close, assert_same_bits
from moela_testing import nan_empty

import moela.kernels as K
import moela.reference as R
from moela.reference import FP8_DTYPE, ModelArgs

# NaN/inf inputs make numpy (the interpreter's arithmetic) warn; the rows check the results
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:overflow encountered:RuntimeWarning")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BF = torch.bfloat16
I32, I64 = torch.int32, torch.int64
NAN, INF = float("nan"), float("inf")
PUBLIC_OPS = sorted(set(K.__all__) - {"registered_ops"})


def _t(values, dtype=I32):
    return torch.tensor(values, dtype=dtype, device=DEV)


def _randn(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, device=DEV) * scale).to(dtype)


# --------------------------------------------------------------------------- valid calls
ARGS = ModelArgs.from_name("tiny", dim=16, n_routed_experts=8, n_activated_experts=2, n_expert_groups=4,
                           n_limited_groups=2)
IDS = [[0, 3], [1, -1], [3, 2], [0, 1], [2, 2]]  # T = 5, k = 2, E = 4 (one remote slot, one repeated expert)


def _plan(align=2):
    return R.make_routing(_t(IDS), 4, align=align)


def _route():
    return dict(logits=_randn(5, 8), bias=_randn(8, scale=0.1), topk=2, n_groups=4, topk_groups=2,
                score_func="sigmoid", route_scale=2.5)


def _gate():
    return dict(x=_randn(5, 16), weight=_randn(8, 16, scale=0.25), bias=_randn(8, scale=0.1), args=ARGS)


def _grouped_gemm():
    return dict(xs=_randn(10, 16, dtype=BF), w=_randn(3, 8, 16, dtype=BF, scale=0.25), offsets=_t([4, 4, 9]))


def _grouped_gemm_dw():
    return dict(xs=_randn(10, 16, dtype=BF), dy=_randn(10, 8, dtype=BF), offsets=_t([4, 4, 9]))


def _grouped_gemm_masked():
    return dict(x=_randn(3, 4, 16, dtype=BF), w=_randn(3, 8, 16, dtype=BF, scale=0.25), masked_m=_t([4, 0, 2]))


def _make_routing():
    return dict(topk_ids=_t(IDS), n_experts=4, align=2)


def _permute():
    return dict(x=_randn(5, 8, dtype=BF), plan=_plan())


def _permute_fp8():
    return dict(_permute(), x=_randn(5, 256, dtype=BF), fp8=True, block=128)


def _unpermute():
    plan = _plan()
    return dict(ys=_randn(plan.max_rows, 8, dtype=BF), plan=plan, topk_weights=torch.rand(5, 2, device=DEV))


def _quant_act():
    return dict(x=_randn(3, 256, dtype=BF), block=128)


def _quant_weight():
    return dict(w=_randn(130, 128, dtype=BF), block=128)


def _dequant():
    x, s = R.quant_weight(_randn(130, 128))
    return dict(x=x, scale=s, block=128, out_dtype=BF)


def _fp8_gemm():
    a, a_s = R.quant_act(_randn(3, 256))
    b, b_s = R.quant_weight(_randn(8, 256, scale=1 / 16))
    return dict(a=a, a_s=a_s, b=b, b_s=b_s, out_dtype=BF, block=128)


def _fp8_grouped_gemm():
    xs, xs_s = R.quant_act(_randn(6, 128))
    w, w_s = R.quant_weight(_randn(3, 8, 128, scale=1 / 16))
    return dict(xs=xs, xs_s=xs_s, w=w, w_s=w_s, offsets=_t([2, 2, 5]), out_dtype=BF, block=128)


def _fp8_grouped_gemm_masked():
    x, x_s = R.quant_act(_randn(3, 4, 128))
    w, w_s = R.quant_weight(_randn(3, 8, 128, scale=1 / 16))
    return dict(x=x, x_s=x_s, w=w, w_s=w_s, masked_m=_t([4, 0, 2]), out_dtype=BF, block=128)


def _quant_act_t():
    return dict(x=_randn(130, 96, dtype=BF), block=128)


def _fp8_dgrad():
    dy, dy_s = R.quant_act(_randn(3, 256))
    w, w_s = R.quant_weight(_randn(256, 8, scale=1 / 16))
    return dict(dy=dy, dy_s=dy_s, w=w, w_s=w_s, out_dtype=BF, block=128)


def _fp8_grouped_dgrad():
    dy, dy_s = R.quant_act(_randn(6, 256))
    w, w_s = R.quant_weight(_randn(3, 256, 8, scale=1 / 16))
    return dict(dy=dy, dy_s=dy_s, w=w, w_s=w_s, offsets=_t([2, 2, 5]), out_dtype=BF, block=128)


def _fp8_wgrad():
    dy_t, dy_t_s = R.quant_act_t(_randn(130, 8))
    x_t, x_t_s = R.quant_act_t(_randn(130, 16))
    return dict(dy_t=dy_t, dy_t_s=dy_t_s, x_t=x_t, x_t_s=x_t_s, out_dtype=torch.float32, block=128)


def _fp8_grouped_wgrad():
    dy_t, dy_t_s = R.quant_act_t(_randn(10, 8))
    x_t, x_t_s = R.quant_act_t(_randn(10, 16))
    return dict(dy_t=dy_t, dy_t_s=dy_t_s, x_t=x_t, x_t_s=x_t_s, offsets=_t([4, 4, 9]), out_dtype=torch.float32,
                block=128)


def _fp8_linear():
    w, w_s = R.quant_weight(_randn(8, 256, scale=1 / 16))
    return dict(x=_randn(3, 256, dtype=BF), weight=w, weight_scale_inv=w_s, bias=_randn(8, dtype=BF))


def _mla_decode():
    return dict(q=_randn(2, 1, 2, 40, dtype=BF), kv=_randn(2, 6, 40, dtype=BF), softmax_scale=0.2, v_dim=32,
                cache_seqlens=_t([3, 6]))


def _swiglu():
    return dict(gate=_randn(5, 8, dtype=BF), up=_randn(5, 8, dtype=BF))


def _swiglu_fp8():
    return dict(gate=_randn(5, 256, dtype=BF), up=_randn(5, 256, dtype=BF), fp8=True, block=128)


@dataclass(frozen=True)
class OpSpec:
    """An op's valid call and its arguments' kinds: what the generic rows are made from.

    tensors: name -> "float" | "int" | "fp8" | "f32" (float32 only) | "plan"; the first is the
    tensor whose device the others must share. fixed_rank: tensors of one rank (a leading dim
    added is an error naming them). ints / floats / bools / choices / dtypes: the Python
    parameters, checked as positive ints, finite floats, bools, one of a set, torch dtypes.
    """

    build: Callable[[], dict]
    tensors: dict[str, str]
    fixed_rank: tuple[str, ...] = ()
    ints: tuple[str, ...] = ()
    floats: tuple[str, ...] = ()
    bools: tuple[str, ...] = ()
    choices: tuple[str, ...] = ()
    dtypes: tuple[str, ...] = ()
    fp8_build: Callable[[], dict] | None = None  # the call whose block / scale_fmt are read (fp8=True)
    ref_reads_values: str | None = None  # what the reference names on meta tensors (it reads values)
    view_bitwise: bool = True  # a view gives the bits of contiguous inputs (not gate: torch's matmul first)


SPECS: dict[str, OpSpec] = {
    "route": OpSpec(_route, {"logits": "float", "bias": "float"}, ("logits", "bias"),
                    ints=("topk", "n_groups", "topk_groups"), floats=("route_scale",), choices=("score_func",)),
    "gate": OpSpec(_gate, {"x": "float", "weight": "float", "bias": "float"}, ("x", "weight", "bias"),
                   view_bitwise=False),
    "grouped_gemm": OpSpec(_grouped_gemm, {"xs": "float", "w": "float", "offsets": "int"}, ("xs", "w", "offsets"),
                           bools=("validate",), ref_reads_values="offsets"),
    "grouped_gemm_dw": OpSpec(_grouped_gemm_dw, {"xs": "float", "dy": "float", "offsets": "int"},
                              ("xs", "dy", "offsets"), ref_reads_values="offsets"),
    "grouped_gemm_masked": OpSpec(_grouped_gemm_masked, {"x": "float", "w": "float", "masked_m": "int"},
                                  ("x", "w", "masked_m"), bools=("validate",), ref_reads_values="masked_m"),
    "make_routing": OpSpec(_make_routing, {"topk_ids": "int"}, ("topk_ids",), ints=("n_experts", "align"),
                           bools=("validate",), ref_reads_values="topk_ids"),
    "permute": OpSpec(_permute, {"x": "float", "plan": "plan"}, ("x", "plan"), ints=("block",),
                      bools=("validate", "fp8"), choices=("scale_fmt",), fp8_build=_permute_fp8),
    "unpermute": OpSpec(_unpermute, {"ys": "float", "plan": "plan", "topk_weights": "float"},
                        ("ys", "plan", "topk_weights"), bools=("validate",)),
    "quant_act": OpSpec(_quant_act, {"x": "float"}, ints=("block",), choices=("scale_fmt",)),
    "quant_weight": OpSpec(_quant_weight, {"w": "float"}, ints=("block",), choices=("scale_fmt",)),
    "dequant": OpSpec(_dequant, {"x": "fp8", "scale": "f32"}, ("scale",), ints=("block",), dtypes=("out_dtype",)),
    "fp8_gemm": OpSpec(_fp8_gemm, {"a": "fp8", "a_s": "f32", "b": "fp8", "b_s": "f32"}, ("a", "a_s", "b", "b_s"),
                       ints=("block",), dtypes=("out_dtype",)),
    "fp8_grouped_gemm": OpSpec(_fp8_grouped_gemm, {"xs": "fp8", "xs_s": "f32", "w": "fp8", "w_s": "f32",
                                                   "offsets": "int"}, ("xs", "xs_s", "w", "w_s", "offsets"),
                               ints=("block",), bools=("validate",), dtypes=("out_dtype",),
                               ref_reads_values="offsets"),
    "fp8_grouped_gemm_masked": OpSpec(_fp8_grouped_gemm_masked, {"x": "fp8", "x_s": "f32", "w": "fp8", "w_s": "f32",
                                                                 "masked_m": "int"},
                                      ("x", "x_s", "w", "w_s", "masked_m"), ints=("block",), bools=("validate",),
                                      dtypes=("out_dtype",), ref_reads_values="masked_m"),
    "fp8_linear": OpSpec(_fp8_linear, {"x": "float", "weight": "fp8", "weight_scale_inv": "f32", "bias": "float"},
                         ("weight", "weight_scale_inv", "bias"), ints=("block",), choices=("scale_fmt",)),
    "mla_decode": OpSpec(_mla_decode, {"q": "float", "kv": "float", "cache_seqlens": "int"},
                         ("q", "kv", "cache_seqlens"), floats=("softmax_scale",), ints=("v_dim",),
                         bools=("validate",)),
    "swiglu": OpSpec(_swiglu, {"gate": "float", "up": "float"}, ("up",), ints=("block",), bools=("fp8",),
                     choices=("scale_fmt",), fp8_build=_swiglu_fp8),
    "quant_act_t": OpSpec(_quant_act_t, {"x": "float"}, ("x",), ints=("block",), choices=("scale_fmt",)),
    "quant_act_dual": OpSpec(_quant_act_t, {"x": "float"}, ("x",), ints=("block",), choices=("scale_fmt",)),
    "fp8_dgrad": OpSpec(_fp8_dgrad, {"dy": "fp8", "dy_s": "f32", "w": "fp8", "w_s": "f32"}, ("dy", "dy_s", "w", "w_s"),
                        ints=("block",), dtypes=("out_dtype",)),
    "fp8_grouped_dgrad": OpSpec(_fp8_grouped_dgrad, {"dy": "fp8", "dy_s": "f32", "w": "fp8", "w_s": "f32",
                                                     "offsets": "int"}, ("dy", "dy_s", "w", "w_s", "offsets"),
                                ints=("block",), bools=("validate",), dtypes=("out_dtype",),
                                ref_reads_values="offsets"),
    "fp8_wgrad": OpSpec(_fp8_wgrad, {"dy_t": "fp8", "dy_t_s": "f32", "x_t": "fp8", "x_t_s": "f32"},
                        ("dy_t", "dy_t_s", "x_t", "x_t_s"), ints=("block",), dtypes=("out_dtype",)),
    "fp8_grouped_wgrad": OpSpec(_fp8_grouped_wgrad, {"dy_t": "fp8", "dy_t_s": "f32", "x_t": "fp8", "x_t_s": "f32",
                                                     "offsets": "int"}, ("dy_t", "dy_t_s", "x_t", "x_t_s", "offsets"),
                                ints=("block",), bools=("validate",), dtypes=("out_dtype",),
                                ref_reads_values="offsets"),
}


# --------------------------------------------------------------------------- input transforms
def _wrong_dtype(t, kind):
    return {"float": t.to(I32), "int": t.float(), "fp8": t.float(), "f32": t.double()}[kind]


def _to(t, device):
    if isinstance(t, torch.Tensor):
        return t.to(device)
    if isinstance(t, R.RoutingPlan):
        return map_plan(t, lambda x: x.to(device))
    return t


#: Ops whose launch takes contiguous out= buffers only (the others take any non-overlapping strides).
CONTIGUOUS_OUT = {"make_routing", "route"}


# --------------------------------------------------------------------------- generated rows
def _generated(op: str, spec: OpSpec) -> list[Case]:
    rows = []

    def add(what, build, expect, category, **kw):
        rows.append(Case(op, what, build, expect, category=category, **kw))

    names = list(spec.tensors)
    first = names[0]
    for name, kind in spec.tensors.items():
        if kind == "plan":
            add(f"{name}-not-a-plan", changed(spec.build, **{name: lambda i: list(i["plan"][:3])}),
                Raises(TypeError, "plan"), "type")
            add(f"{name}-int64", changed(spec.build, plan=lambda i: map_plan(i["plan"], lambda t: t.long())),
                Raises(TypeError, "plan.offsets"), "dtype")
            add(f"{name}-rank", changed(spec.build, plan=lambda i: i["plan"]._replace(
                slot_to_row=i["plan"].slot_to_row.reshape(-1))), Raises(ValueError, "plan.slot_to_row"), "rank")
            add(f"{name}-meta", changed(spec.build, plan=lambda i: i["plan"]._replace(
                slot_to_row=i["plan"].slot_to_row.to("meta"))), Raises(ValueError, "plan.slot_to_row"), "device")
            add(f"{name}-strided", changed(spec.build, plan=lambda i: map_plan(i["plan"], strided)),
                Computes(_same_as_contiguous(op, spec.view_bitwise)), "view")
            continue
        add(f"{name}-dtype", changed(spec.build, **{name: lambda i, n=name, k=kind: _wrong_dtype(i[n], k)}),
            Raises(TypeError, name), "dtype")
        add(f"{name}-list", changed(spec.build, **{name: lambda i, n=name: i[n].float().tolist()}),
            Raises(TypeError, name), "type")
        if name in spec.fixed_rank:
            add(f"{name}-rank", changed(spec.build, **{name: lambda i, n=name: i[n][None]}),
                Raises(ValueError, name), "rank")
        if name != first:
            add(f"{name}-meta", changed(spec.build, **{name: lambda i, n=name: i[n].to("meta")}),
                Raises(ValueError, name), "device")
        for view in (transposed, strided, expanded):
            add(f"{name}-{view.__name__.strip('_')}", changed(spec.build, **{name: lambda i, n=name, v=view: v(i[n])}),
                Computes(_same_as_contiguous(op, spec.view_bitwise)), "view")
    add("all-meta", spec.build, MetaShapes(spec.ref_reads_values), "device",
        transform=lambda i: {k: _to(v, "meta") for k, v in i.items()})
    if len(names) > 1:
        second = names[1]
        expect = Raises(ValueError, "plan.tokens_per_expert" if spec.tensors[second] == "plan" else second)
        add("fake-cuda-mixed", spec.build, expect, "device", fake_cuda=(first,))
    add("fake-cuda", spec.build, MetaShapes(None), "device", sides=("kernel",), fake_cuda=tuple(names))

    if hasattr(getattr(K, op), "launch"):  # out= buffers (the registered ops' launch)
        def buffers(change=None, min_ndim=0):
            """NaN-filled buffers of the reference's outputs; ``change`` applied to the first of
            at least ``min_ndim`` dims."""
            def make(i):
                bufs = [nan_empty(t.shape, t.dtype, DEV) for t in flat_tensors(getattr(R, op)(**i))]
                if change is not None:
                    j = next(j for j, b in enumerate(bufs) if b.ndim >= min_ndim)
                    bufs[j] = change(bufs[j])
                return bufs[0] if isinstance(getattr(R, op)(**i), torch.Tensor) else tuple(bufs)
            return make

        tuple_out = not isinstance(getattr(R, op)(**spec.build()), torch.Tensor)
        first_out = "out[0]" if tuple_out else "out"
        rows.append(Case(op, "out-nan-filled", changed(spec.build, out=buffers()), Computes(), sides=("kernel",),
                         launch=True, category="out"))
        rows.append(Case(op, "out-stride-0", changed(spec.build, out=buffers(lambda b: b[:1].expand(b.shape))),
                         Raises(ValueError, first_out), sides=("kernel",), launch=True, category="out"))
        rows.append(Case(op, "out-dtype", changed(spec.build, out=buffers(
            lambda b: b.to(I32 if b.is_floating_point() else torch.float32))), Raises(TypeError, first_out),
            sides=("kernel",), launch=True, category="out"))
        for view, min_ndim in ((transposed, 2), (strided, 1)):
            rows.append(Case(op, f"out-{view.__name__}", changed(spec.build, out=buffers(view, min_ndim)),
                             Raises(ValueError, "out") if op in CONTIGUOUS_OUT else Computes(), sides=("kernel",),
                             launch=True, category="out"))

    fp8_build = spec.fp8_build or spec.build
    for p in spec.ints:
        build = fp8_build if p in ("block",) else spec.build
        minimum = 1
        for bad, err in ((True, TypeError), (2.0, TypeError), ("2", TypeError), (torch.tensor(2), TypeError),
                         (minimum - 1, ValueError), (-1, ValueError)):
            add(f"{p}={bad!r}", changed(build, **{p: bad}), Raises(err, p), "python-int")
    for p in spec.floats:
        for bad, err in (("0.5", TypeError), (True, TypeError), (NAN, ValueError), (INF, ValueError),
                         (-INF, ValueError)):
            add(f"{p}={bad!r}", changed(spec.build, **{p: bad}), Raises(err, p), "python-float")
    for p in spec.bools:
        for bad in (1, "yes", None):
            add(f"{p}={bad!r}", changed(spec.build, **{p: bad}), Raises(TypeError, p), "python-bool")
    for p in spec.choices:
        build = fp8_build if p == "scale_fmt" else spec.build
        for bad in ("e8m0" if p == "scale_fmt" else "relu", 1, "UE8M0" if p == "scale_fmt" else "Sigmoid"):
            add(f"{p}={bad!r}", changed(build, **{p: bad}), Raises(ValueError, p), "python-choice")
    for p in spec.dtypes:
        for bad in (torch.int32, "bfloat16", FP8_DTYPE):
            add(f"{p}={bad!r}", changed(spec.build, **{p: bad}), Raises(TypeError, p), "python-dtype")
    return rows


# --------------------------------------------------------------------------- documented results
def _same_as_contiguous(op: str, bitwise: bool = True):
    """Doc of a view: the kernel gives the bits it gives for contiguous copies of the inputs (or,
    where torch computes something first, agrees with that result as with the reference)."""
    def doc(out, inputs):
        dense = {k: (v.contiguous() if isinstance(v, torch.Tensor) else
                     map_plan(v, torch.Tensor.contiguous) if isinstance(v, R.RoutingPlan) else v)
                 for k, v in inputs.items()}
        (_bitwise if bitwise else COMPARE[op])(out, getattr(K, op)(**dense), dense)
    return doc


def _same_bits(a, b) -> None:
    for x, y in zip(flat_tensors(a), flat_tensors(b), strict=True):
        assert_same_bits(x, y)


def _clamped_offsets(offsets: torch.Tensor, M: int) -> torch.Tensor:
    return offsets.long().clamp(0, M).cummax(0).values.to(offsets.dtype if offsets.dtype == I64 else I32)


#: Grouped ops whose rows (the offsets' range) are a tensor's dim 1, and ops whose output has no rows
#: of the groups (weight gradients).
ROWS_DIM = {"fp8_grouped_wgrad": 1}
NO_ROW_OUTPUT = {"grouped_gemm_dw", "fp8_grouped_wgrad"}


def _offsets_rule(op: str, rows_arg: str):
    """Malformed offsets compute as the clamped, running-max ends would; rows past the end are 0."""
    def doc(out, inputs):
        M = inputs[rows_arg].shape[ROWS_DIM.get(op, 0)]
        ends = _clamped_offsets(inputs["offsets"], M)
        _same_bits(out, getattr(K, op)(**dict(inputs, offsets=ends)))
        if op not in NO_ROW_OUTPUT and ends.numel():
            assert not out[int(ends[-1]):].float().any(), "rows past the last clamped end must be zero"
    return doc


def _ids_rule(out, inputs):
    """Ids outside [0, E) are skipped: the plan of the same ids with those set to -1."""
    ids, E = inputs["topk_ids"], inputs["n_experts"]
    clean = torch.where((ids >= 0) & (ids < E), ids, -1).to(I32)
    _same_bits(out, K.make_routing(clean, E, inputs.get("align", 1)))


def _permute_rule(out, inputs):
    """Row r holds x[s // k] when s = row_to_slot[r] is a slot whose slot_to_row[s] is r, else 0."""
    x, plan = inputs["x"], inputs["plan"]
    T, k = plan.slot_to_row.shape
    s2r, r2s = plan.slot_to_row.reshape(-1).tolist(), plan.row_to_slot.tolist()
    for r, s in enumerate(r2s):
        want = x[s // k] if 0 <= s < T * k and s2r[s] == r else torch.zeros_like(x[0])
        assert_same_bits(out[r], want, f"row {r} (row_to_slot {s})")


def _unpermute_rule(out, inputs):
    """y[t] = Σ_j w[t, j]·ys[slot_to_row[t, j]] over the slots whose row lies in [0, M), j in order."""
    ys, plan, w = inputs["ys"], inputs["plan"], inputs.get("topk_weights")
    T, k = plan.slot_to_row.shape
    M = ys.shape[0]
    for t in range(T):
        acc = torch.zeros(ys.shape[1], dtype=torch.float32, device=ys.device)
        for j in range(k):
            r = int(plan.slot_to_row[t, j])
            if 0 <= r < M:
                acc = acc + ys[r].float() * (1.0 if w is None else w[t, j].float())
        assert_same_bits(out[t], acc.to(ys.dtype), f"token {t}")


def _seqlens_rule(out, inputs):
    """Lengths outside [0, L] compute as the clamped ones."""
    L = inputs["kv"].shape[1]
    lens = inputs["cache_seqlens"].clamp(0, L)
    _same_bits(out, K.mla_decode(**dict(inputs, cache_seqlens=lens)))


def _unused_cache_ignored(out, inputs):
    """Keys at or past a sequence's length are never read: garbage there changes nothing."""
    L = inputs["kv"].shape[1]
    lens = inputs["cache_seqlens"].long().clamp(0, L)
    used = torch.arange(L, device=DEV)[None, :, None] < lens[:, None, None]
    _same_bits(out, K.mla_decode(**dict(inputs, kv=torch.where(used, inputs["kv"], 0))))


def _special_scales(out, inputs):
    """quant_act's special values: a block holding NaN gets a NaN scale, one holding ±inf an inf scale."""
    q, s = out
    x = inputs["x"].float()
    xb = x.unflatten(-1, (-1, inputs.get("block", 128)))
    assert torch.equal(s.isnan(), xb.isnan().any(-1))
    assert torch.equal(s.isinf(), xb.isinf().any(-1) & ~xb.isnan().any(-1))


def _zeros(out, inputs):
    for t in flat_tensors(out):
        assert not t.float().any()


def _shape(*shape):
    def doc(out, inputs):
        assert tuple(flat_tensors(out)[0].shape) == shape
    return doc


# --------------------------------------------------------------------------- agreement
def _upcast(inputs: dict) -> dict:
    return {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != FP8_DTYPE
            else v for k, v in inputs.items()}


def _derived(op: str):
    def compare(k, r, inputs):
        hi = getattr(R, op)(**_upcast(inputs))
        assert_same_numbers(k, hi, r)
    return compare


def _bitwise(k, r, inputs):
    _same_bits(k, r)


def _routing_weights(k, r, inputs):
    """ids equal; weights within (k + 1) roundings of the reference in their precision (test_gate's rule)."""
    (wk, ik), (wr, ir) = k, r
    assert torch.equal(ik, ir), "ids differ from the reference's"
    torch.testing.assert_close(wk, wr, rtol=(ik.shape[-1] + 1) * torch.finfo(wk.dtype).eps, atol=0, equal_nan=True)


def _swiglu_compare(k, r, inputs):
    if inputs.get("fp8"):  # bit for bit quant_act of the kernel's own activation (its documented result)
        act = K.swiglu(inputs["gate"], inputs["up"])
        _same_bits(k, R.quant_act(act, inputs.get("block", 128), inputs.get("scale_fmt")))
        k, r = act, R.swiglu(inputs["gate"], inputs["up"])
    assert_same_numbers(k, R.swiglu(inputs["gate"].double(), inputs["up"].double()), r)


def _fp8_gemm_compare(k, r, inputs):
    i = dict(inputs)
    block = i.pop("block", 128)
    i.pop("out_dtype", None)
    names = ("a", "a_s", "b", "b_s") if "a" in i else ("xs", "xs_s", "w", "w_s")
    ref32 = getattr(R, "fp8_gemm" if "a" in i else "fp8_grouped_gemm")(**i, out_dtype=torch.float32, block=block)
    absolute = {**i, **{n: abs_fp8(i[n]) if i[n].dtype == FP8_DTYPE else i[n].abs() for n in names}}
    mag = getattr(R, "fp8_gemm" if "a" in i else "fp8_grouped_gemm")(**absolute, out_dtype=torch.float32,
                                                                      block=block)
    assert k.dtype == r.dtype
    K_dim = i[names[0]].shape[1]
    assert_gemm_close(k, ref32, mag, -(-K_dim // block), block)


def _fp8_masked_compare(k, r, inputs):
    i = dict(inputs)
    block = i.pop("block", 128)
    i.pop("out_dtype", None)
    ref32 = R.fp8_grouped_gemm_masked(**i, out_dtype=torch.float32, block=block)
    absolute = {**i, "x": abs_fp8(i["x"]), "x_s": i["x_s"].abs(), "w": abs_fp8(i["w"]), "w_s": i["w_s"].abs()}
    mag = R.fp8_grouped_gemm_masked(**absolute, out_dtype=torch.float32, block=block)
    assert k.dtype == r.dtype
    assert_gemm_close(k, ref32, mag, -(-i["x"].shape[2] // block), block)


def _fp8_train_gemm_compare(op: str, fp8_args: tuple[str, ...]):
    """The FP8 training GEMMs: within the derived bound of the reference's float32 result (the
    reduction is dim 1 of the first operand)."""
    def compare(k, r, inputs):
        i = dict(inputs)
        block = i.pop("block", 128)
        i.pop("out_dtype", None)
        ref32 = getattr(R, op)(**i, out_dtype=torch.float32, block=block)
        absolute = {**i, **{n: abs_fp8(i[n]) if i[n].dtype == FP8_DTYPE else i[n].abs() for n in fp8_args}}
        mag = getattr(R, op)(**absolute, out_dtype=torch.float32, block=block)
        assert k.dtype == r.dtype
        assert_gemm_close(k, ref32, mag, -(-i[fp8_args[0]].shape[1] // block), block)
    return compare


_DGRAD_ARGS, _WGRAD_ARGS = ("dy", "dy_s", "w", "w_s"), ("dy_t", "dy_t_s", "x_t", "x_t_s")


def _fp8_linear_compare(k, r, inputs):
    assert k.dtype == r.dtype and k.shape == r.shape
    assert_fp8_linear_close(k, **inputs)


COMPARE: dict[str, Callable] = {
    "route": _routing_weights, "gate": _routing_weights, "grouped_gemm": _derived("grouped_gemm"),
    "grouped_gemm_dw": _derived("grouped_gemm_dw"), "grouped_gemm_masked": _derived("grouped_gemm_masked"),
    "make_routing": _bitwise, "permute": _bitwise,
    "unpermute": _bitwise, "quant_act": _bitwise, "quant_weight": _bitwise, "dequant": _bitwise,
    "fp8_gemm": _fp8_gemm_compare, "fp8_grouped_gemm": _fp8_gemm_compare,
    "fp8_grouped_gemm_masked": _fp8_masked_compare, "fp8_linear": _fp8_linear_compare,
    "mla_decode": _derived("mla_decode"), "swiglu": _swiglu_compare,
    "quant_act_t": _bitwise, "quant_act_dual": _bitwise,
    "fp8_dgrad": _fp8_train_gemm_compare("fp8_dgrad", _DGRAD_ARGS),
    "fp8_grouped_dgrad": _fp8_train_gemm_compare("fp8_grouped_dgrad", _DGRAD_ARGS),
    "fp8_wgrad": _fp8_train_gemm_compare("fp8_wgrad", _WGRAD_ARGS),
    "fp8_grouped_wgrad": _fp8_train_gemm_compare("fp8_grouped_wgrad", _WGRAD_ARGS),
}


# --------------------------------------------------------------------------- hand-written rows
def _list(values) -> str:
    return "[" + ",".join(map(str, values)) + "]"


def _offsets_rows(op: str, build, rows_arg: str, dtypes_values) -> list[Case]:
    """Malformed offsets in int32 and int64: the documented clamped result, and validate=True raising."""
    out = []
    for values, dtype, isolate in dtypes_values:
        what = f"offsets={_list(values)}-{str(dtype).removeprefix('torch.')}"
        make = changed(build, offsets=lambda i, v=values, d=dtype: _t(v, d))
        out.append(Case(op, what, make, Computes(_offsets_rule(op, rows_arg)), isolate=isolate, category="offsets"))
        if "validate" in SPECS[op].bools:
            out.append(Case(op, what + "-validate", changed(make, validate=True), Raises(ValueError, "offsets"),
                            category="offsets"))
    return out


OFFSETS = [
    ([2**32 + 3, 2**32 + 3, 2**32 + 8], I64, True),  # narrowed before clamping, these computed as [3, 3, 8]
    ([3, 3, 2**31 + 5], I64, True),  # and this as [3, 3, 0]
    ([2**31 - 1] * 3, I32, True),
    ([-2**63, 0, 2**63 - 1], I64, False),
    ([-2**31, 4, 2**31 - 1], I32, False),
    ([-1, 5, 8], I32, False), ([-1, 5, 8], I64, False),
    ([5, 2, 8], I32, False), ([5, 2, 8], I64, False),  # decreasing
    ([2, 5, 100], I32, False), ([2, 5, 100], I64, False),  # past M
]


def _nan_rows(t: torch.Tensor, *index, value=NAN) -> torch.Tensor:
    t = t.clone()
    t[index] = value
    return t


def _route_rows() -> list[Case]:
    b = _route
    return [
        Case("route", "n_groups-not-dividing-E", changed(b, logits=lambda i: _randn(5, 10)),
             Raises(ValueError, "n_groups")),
        Case("route", "topk-above-kept-experts", changed(b, topk=5), Raises(ValueError, "topk")),
        Case("route", "topk_groups-above-n_groups", changed(b, topk_groups=5), Raises(ValueError, "topk_groups")),
        Case("route", "bias-groups-of-one", changed(b, n_groups=8, topk_groups=2), Raises(ValueError, "n_groups")),
        Case("route", "experts-above-kernel", changed(b, logits=lambda i: _randn(2, 4097), bias=None, n_groups=1,
                                                     topk_groups=1), KernelDomain(ValueError, "logits")),
        Case("route", "nan-logits", changed(b, logits=lambda i: _nan_rows(_nan_rows(i["logits"], 1, 3), 2)), Computes(),
             category="nan"),
        Case("route", "inf-logits", changed(b, logits=lambda i: _nan_rows(i["logits"], 3, 5, value=INF), bias=None,
                                          score_func="softmax"), Computes(), category="nan"),
        Case("route", "nan-bias", changed(b, bias=lambda i: _nan_rows(i["bias"], 2)), Computes(), category="nan"),
        Case("route", "T=0", changed(b, logits=lambda i: _randn(0, 8)), Computes(_shape(0, 2)), category="zero"),
        Case("route", "float64", changed(b, logits=lambda i: i["logits"].double(), bias=lambda i: i["bias"].double()),
             Computes()),
        Case("route", "bf16-logits-f32-bias", changed(b, logits=lambda i: i["logits"].bfloat16()), Computes()),
        Case("route", "route_scale=0", changed(b, route_scale=0), Computes(_zeros_weights)),
        Case("route", "f32-logits-f64-bias", changed(b, bias=lambda i: i["bias"].double()), Computes()),
        Case("route", "all-tied", changed(b, logits=lambda i: torch.zeros(5, 8, device=DEV), bias=None),
             Computes(_lowest_ids_first)),
        Case("route", "topk=E", changed(b, n_groups=1, topk_groups=1, topk=8), Computes()),
    ]


def _lowest_ids_first(out, inputs):
    """Ties go to the lower index."""
    assert out[1].tolist() == [[0, 1]] * 5


def _zeros_weights(out, inputs):
    assert not out[0].any()


def _gate_rows() -> list[Case]:
    b = _gate
    return [
        Case("gate", "args-dict", changed(b, args=lambda i: {"n_routed_experts": 8}), Raises(TypeError, "args")),
        Case("gate", "weight-experts", changed(b, weight=lambda i: _randn(6, 16)), Raises(ValueError, "weight")),
        Case("gate", "x-dim", changed(b, x=lambda i: _randn(5, 12)), Raises(ValueError, "weight")),
        Case("gate", "bias-experts", changed(b, bias=lambda i: _randn(6)), Raises(ValueError, "bias")),
        Case("gate", "nan-x", changed(b, x=lambda i: _nan_rows(i["x"], 1)), Computes(), category="nan"),
        Case("gate", "T=0", changed(b, x=lambda i: _randn(0, 16)), Computes(_shape(0, 2)), category="zero"),
        Case("gate", "no-bias", changed(b, bias=None, args=ARGS.replace(gate_bias=False)), Computes()),
        Case("gate", "bf16-x-f32-weight", changed(b, x=lambda i: i["x"].bfloat16()), Computes()),
    ]


def _grouped_gemm_rows() -> list[Case]:
    b = _grouped_gemm
    gg = "grouped_gemm"
    out = [
        Case(gg, "xs-K", changed(b, xs=lambda i: _randn(10, 12, dtype=BF)), Raises(ValueError, "xs")),
        Case(gg, "w-K", changed(b, w=lambda i: _randn(3, 8, 12, dtype=BF)), Raises(ValueError, "xs")),
        Case(gg, "w-dtype-of-xs", changed(b, w=lambda i: i["w"].float()), Raises(TypeError, "w")),
        Case(gg, "offsets-length", changed(b, offsets=_t([4, 9])), Raises(ValueError, "offsets")),
        Case(gg, "float64", changed(b, xs=lambda i: i["xs"].double(), w=lambda i: i["w"].double()),
             KernelDomain(TypeError, "xs")),
        Case(gg, "M=0", changed(b, xs=lambda i: _randn(0, 16, dtype=BF), offsets=_t([0, 0, 0])), Computes(_shape(0, 8)),
             category="zero"),
        Case(gg, "N=0", changed(b, w=lambda i: _randn(3, 0, 16, dtype=BF)), Computes(_shape(10, 0)), category="zero"),
        Case(gg, "K=0", changed(b, xs=lambda i: _randn(10, 0, dtype=BF), w=lambda i: _randn(3, 8, 0, dtype=BF)),
             Computes(_zeros), category="zero"),
        Case(gg, "E=0", changed(b, w=lambda i: _randn(0, 8, 16, dtype=BF), offsets=_t([])), Computes(_zeros),
             category="zero"),
        Case(gg, "nan-xs-inf-w", changed(b, xs=lambda i: _nan_rows(i["xs"], 1), w=lambda i: _nan_rows(i["w"], 2, 3, 5,
                                                                                                 value=INF)),
             Computes(), category="nan"),
        Case(gg, "nan-rows-past-end", changed(b, xs=lambda i: _nan_rows(i["xs"], slice(9, None))),
             Computes(_offsets_rule(gg, "xs")), category="nan"),
        *_offsets_rows(gg, b, "xs", OFFSETS),
    ]
    return out


def _grouped_gemm_dw_rows() -> list[Case]:
    b = _grouped_gemm_dw
    dw = "grouped_gemm_dw"
    return [
        Case(dw, "dy-rows", changed(b, dy=lambda i: _randn(9, 8, dtype=BF)), Raises(ValueError, "dy")),
        Case(dw, "dy-dtype-of-xs", changed(b, dy=lambda i: i["dy"].float()), Raises(TypeError, "dy")),
        Case(dw, "float64", changed(b, xs=lambda i: i["xs"].double(), dy=lambda i: i["dy"].double()),
             KernelDomain(TypeError, "xs")),
        Case(dw, "M=0", changed(b, xs=lambda i: _randn(0, 16, dtype=BF), dy=lambda i: _randn(0, 8, dtype=BF)),
             Computes(_zeros), category="zero"),
        Case(dw, "nan-rows-past-end", changed(b, xs=lambda i: _nan_rows(i["xs"], slice(9, None)),
                                            dy=lambda i: _nan_rows(i["dy"], slice(9, None))),
             Computes(_offsets_rule(dw, "xs")), category="nan"),
        *_offsets_rows(dw, b, "xs", [OFFSETS[0], OFFSETS[3], OFFSETS[7], OFFSETS[9]]),
    ]


def _make_routing_rows() -> list[Case]:
    b = _make_routing
    mr = "make_routing"
    rows = []
    for value, dtype, isolate in ((4, I32, False), (-2, I32, False), (2**31 - 1, I32, True), (-2**31, I32, False),
                                  (2**31, I64, True), (2**32, I64, True), (-2**63, I64, False)):
        ids = changed(b, topk_ids=lambda i, v=value, d=dtype: _nan_rows(_t(IDS, d), 2, 1, value=v))
        what = f"id={value}-{str(dtype).removeprefix('torch.')}"
        rows += [Case(mr, what, ids, Computes(_ids_rule), isolate=isolate, category="ids"),
                 Case(mr, what + "-validate", changed(ids, validate=True), Raises(ValueError, "topk_ids"),
                      category="ids")]
    return rows + [
        Case(mr, "experts-above-kernel", changed(b, n_experts=4097), KernelDomain(ValueError, "n_experts")),
        Case(mr, "align-above-kernel", changed(b, align=1025), KernelDomain(ValueError, "align"), category="oversized"),
        Case(mr, "align-above-triton-tensor", changed(b, align=2**20 + 2), KernelDomain(ValueError, "align"),
             category="oversized"),
        Case(mr, "align=2**40", changed(b, align=2**40), Raises(ValueError, "align"), sides=("kernel",),
             category="oversized"),
        Case(mr, "T=0", changed(b, topk_ids=_t([[], []]).T), Computes(_shape(4)), category="zero"),
        Case(mr, "k=0", changed(b, topk_ids=lambda i: i["topk_ids"][:, :0]), Computes(_shape(4)), category="zero"),
        Case(mr, "int64-ids", changed(b, topk_ids=lambda i: i["topk_ids"].long()), Computes()),
        Case(mr, "all-skipped", changed(b, topk_ids=lambda i: torch.full_like(i["topk_ids"], -1)), Computes(_ids_rule)),
        Case(mr, "one-expert", changed(b, topk_ids=lambda i: i["topk_ids"].clamp(max=0), n_experts=1, align=1),
             Computes()),
    ]


def _corrupt(field_name: str, index, value):
    def change(i):
        plan = i["plan"]
        t = getattr(plan, field_name).clone()
        t[index] = value
        return plan._replace(**{field_name: t})
    return change


def _plan_rows(op: str, build, rule, rows_arg: str) -> list[Case]:
    rows = []
    for fld, index, value, isolate in (("slot_to_row", (0, 0), 10**6, True), ("slot_to_row", (0, 0), 2**30, True),
                                       ("slot_to_row", (3, 1), 2**31 - 1, True), ("slot_to_row", (0, 0), -5, False),
                                       ("slot_to_row", (2, 0), 0, False), ("row_to_slot", 1, 2**31 - 1, True),
                                       ("row_to_slot", 1, -7, False), ("row_to_slot", 0, 3, False)):
        make = changed(build, plan=_corrupt(fld, index, value))
        what = f"plan.{fld}={value}"
        rows += [Case(op, what, make, Computes(rule), isolate=isolate, category="plan"),
                 Case(op, what + "-validate", changed(make, validate=True), Raises(ValueError, "plan"),
                      category="plan")]
    return rows


def _permute_rows() -> list[Case]:
    b, f = _permute, _permute_fp8
    return [
        *_plan_rows("permute", b, _permute_rule, "x"),
        Case("permute", "x-tokens", changed(b, x=lambda i: _randn(6, 8, dtype=BF)),
             Raises(ValueError, "plan.slot_to_row")),
        Case("permute", "nan-x", changed(b, x=lambda i: _nan_rows(i["x"], 1, 2)), Computes(_permute_rule),
             category="nan"),
        Case("permute", "fp8-nan-inf-x", changed(f, x=lambda i: _nan_rows(_nan_rows(i["x"], 1, 2), 3, 200, value=INF)),
             Computes(), category="nan"),
        Case("permute", "T=0", lambda: dict(x=_randn(0, 8, dtype=BF), plan=R.make_routing(_t([[], []]).T, 4)),
             Computes(_zeros), category="zero"),
        Case("permute", "D=0", changed(b, x=lambda i: _randn(5, 0, dtype=BF)), Computes(), category="zero"),
        Case("permute", "fp8-block-above-kernel", changed(f, block=2048), KernelDomain(ValueError, "block"),
             category="oversized"),
        Case("permute", "fp8-block=2**40", changed(f, block=2**40), KernelDomain(ValueError, "block"),
             category="oversized"),
        Case("permute", "float64", changed(b, x=lambda i: i["x"].double()), Computes()),
        Case("permute", "fp8-float64-x", changed(f, x=lambda i: i["x"].double()), Computes()),
        Case("permute", "fp8-ue8m0", changed(f, scale_fmt="ue8m0"), Computes()),
    ]


def _unpermute_rows() -> list[Case]:
    b = _unpermute
    up = "unpermute"
    return [
        *_plan_rows(up, b, _unpermute_rule, "ys"),
        Case(up, "ys-rows", changed(b, ys=lambda i: _randn(7, 8, dtype=BF)), Raises(ValueError, "ys")),
        Case(up, "topk_weights-shape", changed(b, topk_weights=lambda i: torch.rand(5, 3, device=DEV)),
             Raises(ValueError, "topk_weights")),
        Case(up, "nan-weight-of-skipped-slot", changed(b, topk_weights=lambda i: _nan_rows(i["topk_weights"], 1, 1)),
             Computes(_unpermute_rule), category="nan"),
        Case(up, "nan-unowned-rows", changed(b, ys=lambda i: _nan_rows(i["ys"], slice(9, None))),
             Computes(_unpermute_rule), category="nan"),
        Case(up, "inf-ys", changed(b, ys=lambda i: _nan_rows(i["ys"], 0, 1, value=INF)), Computes(_unpermute_rule),
             category="nan"),
        Case(up, "no-weights", changed(b, topk_weights=None), Computes(_unpermute_rule)),
        Case(up, "bf16-weights", changed(b, topk_weights=lambda i: i["topk_weights"].bfloat16()),
             Computes(_unpermute_rule)),
        Case(up, "float64", changed(b, ys=lambda i: i["ys"].double(),
                                    topk_weights=lambda i: i["topk_weights"].double()),
             Computes()),
        Case(up, "T=0", lambda: dict(ys=_randn(0, 8, dtype=BF), plan=R.make_routing(_t([[], []]).T, 4),
                                     topk_weights=torch.rand(0, 2, device=DEV)), Computes(_shape(0, 8)),
             category="zero"),
    ]


def _quant_rows() -> list[Case]:
    qa, qw, dq = _quant_act, _quant_weight, _dequant
    return [
        Case("quant_act", "nan-inf-x", changed(qa, x=lambda i: _nan_rows(_nan_rows(i["x"], 0, 3), 1, 200, value=-INF)),
             Computes(_special_scales), category="nan"),
        Case("quant_act", "block-above-kernel", changed(qa, block=1025), KernelDomain(ValueError, "block"),
             category="oversized"),
        Case("quant_act", "block-above-triton-tensor", changed(qa, block=2**20 + 1), KernelDomain(ValueError, "block"),
             category="oversized"),
        Case("quant_act", "block=2**40", changed(qa, block=2**40), KernelDomain(ValueError, "block"),
             category="oversized"),
        Case("quant_act", "scalar-x", changed(qa, x=lambda i: i["x"][0, 0]), Raises(ValueError, "x")),
        Case("quant_act", "rows=0", changed(qa, x=lambda i: _randn(0, 256, dtype=BF)), Computes(_shape(0, 256)),
             category="zero"),
        Case("quant_act", "K=0", changed(qa, x=lambda i: _randn(3, 0, dtype=BF)), Computes(_shape(3, 0)),
             category="zero"),
        Case("quant_act", "partial-block", changed(qa, block=96), Computes()),
        Case("quant_act", "1d-x", changed(qa, x=lambda i: i["x"][0]), Computes()),
        Case("quant_act", "ue8m0-tiny-values", changed(qa, x=lambda i: i["x"] * 1e-30, scale_fmt="ue8m0"), Computes()),
        Case("quant_weight", "stacked", changed(qw, w=lambda i: _randn(2, 130, 128, dtype=BF)), Computes()),
        Case("quant_act", "float64-3d", changed(qa, x=lambda i: _randn(2, 3, 256, dtype=torch.float64)), Computes()),
        Case("quant_weight", "nan-w", changed(qw, w=lambda i: _nan_rows(i["w"], 129, 0)), Computes(), category="nan"),
        Case("quant_weight", "block-above-kernel", changed(qw, block=1025), KernelDomain(ValueError, "block"),
             category="oversized"),
        Case("quant_weight", "block=2**40", changed(qw, block=2**40), KernelDomain(ValueError, "block"),
             category="oversized"),
        Case("quant_weight", "1d-w", changed(qw, w=lambda i: i["w"][0]), Raises(ValueError, "w")),
        Case("quant_weight", "N=0", changed(qw, w=lambda i: _randn(0, 128, dtype=BF)), Computes(), category="zero"),
        Case("quant_weight", "experts=0", changed(qw, w=lambda i: _randn(0, 130, 128, dtype=BF)), Computes(),
             category="zero"),
        Case("dequant", "nan-inf-scale", changed(dq, scale=lambda i: _nan_rows(_nan_rows(i["scale"], 0, 0), 1, 0,
                                                                             value=INF)), Computes(), category="nan"),
        Case("dequant", "scale-shape", changed(dq, scale=lambda i: i["scale"][:1]), Raises(ValueError, "scale")),
        Case("dequant", "block=2**40", changed(dq, scale=lambda i: i["scale"][:1, :1], block=2**40), Computes(),
             category="oversized"),
        Case("dequant", "block-above-triton-tensor", changed(dq, scale=lambda i: i["scale"][:1, :1], block=2**20 + 1),
             Computes(), category="oversized"),
        Case("dequant", "float64-out", changed(dq, out_dtype=torch.float64), Computes()),
        Case("dequant", "1d-x", changed(dq, x=lambda i: i["x"][0], scale=lambda i: i["scale"][0]), Computes()),
        Case("dequant", "0d-x", changed(dq, x=lambda i: i["x"][0, 0], scale=lambda i: i["scale"][0, 0]), Computes()),
        Case("dequant", "activation-scales", changed(dq, scale=lambda i: i["scale"][:1].expand(130, 1).contiguous()),
             Computes()),
        Case("dequant", "rows=0", changed(dq, x=lambda i: i["x"][:0], scale=lambda i: i["scale"][:0]), Computes(),
             category="zero"),
    ]


def _fp8_gemm_rows() -> list[Case]:
    g, gg, lin, gm = _fp8_gemm, _fp8_grouped_gemm, _fp8_linear, _fp8_grouped_gemm_masked

    return [
        Case("fp8_grouped_gemm_masked", "nan-past-masked_m", changed(gm, x=lambda i: _nan_rows(i["x"], 1, 2),
                                                                   x_s=lambda i: _nan_rows(i["x_s"], 2, 3)),
             Computes(), category="nan"),
        *(Case("fp8_grouped_gemm_masked", f"masked_m={_list(m)}-{str(d)[6:]}", changed(gm, masked_m=_t(m, d)),
               Computes(), category="indices") for m in ([-1, 9, 2], [0, 0, 0], [4, 4, 4]) for d in (I32, I64)),
        Case("fp8_grouped_gemm_masked", "K-not-a-block-multiple",
             changed(gm, x=lambda i: i["x"][..., :100], w=lambda i: i["w"][..., :100]), KernelDomain(ValueError, "x")),
        Case("fp8_grouped_gemm_masked", "max_m=0",
             changed(gm, x=lambda i: i["x"][:, :0], x_s=lambda i: i["x_s"][:, :0]), Computes(_shape(3, 0, 8)),
             category="zero"),
        Case("fp8_gemm", "b-K", changed(g, b=lambda i: i["b"][:, :128]), Raises(ValueError, "b")),
        Case("fp8_gemm", "a_s-shape", changed(g, a_s=lambda i: i["a_s"][:, :1]), Raises(ValueError, "a_s")),
        Case("fp8_gemm", "out_dtype=float64", changed(g, out_dtype=torch.float64), Raises(TypeError, "out_dtype")),
        Case("fp8_gemm", "K-not-a-block-multiple", changed(g, a=lambda i: i["a"][:, :200], b=lambda i: i["b"][:, :200]),
             KernelDomain(ValueError, "a")),
        Case("fp8_gemm", "block-above-kernel", changed(g, block=2**20, a_s=lambda i: i["a_s"][:, :1],
                                                      b_s=lambda i: i["b_s"][:, :1]),
             KernelDomain(ValueError, "block"), category="oversized"),
        Case("fp8_gemm", "nan-inf-scales", changed(g, a_s=lambda i: _nan_rows(i["a_s"], 1, 0),
                                                 b_s=lambda i: _nan_rows(i["b_s"], 0, 1, value=INF)),
             Computes(), category="nan"),
        Case("fp8_gemm", "float32-out", changed(g, out_dtype=torch.float32), Computes()),
        Case("fp8_gemm", "float16-out", changed(g, out_dtype=torch.float16), Computes()),
        Case("fp8_gemm", "M=0", changed(g, a=lambda i: i["a"][:0], a_s=lambda i: i["a_s"][:0]), Computes(_shape(0, 8)),
             category="zero"),
        Case("fp8_gemm", "K=0", changed(g, a=lambda i: i["a"][:, :0], a_s=lambda i: i["a_s"][:, :0],
                                      b=lambda i: i["b"][:, :0], b_s=lambda i: i["b_s"][:, :0]),
             Computes(_zeros), category="zero"),
        Case("fp8_grouped_gemm", "nan-xs_s", changed(gg, xs_s=lambda i: _nan_rows(i["xs_s"], 3, 0)), Computes(),
             category="nan"),
        Case("fp8_grouped_gemm", "K-not-a-block-multiple",
             changed(gg, xs=lambda i: i["xs"][:, :100], w=lambda i: i["w"][..., :100]), KernelDomain(ValueError, "xs")),
        Case("fp8_grouped_gemm", "M=0", changed(gg, xs=lambda i: i["xs"][:0], xs_s=lambda i: i["xs_s"][:0],
                                              offsets=_t([0, 0, 0])), Computes(_shape(0, 8)), category="zero"),
        *_offsets_rows("fp8_grouped_gemm", gg, "xs", [OFFSETS[0], OFFSETS[3], OFFSETS[5], OFFSETS[8], OFFSETS[9]]),
        Case("fp8_linear", "x-float64", changed(lin, x=lambda i: i["x"].double()), Raises(TypeError, "x")),
        Case("fp8_linear", "x-K", changed(lin, x=lambda i: i["x"][:, :128]), Raises(ValueError, "x")),
        Case("fp8_linear", "3d-x", changed(lin, x=lambda i: _randn(2, 3, 256, dtype=BF)), Computes()),
        Case("fp8_linear", "1d-x", changed(lin, x=lambda i: i["x"][0]), Computes()),
        Case("fp8_linear", "no-bias-float32", changed(lin, x=lambda i: i["x"].float(), bias=None), Computes()),
        Case("fp8_linear", "nan-bias", changed(lin, bias=lambda i: _nan_rows(i["bias"], 2)), Computes(),
             category="nan"),
        Case("fp8_linear", "fp16-x-bf16-bias", changed(lin, x=lambda i: i["x"].half()), Computes()),
        Case("fp8_linear", "nan-x", changed(lin, x=lambda i: _nan_rows(i["x"], 1, 7)), Computes(), category="nan"),
        Case("fp8_linear", "rows=0", changed(lin, x=lambda i: i["x"][:0]), Computes(_shape(0, 8)), category="zero"),
        Case("fp8_linear", "K-not-a-block-multiple",
             changed(lin, x=lambda i: i["x"][:, :200], weight=lambda i: i["weight"][:, :200]),
             KernelDomain(ValueError, "weight")),
    ]


def _fp8_train_rows() -> list[Case]:
    """The FP8 training ops: token-direction quantizers, dgrad and wgrad (dense and grouped)."""
    q, d, gd, w, gw = _quant_act_t, _fp8_dgrad, _fp8_grouped_dgrad, _fp8_wgrad, _fp8_grouped_wgrad
    rows = []
    for op in ("quant_act_t", "quant_act_dual"):
        rows += [
            Case(op, "nan-inf-x", changed(q, x=lambda i: _nan_rows(_nan_rows(i["x"], 3, 1), 129, 2, value=-INF)),
                 Computes(), category="nan"),
            Case(op, "M=0", changed(q, x=lambda i: i["x"][:0]), Computes(), category="zero"),
            Case(op, "K=0", changed(q, x=lambda i: i["x"][:, :0]), Computes(), category="zero"),
            Case(op, "float64", changed(q, x=lambda i: i["x"].double()), Computes()),
            Case(op, "ue8m0", changed(q, scale_fmt="ue8m0"), Computes()),
            Case(op, "block-above-kernel", changed(q, block=512), KernelDomain(ValueError, "block"),
                 category="oversized"),
        ]
    for op, b in (("fp8_dgrad", d), ("fp8_grouped_dgrad", gd)):
        rows += [
            Case(op, "w-N", changed(b, w=lambda i: i["w"][..., :128, :]), Raises(ValueError, "w")),
            Case(op, "dy_s-shape", changed(b, dy_s=lambda i: i["dy_s"][:, :1]), Raises(ValueError, "dy_s")),
            Case(op, "w_s-transposed-shape", changed(b, w_s=lambda i: i["w_s"].transpose(-1, -2)),
                 Raises(ValueError, "w_s")),
            Case(op, "partial-reduction-block", changed(b, dy=lambda i: i["dy"][:, :200],
                                                        w=lambda i: i["w"][..., :200, :]), Computes()),
            Case(op, "nan-inf-scales", changed(b, dy_s=lambda i: _nan_rows(i["dy_s"], 1, 0),
                                               w_s=lambda i: _nan_rows(i["w_s"], ..., 1, 0, value=INF)),
                 Computes(), category="nan"),
            Case(op, "float32-out", changed(b, out_dtype=torch.float32), Computes()),
            Case(op, "N=0", changed(b, dy=lambda i: i["dy"][:, :0], dy_s=lambda i: i["dy_s"][:, :0],
                                    w=lambda i: i["w"][..., :0, :], w_s=lambda i: i["w_s"][..., :0, :]),
                 Computes(_zeros), category="zero"),
            Case(op, "block-not-a-kernel-tile", changed(b, block=100, dy_s=lambda i: R.quant_act(
                i["dy"].float(), 100)[1], w_s=lambda i: R.quant_weight(i["w"].float(), 100)[1]),
                 KernelDomain(ValueError, "block")),
        ]
    rows += _offsets_rows("fp8_grouped_dgrad", gd, "dy", [OFFSETS[0], OFFSETS[3], OFFSETS[7], OFFSETS[9]])
    for op, b in (("fp8_wgrad", w), ("fp8_grouped_wgrad", gw)):
        rows += [
            Case(op, "x_t-tokens", changed(b, x_t=lambda i: i["x_t"][:, :8]), Raises(ValueError, "x_t")),
            Case(op, "x_t_s-shape", changed(b, x_t_s=lambda i: i["x_t_s"][:, :0]), Raises(ValueError, "x_t_s")),
            Case(op, "nan-inf-scales", changed(b, dy_t_s=lambda i: _nan_rows(i["dy_t_s"], 1, 0),
                                               x_t_s=lambda i: _nan_rows(i["x_t_s"], 2, 0, value=INF)),
                 Computes(), category="nan"),
            Case(op, "bf16-out", changed(b, out_dtype=BF), Computes()),
            Case(op, "N=0", changed(b, dy_t=lambda i: i["dy_t"][:0], dy_t_s=lambda i: i["dy_t_s"][:0]),
                 Computes(), category="zero"),
            Case(op, "block-not-a-kernel-tile", changed(b, block=100, dy_t_s=lambda i: R.quant_act(
                i["dy_t"].float(), 100)[1], x_t_s=lambda i: R.quant_act(i["x_t"].float(), 100)[1]),
                 KernelDomain(ValueError, "block")),
        ]
    rows += [
        Case("fp8_wgrad", "M=0", changed(w, dy_t=lambda i: i["dy_t"][:, :0], dy_t_s=lambda i: i["dy_t_s"][:, :0],
                                         x_t=lambda i: i["x_t"][:, :0], x_t_s=lambda i: i["x_t_s"][:, :0]),
             Computes(_zeros), category="zero"),
        Case("fp8_grouped_wgrad", "E=0", changed(gw, offsets=_t([])), Computes(_shape(0, 8, 16)), category="zero"),
        *_offsets_rows("fp8_grouped_wgrad", gw, "dy_t", [OFFSETS[0], OFFSETS[3], OFFSETS[7], OFFSETS[9]]),
    ]
    return rows


def _mla_decode_rows() -> list[Case]:
    b = _mla_decode
    md = "mla_decode"
    rows = []
    for values, dtype, isolate in (([7, 6], I32, False), ([-1, 6], I32, False), ([0, 0], I64, False),
                                   ([2**31 - 1, 2], I32, True), ([2**31, 2**32 + 2], I64, True),
                                   ([-2**63, 2**63 - 1], I64, False)):
        make = changed(b, cache_seqlens=lambda i, v=values, d=dtype: _t(v, d))
        what = f"cache_seqlens={_list(values)}-{str(dtype).removeprefix('torch.')}"
        rows += [Case(md, what, make, Computes(_seqlens_rule), isolate=isolate, category="lengths"),
                 Case(md, what + "-validate", changed(make, validate=True), Raises(ValueError, "cache_seqlens"),
                      category="lengths")]
    return rows + [
        Case(md, "nan-in-unused-cache", changed(b, kv=lambda i: _nan_rows(i["kv"], 0, slice(3, None))),
             Computes(_unused_cache_ignored), category="nan"),
        Case(md, "inf-q", changed(b, q=lambda i: _nan_rows(i["q"], 1, 0, 1, 5, value=INF)), Computes(), category="nan"),
        Case(md, "S-above-L", changed(b, q=lambda i: _randn(2, 7, 2, 40, dtype=BF)), Raises(ValueError, "q")),
        Case(md, "v_dim-above-Dk", changed(b, v_dim=41), Raises(ValueError, "v_dim")),
        Case(md, "kv-batch", changed(b, kv=lambda i: i["kv"][:1]), Raises(ValueError, "kv")),
        Case(md, "cache_seqlens-batch", changed(b, cache_seqlens=_t([3])), Raises(ValueError, "cache_seqlens")),
        Case(md, "float64", changed(b, q=lambda i: i["q"].double(), kv=lambda i: i["kv"].double()),
             KernelDomain(TypeError, "q")),
        Case(md, "B=0", changed(b, q=lambda i: i["q"][:0], kv=lambda i: i["kv"][:0], cache_seqlens=_t([])),
             Computes(_shape(0, 1, 2, 32)), category="zero"),
        Case(md, "H=0", changed(b, q=lambda i: i["q"][:, :, :0]), Computes(_shape(2, 1, 0, 32)), category="zero"),
        Case(md, "no-cache_seqlens", changed(b, cache_seqlens=None), Computes()),
        Case(md, "v_dim=Dk", changed(b, v_dim=40), Computes()),
        Case(md, "v_dim=1", changed(b, v_dim=1), Computes()),
        Case(md, "fp16", changed(b, q=lambda i: i["q"].half(), kv=lambda i: i["kv"].half()), Computes()),
        Case(md, "S=L", changed(b, q=lambda i: _randn(2, 6, 2, 40, dtype=BF), cache_seqlens=None), Computes()),
        Case(md, "softmax_scale-int", changed(b, softmax_scale=1), Computes()),
    ]


def _swiglu_rows() -> list[Case]:
    b, f = _swiglu, _swiglu_fp8
    return [
        Case("swiglu", "up-broadcast", changed(b, up=lambda i: i["up"][:1]), Raises(ValueError, "up")),
        Case("swiglu", "scalar-gate", changed(b, gate=lambda i: i["gate"][0, 0], up=lambda i: i["up"][0, 0]),
             Raises(ValueError, "gate")),
        Case("swiglu", "float64", changed(b, gate=lambda i: i["gate"].double(), up=lambda i: i["up"].double()),
             KernelDomain(TypeError, "gate")),
        Case("swiglu", "nan-inf-gate",
             changed(b, gate=lambda i: _nan_rows(_nan_rows(i["gate"], 0, 1), 2, 3, value=INF)),
             Computes(), category="nan"),
        Case("swiglu", "fp8-nan-inf-gate", changed(f, gate=lambda i: _nan_rows(_nan_rows(i["gate"], 0, 1), 2, 3,
                                                                             value=-INF)),
             Computes(), category="nan"),
        Case("swiglu", "rows=0", changed(b, gate=lambda i: i["gate"][:0], up=lambda i: i["up"][:0]), Computes(),
             category="zero"),
        Case("swiglu", "3d",
             changed(b, gate=lambda i: _randn(2, 3, 8, dtype=BF), up=lambda i: _randn(2, 3, 8, dtype=BF)),
             Computes()),
        Case("swiglu", "fp8-block-above-kernel", changed(f, block=2048), KernelDomain(ValueError, "block"),
             category="oversized"),
        Case("swiglu", "fp8-block=2**40", changed(f, block=2**40), KernelDomain(ValueError, "block"),
             category="oversized"),
    ]


def _launch(op: str, build, out, expect, what: str) -> Case:
    return Case(op, f"out-{what}", changed(build, out=out), expect, sides=("kernel",), launch=True, category="out")


def _out_rows() -> list[Case]:
    gg, qa, md = _grouped_gemm, _quant_act, _mla_decode
    nan_out = lambda shape, dtype=BF: lambda i: nan_empty(shape, dtype, DEV)  # noqa: E731
    return [
        _launch("grouped_gemm", gg, nan_out((10, 9)), Raises(ValueError, "out"), "shape"),
        _launch("grouped_gemm", gg, lambda i: torch.empty(10, 8, dtype=BF, device="meta"), Raises(ValueError, "out"),
                "meta"),
        _launch("grouped_gemm", gg, lambda i: [nan_empty((10, 8), BF, DEV)], Raises(TypeError, "out"), "list"),
        _launch("quant_act", qa, lambda i: (nan_empty((3, 256), FP8_DTYPE, DEV),), Raises(TypeError, "out"), "length"),
        _launch("quant_act", qa, lambda i: (nan_empty((3, 256), FP8_DTYPE, DEV), nan_empty((2, 3), device=DEV).T),
                Computes(), "col-major-scales"),
        _launch("quant_act", qa, lambda i: (nan_empty((3, 256), FP8_DTYPE, DEV), nan_empty((1, 2), device=DEV)
                                            .expand(3, 2)), Raises(ValueError, "out[1]"), "stride-0-scales"),
        _launch("mla_decode", md, lambda i: nan_empty((32, 2, 1, 2), BF, DEV).permute(3, 2, 1, 0), Computes(),
                "reversed-strides"),
    ]


def _meta(*shape, dtype=BF):
    return torch.empty(shape, dtype=dtype, device="meta")


def _meta_plan(T: int, k: int, M: int, E: int = 4) -> R.RoutingPlan:
    return R.RoutingPlan(_meta(E, dtype=I32), _meta(E, dtype=I32), _meta(T, k, dtype=I32), _meta(M, dtype=I32),
                         _meta(M, dtype=I32))


def _int32_rows() -> list[Case]:
    """The kernels index rows in int32: 2**31 rows (meta tensors: the fake runs the domain check
    without memory) are refused naming the argument."""
    big = 2**31
    rows = [
        ("grouped_gemm", lambda: dict(xs=_meta(big, 16), w=_meta(3, 8, 16), offsets=_meta(3, dtype=I32)), "xs"),
        ("grouped_gemm_dw", lambda: dict(xs=_meta(big, 16), dy=_meta(big, 8), offsets=_meta(3, dtype=I32)), "xs"),
        ("fp8_grouped_gemm", lambda: dict(xs=_meta(big, 128, dtype=FP8_DTYPE), xs_s=_meta(big, 1, dtype=torch.float32),
                                          w=_meta(3, 8, 128, dtype=FP8_DTYPE), w_s=_meta(3, 1, 1, dtype=torch.float32),
                                          offsets=_meta(3, dtype=I32)), "xs"),
        ("fp8_grouped_gemm_masked", lambda: dict(
            x=_meta(2, 2**30, 128, dtype=FP8_DTYPE), x_s=_meta(2, 2**30, 1, dtype=torch.float32),
            w=_meta(2, 8, 128, dtype=FP8_DTYPE), w_s=_meta(2, 1, 1, dtype=torch.float32), masked_m=_meta(2, dtype=I32)),
         "x"),
        ("make_routing", lambda: dict(topk_ids=_meta(2**30, 2, dtype=I32), n_experts=4), "topk_ids"),
        ("fp8_grouped_dgrad", lambda: dict(
            dy=_meta(big, 128, dtype=FP8_DTYPE), dy_s=_meta(big, 1, dtype=torch.float32),
            w=_meta(3, 128, 8, dtype=FP8_DTYPE), w_s=_meta(3, 1, 1, dtype=torch.float32), offsets=_meta(3, dtype=I32)),
         "dy"),
        ("fp8_grouped_wgrad", lambda: dict(
            dy_t=_meta(8, big, dtype=FP8_DTYPE), dy_t_s=_meta(8, big // 128, dtype=torch.float32),
            x_t=_meta(16, big, dtype=FP8_DTYPE), x_t_s=_meta(16, big // 128, dtype=torch.float32),
            offsets=_meta(3, dtype=I32)), "dy_t"),
        ("permute", lambda: dict(x=_meta(1, 8), plan=_meta_plan(1, 2, big)), "plan.row_to_slot"),
        ("unpermute", lambda: dict(ys=_meta(big, 8), plan=_meta_plan(1, 2, big)), "ys"),
    ]
    return [Case(op, "2**31-rows", build, Raises(ValueError, arg), sides=("kernel",), category="oversized")
            for op, build, arg in rows]


CASES: list[Case] = [
    *(row for op, spec in SPECS.items() for row in _generated(op, spec)),
    *_route_rows(), *_gate_rows(), *_grouped_gemm_rows(), *_grouped_gemm_dw_rows(), *_make_routing_rows(),
    *_permute_rows(), *_unpermute_rows(), *_quant_rows(), *_fp8_gemm_rows(), *_fp8_train_rows(), *_mla_decode_rows(),
    *_swiglu_rows(),
    *_out_rows(), *_int32_rows(),
]
CASES = [c if c.category else dataclasses.replace(c, category={
    Raises: "shape", KernelDomain: "kernel-domain", Computes: "variant"}[type(c.expect)]) for c in CASES]
ISOLATED = [c for c in CASES if c.isolate]


def check_case(case: Case) -> None:
    run_case(case, COMPARE)


def run_cases_for_subprocess(ids: list[str]) -> None:
    """The child side of ``bad_input_testing.run_isolated``: run the rows, one result line each."""
    by_id = {case_id(c): c for c in CASES}
    for i in ids:
        print(f"START\t{i}", flush=True)
        torch.manual_seed(0)
        try:
            check_case(by_id[i])
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            print(f"FAIL\t{i}\t{type(e).__name__}: {str(e)[:500]!r}", flush=True)
        else:
            print(f"PASS\t{i}", flush=True)


# --------------------------------------------------------------------------- tests
def test_every_public_op_has_a_spec_and_a_twin():
    assert sorted(SPECS) == PUBLIC_OPS
    for op in PUBLIC_OPS:
        assert callable(getattr(R, op)), f"moela.reference.{op}: the kernel's twin is missing"
    assert {c.op for c in CASES} == set(PUBLIC_OPS)
    assert len({case_id(c) for c in CASES}) == len(CASES), "case ids must be unique"


@pytest.mark.parametrize("case", [c for c in CASES if not c.isolate], ids=case_id)
def test_bad_input(case):
    check_case(case)


@pytest.fixture(scope="module")
def isolated_results() -> dict[str, str]:
    return run_isolated("test_bad_input_ops", [case_id(c) for c in ISOLATED])


@pytest.mark.parametrize("case", ISOLATED, ids=case_id)
def test_bad_input_in_a_subprocess(case, isolated_results):
    """Indices far out of bounds: run in one child process, which must survive every one of them."""
    assert isolated_results[case_id(case)] == "PASS", isolated_results[case_id(case)]
