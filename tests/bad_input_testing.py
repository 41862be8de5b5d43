"""The bad-input suites' machinery: one table row per case, what it expects, and how a row runs.

Import as ``import bad_input_testing`` (pyproject puts tests/ on the path).

A :class:`Case` names an op (the same name in ``moela.kernels`` and ``moela.reference``, or a
pair of callables), a function building fresh inputs (argument name -> value) and what must
happen:

- :class:`Raises`: every side raises the same exception type and each message names the
  argument first (``"<arg>: ..."``, the project's convention).
- :class:`Computes`: both sides return; ``compare`` says they agree (bitwise where the kernel is
  bitwise, else within a derived tolerance) and ``doc`` checks the documented result.
- :class:`KernelDomain`: the kernel refuses in words (its narrower domain: the message names the
  argument and says "Triton"), the reference computes.
- :class:`MetaShapes`: the kernel (its fake) returns meta outputs of the contract's spec; the
  reference returns the same, or raises ValueError naming the argument and saying that meta
  tensors carry no values.

``sides=("kernel",)`` rows have no reference side (``out=`` buffers of ``.launch``);
``isolate=True`` rows run in one shared subprocess (see :func:`run_isolated`), because before
the kernels were bounds-safe such an index killed the process.

:func:`run_case` runs an op row; :func:`changed` derives a row's inputs from a valid call, and
:func:`transposed` / :func:`strided` / :func:`expanded` make views of the same shape.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from moela_testing import assert_close_derived

__all__ = [
    "Case", "Raises", "Computes", "KernelDomain", "MetaShapes", "named", "outcome", "check_raises",
    "flat_tensors", "run_isolated", "case_id", "assert_same_numbers", "assert_fp8_linear_close", "changed",
    "map_plan", "transposed", "strided", "expanded", "fake_inputs", "spec_of", "run_case",
]


@dataclass(frozen=True)
class Raises:
    error: type[BaseException]
    arg: str
    match: str | None = None  # a regex the message must also contain


@dataclass(frozen=True)
class Computes:
    doc: Callable | None = None  # doc(kernel_out, inputs) asserts the documented result


@dataclass(frozen=True)
class KernelDomain:
    error: type[BaseException]
    arg: str


@dataclass(frozen=True)
class MetaShapes:
    ref_error: str | None = None  # the argument the reference names when it must read values


@dataclass(frozen=True)
class Case:
    op: str
    what: str
    build: Callable[[], dict]
    expect: Raises | Computes | KernelDomain | MetaShapes
    sides: tuple[str, ...] = ("kernel", "reference")
    isolate: bool = False
    launch: bool = False  # the kernel side calls ``op.launch(**inputs)`` (with ``out=``)
    category: str = ""
    transform: Callable[[dict], dict] | None = None  # applied to the built inputs (e.g. all to meta)
    fake_cuda: tuple[str, ...] | None = None  # run in a FakeTensorMode, these arguments on a fake "cuda" device


def case_id(c: Case) -> str:
    return f"{c.op}-{c.what}"


def named(msg: str) -> str:
    """The argument a message names: the text before its first ``": "``."""
    return msg.split(": ", 1)[0]


def outcome(fn: Callable, inputs: dict):
    """``fn(**inputs)``, or the exception it raised."""
    try:
        return fn(**inputs)
    except Exception as e:  # noqa: BLE001 - the case decides what is allowed
        return e


def check_raises(side: str, got, expect: Raises | KernelDomain) -> None:
    assert isinstance(got, BaseException), f"{side}: expected {expect.error.__name__} naming {expect.arg!r}, " \
                                           f"got a result: {_describe(got)}"
    assert type(got) is expect.error, f"{side}: expected {expect.error.__name__}, got {type(got).__name__}: {got}"
    assert named(str(got)) == expect.arg, f"{side}: the message should name {expect.arg!r} first: {got}"
    match = getattr(expect, "match", None)
    if match is not None:
        assert re.search(match, str(got)), f"{side}: the message should match {match!r}: {got}"


def _describe(out) -> str:
    if isinstance(out, torch.Tensor):
        return f"tensor {tuple(out.shape)} {out.dtype} on {out.device}"
    if isinstance(out, tuple):
        return "(" + ", ".join(_describe(o) for o in out) + ")"
    return repr(out)[:200]


def flat_tensors(out) -> list[torch.Tensor]:
    """The tensors of an op's output (a tensor, a tuple of them, or a RoutingPlan)."""
    return [out] if isinstance(out, torch.Tensor) else [t for o in out for t in flat_tensors(o)]


