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
"""

from __future__ import annotations

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
    "flat_tensors", "run_isolated", "case_id", "assert_same_numbers", "assert_fp8_linear_close",
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