def assert_same_numbers(out: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor) -> None:
    """NaN and ±inf where the reference at the same precision has them, finite values within the
    derived tolerance of ``assert_close_derived``."""
    assert out.dtype == lo.dtype and out.shape == lo.shape, (out.dtype, lo.dtype, out.shape, lo.shape)
    o, lw = out.double(), lo.double()
    assert torch.equal(o.isnan(), lw.isnan()), "NaN positions differ from the reference's"
    assert torch.equal(o.isinf(), lw.isinf()) and torch.equal(o[o.isinf()], lw[lw.isinf()]), \
        "±inf positions differ from the reference's"
    fin = lw.isfinite()
    zero = torch.zeros((), dtype=out.dtype, device=out.device)
    assert_close_derived(torch.where(fin, out, zero), torch.where(fin, hi.to(torch.float64), 0),
                         torch.where(fin, lo, zero))


def assert_fp8_linear_close(out, x, weight, weight_scale_inv, bias=None, scale_fmt=None, block=128) -> None:
    """``fp8_linear``'s output against its definition (quant_act, then the block-scaled GEMM in
    float32, plus the bias): within the FP8 GEMM bound of fp8_testing plus the bias rounding."""
    from fp8_testing import abs_fp8, assert_gemm_close

    from moela import reference as R

    q, s = R.quant_act(x.reshape(-1, x.shape[-1]), block, scale_fmt)
    ref32 = R.fp8_gemm(q, s, weight, weight_scale_inv, torch.float32, block)
    mag = R.fp8_gemm(abs_fp8(q), s.abs(), abs_fp8(weight), weight_scale_inv.abs(), torch.float32, block)
    extra = 0.0
    if bias is not None:
        extra = 2.0**-24 * (ref32.abs() + bias.abs().float()).double()
        ref32 = ref32 + bias.float()
    assert out.dtype == x.dtype and out.shape == (*x.shape[:-1], weight.shape[0])
    assert_gemm_close(out.reshape(-1, weight.shape[0]), ref32, mag, -(-x.shape[-1] // block), block, extra=extra)


# --------------------------------------------------------------------------- input transforms
def changed(build: Callable[[], dict], **changes) -> Callable[[], dict]:
    """``build`` with some arguments replaced (values, or functions of the built inputs)."""
    def make():
        inputs = build()
        for k, v in changes.items():
            inputs[k] = v(inputs) if callable(v) and not isinstance(v, type) else v
        return inputs
    return make


def map_plan(plan, fn):
    return _routing_plan()(*(fn(t) for t in plan))


def as_bytes(fn):
    """Apply a view-making ``fn`` to e4m3 tensors through their uint8 bits (not every op has fp8)."""
    @functools.wraps(fn)
    def apply(t):
        return fn(t.view(torch.uint8)).view(torch.float8_e4m3fn) if t.dtype == torch.float8_e4m3fn else fn(t)
    return apply


@as_bytes
def transposed(t):
    """Same values, the last two dims stored column-major."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2) if t.ndim >= 2 else t


@as_bytes
def strided(t):
    """Same values, every other element of a wider buffer (last-dim stride 2)."""
    return torch.stack([t, torch.zeros_like(t)], -1)[..., 0] if t.ndim >= 1 else t


@as_bytes
def expanded(t):
    """Row 0 repeated with stride 0 along the first dim."""
    return t[:1].expand(t.shape) if t.ndim >= 1 and t.shape[0] > 0 else t

def _routing_plan():
    from moela.reference import RoutingPlan

    return RoutingPlan


# --------------------------------------------------------------------------- running a row
def fake_inputs(inputs: dict, on_cuda: tuple[str, ...]) -> dict:
    """Fake tensors (call inside a FakeTensorMode): the ``on_cuda`` arguments on a fake "cuda"
    device (no CUDA needed), the others on a fake "cpu"."""
    def fake(v, device):
        if isinstance(v, _routing_plan()):
            return map_plan(v, lambda t: fake(t, device))
        if not isinstance(v, torch.Tensor):
            return v
        return torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=device)
    return {k: fake(v, "cuda" if k in on_cuda else "cpu") for k, v in inputs.items()}


def spec_of(out) -> list[tuple[tuple[int, ...], torch.dtype]]:
    return [(tuple(t.shape), t.dtype) for t in flat_tensors(out)]


def run_case(case: Case, compare: dict[str, Callable]) -> None:
    """Run one op row: the kernel (``moela.kernels.<op>``, or its ``.launch``) and the reference
    (``moela.reference.<op>``) on the built inputs, then what ``case.expect`` asks;
    ``compare[op](kernel_out, reference_out, inputs)`` asserts their agreement."""
    import moela.kernels as K
    import moela.reference as R

    inputs = case.build()
    expect = case.expect
    kernel = getattr(K, case.op)
    if case.fake_cuda is not None:
        from torch._subclasses.fake_tensor import FakeTensorMode

        real_spec = spec_of(getattr(R, case.op)(**inputs))
        with FakeTensorMode():
            fake = fake_inputs(inputs, case.fake_cuda)
            got = {side: outcome(fn, fake) for side, fn in (("kernel", kernel), ("reference", getattr(R, case.op)))
                   if side in case.sides}
            if isinstance(expect, Raises):
                for side, g in got.items():
                    check_raises(side, g, expect)
                return
            out = got["kernel"]
            if isinstance(out, BaseException):
                raise out
            assert spec_of(out) == real_spec
            assert all(t.device.type == "cuda" for t in flat_tensors(out))
        return
    if case.transform is not None:
        real_spec = spec_of(getattr(R, case.op)(**inputs))
        inputs = case.transform(inputs)
    got = {}
    if "kernel" in case.sides:
        got["kernel"] = outcome(kernel.launch if case.launch else kernel, inputs)
    if "reference" in case.sides:
        got["reference"] = outcome(getattr(R, case.op), {k: v for k, v in inputs.items() if k != "out"})

    if isinstance(expect, Raises):
        for side, g in got.items():
            check_raises(side, g, expect)
    elif isinstance(expect, KernelDomain):
        check_raises("kernel", got["kernel"], expect)
        assert "Triton" in str(got["kernel"]), f"a kernel domain error should say so: {got['kernel']}"
        if isinstance(got["reference"], BaseException):
            raise got["reference"]
    elif isinstance(expect, MetaShapes):
        k, r = got["kernel"], got["reference"]
        if isinstance(k, BaseException):
            raise k
        assert spec_of(k) == real_spec and all(t.is_meta for t in flat_tensors(k))
        if expect.ref_error is None:
            if isinstance(r, BaseException):
                raise r
            assert spec_of(r) == real_spec
        else:
            check_raises("reference", r, Raises(ValueError, expect.ref_error, "meta tensor"))
    else:
        for side, g in got.items():
            if isinstance(g, BaseException):
                raise AssertionError(f"{side} raised instead of computing: {type(g).__name__}: {g}") from g
        k = got.get("kernel")
        if "reference" in got:
            r = got["reference"]
            if k is None:
                k = r
            else:
                compare[case.op](k, r, {n: v for n, v in inputs.items() if n != "out"})
        elif case.launch:  # the kernel's out= buffer against the reference
            ref_inputs = {n: v for n, v in inputs.items() if n != "out"}
            compare[case.op](k, getattr(R, case.op)(**ref_inputs), ref_inputs)
        if expect.doc is not None:
            expect.doc(k, {n: v for n, v in inputs.items() if n != "out"})


# --------------------------------------------------------------------------- isolated cases
_TESTS = Path(__file__).resolve().parent


def run_isolated(module: str, ids: list[str], timeout: float = 300) -> dict[str, str]:
    """Run the cases ``ids`` of ``module``'s table in one fresh process (the same environment);
    returns ``{id: "PASS" | "FAIL <reason>" | "DIED <how>"}``. The child prints ``START<tab>id``
    before each case and ``PASS<tab>id`` or ``FAIL<tab>id<tab>reason`` after it, so a case that
    kills the process is the one without a result line."""
    code = (f"import sys; sys.path.insert(0, {str(_TESTS)!r}); import {module} as m; "
            f"m.run_cases_for_subprocess({ids!r})")
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=_TESTS.parent)
    results: dict[str, str] = {}
    started = None
    for line in proc.stdout.splitlines():
        tag, _, rest = line.partition("\t")
        if tag == "START":
            started = rest
        elif tag in ("PASS", "FAIL"):
            case, _, reason = rest.partition("\t")
            results[case] = tag if tag == "PASS" else f"FAIL {reason}"
            started = None
    if started is not None or proc.returncode != 0:
        how = f"the process exited with {proc.returncode}: {proc.stderr[-2000:]}"
        for i in ids:
            results.setdefault(i, f"DIED {how}" + (" (while running this case)" if i == started else ""))
    return results
