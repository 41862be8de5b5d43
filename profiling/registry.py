"""The op registry: for each op, its problem sets, how to build inputs, what to count, and
which implementations to run (the moela kernel, the reference, torch baselines).

An op is one module in ``moela.profiling.ops`` that calls :func:`register` (discovered
automatically; see ``ops/__init__.py`` for a template). The moela kernel of op ``foo`` is the
attribute ``moela.kernels.foo``, resolved lazily on every run: where it does not exist yet
the op still runs its reference and baselines, and the kernel is skipped with the reason
"not implemented in moela.kernels yet". Once the kernel lands it is checked and benchmarked
with no change here.

Terms:

- :class:`Problem` (``moela.profiling.shapes``): a named shape, JSON-able parameters.
- :class:`Case`: the inputs of one problem on one device, with the FLOPs and the fewest bytes
  the op must move (each input read once, each output written once).
- :class:`Impl`: one way to compute the op. ``prepare(case)`` does everything that must stay
  outside the timed region (layout changes, host-side group sizes) and returns the
  zero-argument callable that is timed; it raises :class:`Unavailable` with a reason where
  the implementation cannot run (an API missing from this torch, an unsupported GPU).
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch

from .shapes import STANDARD_SETS, Problem, duplicate_names

__all__ = [
    "NOT_IMPLEMENTED", "Case", "Check", "Impl", "Op", "Unavailable",
    "all_ops", "get_op", "register", "resolve_kernel", "expand_sets", "make_plan", "SET_PRIORITY", "warm_groups",
]

NOT_IMPLEMENTED = "not implemented in moela.kernels yet"

#: What an op's FLOPs run on, which picks the compute ceiling a result is compared with.
COMPUTE_KINDS = ("bf16", "fp8", "none")


class Unavailable(Exception):
    """An implementation cannot run here; the message says why (it is shown as the skip reason)."""


@dataclass
class Case:
    """The inputs of one problem on one device, and what the op must at least do with them."""

    problem: Problem
    inputs: dict[str, Any]
    flops: float  # floating-point operations the op must do (a multiply-add counts 2)
    bytes: float  # fewest bytes it must move: each input read once, each output written once
    info: dict[str, Any] = field(default_factory=dict)  # e.g. rows, active experts (JSON-able)

    def allocated_bytes(self) -> int:
        """Bytes held by the tensor inputs (what one more rotation set costs in memory)."""
        total = 0
        for v in self.inputs.values():
            for t in v if isinstance(v, tuple) else (v,):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total


@dataclass(frozen=True)
class Check:
    """The outcome of comparing one output with the reference's."""

    metric: str
    value: float
    tol: float
    ok: bool
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "value": self.value, "tol": self.tol, "ok": self.ok, "detail": self.detail}


@dataclass(frozen=True)
class Impl:
    """One implementation of an op.

    kind: "moela" (the kernel), "reference" (moela.reference), "torch" (a native baseline) or
    "outside" (a library beside torch: DeepGEMM, vLLM, FlashMLA, sgl_kernel, transformers; skipped
    with the reason where it is not installed, see ``ops/_outside.py``).
    same_function: its output is compared with the reference's; False for baselines that do
    different arithmetic on the same shapes (bf16 matmul next to an FP8 GEMM, dense next
    to grouped), which are there for their speed only.
    """

    name: str
    prepare: Callable[[Case], Callable[[], Any]]
    kind: str = "torch"
    same_function: bool = True
    note: str = ""


@dataclass(frozen=True)
class Op:
    """Everything the harness needs to check and benchmark one op.

    Args:
        name: the op's name in the contract (README); ``moela.kernels.<kernel>`` is its kernel.
        summary: one line for listings.
        make_case: ``(problem, device, seed) -> Case``; random inputs (never zeros) from ``seed``.
        signature: ``case -> (args, kwargs)`` of the reference and the kernel (same signature).
        reference: the ``moela.reference`` function, or None (then ``reference_missing`` says why).
        shape_sets: set name -> problems; must include ``tiny``, ``check`` and ``quick``.
        compare: ``(out, expected) -> Check``.
        kernel: attribute of ``moela.kernels``, or a zero-argument resolver returning the
            callable (composite ops); it raises :class:`Unavailable` where a part is missing.
        baselines: torch-native implementations.
        baseline_order: speedups are over the first of these that ran (same problem, same run).
        truth: the implementation whose output the others are compared with.
        compute: "bf16", "fp8" or "none": which compute ceiling applies.
        warm_alone: compiles many configs (the GEMMs): the GPU script warms it in a process of its own.
    """

    name: str
    summary: str
    make_case: Callable[[Problem, torch.device, int], Case]
    signature: Callable[[Case], tuple[tuple, dict]]
    reference: Callable[..., Any] | None
    shape_sets: Mapping[str, Sequence[Problem]]
    compare: Callable[[Any, Any], Check]
    kernel: str | Callable[[], Callable[..., Any]] | None = None
    baselines: Sequence[Impl] = ()
    baseline_order: tuple[str, ...] = ("reference",)
    truth: str = "reference"
    compute: str = "bf16"
    reference_missing: str = ""
    warm_alone: bool = False

    def __post_init__(self) -> None:
        missing = [s for s in STANDARD_SETS if s not in self.shape_sets]
        if missing:
            raise ValueError(f"op {self.name!r}: shape sets {missing} are missing (every op has {STANDARD_SETS})")
        for set_name, problems in self.shape_sets.items():
            if not problems:
                raise ValueError(f"op {self.name!r}: shape set {set_name!r} is empty")
            for p in problems:
                if p.op != self.name or p.set != set_name:
                    raise ValueError(f"op {self.name!r}: problem {p.key} is filed under set {set_name!r}")
            dup = duplicate_names(problems)
            if dup:
                raise ValueError(f"op {self.name!r}: set {set_name!r} repeats problem names {dup}")
        if self.compute not in COMPUTE_KINDS:
            raise ValueError(f"op {self.name!r}: compute must be one of {COMPUTE_KINDS}, got {self.compute!r}")
        names = [i.name for i in self.impls()]
        if len(set(names)) != len(names):
            raise ValueError(f"op {self.name!r}: implementation names repeat: {names}")
        if self.truth not in names:
            raise ValueError(f"op {self.name!r}: truth {self.truth!r} is not one of its implementations {names}")

    # ---------------------------------------------------------------- implementations
    def impls(self) -> list[Impl]:
        """moela, reference, then the baselines, in the order they run."""
        return [self._moela_impl(), self._reference_impl(), *self.baselines]

    def impl(self, name: str) -> Impl:
        for i in self.impls():
            if i.name == name:
                return i
        raise KeyError(f"op {self.name!r} has no implementation {name!r}; it has {[i.name for i in self.impls()]}")

    def resolve_kernel(self) -> Callable[..., Any]:
        """The moela kernel, looked up now; :class:`Unavailable` where it does not exist yet."""
        if self.kernel is None:
            raise Unavailable(NOT_IMPLEMENTED)
        if callable(self.kernel):
            return self.kernel()
        return resolve_kernel(self.kernel)

    def _moela_impl(self) -> Impl:
        def prepare(case: Case) -> Callable[[], Any]:
            fn = self.resolve_kernel()
            args, kwargs = self.signature(case)
            return lambda: fn(*args, **kwargs)

        return Impl("moela", prepare, kind="moela")

    def _reference_impl(self) -> Impl:
        def prepare(case: Case) -> Callable[[], Any]:
            if self.reference is None:
                raise Unavailable(self.reference_missing or "no reference")
            args, kwargs = self.signature(case)
            ref = self.reference
            return lambda: ref(*args, **kwargs)

        return Impl("reference", prepare, kind="reference")

    # ---------------------------------------------------------------- shapes
    def problems(self, set_name: str) -> list[Problem]:
        if set_name not in self.shape_sets:
            raise KeyError(f"op {self.name!r} has no shape set {set_name!r}; it has {sorted(self.shape_sets)}")
        return list(self.shape_sets[set_name])

    def full_sets(self) -> list[str]:
        """The op-specific sets (everything but tiny/check/quick): the ``full`` alias."""
        return [s for s in self.shape_sets if s not in STANDARD_SETS]


def resolve_kernel(name: str) -> Callable[..., Any]:
    """``moela.kernels.<name>``, looked up at call time.

    Falls back to the function ``<name>`` of a module ``moela.kernels.<name>`` that the package
    does not re-export. Raises :class:`Unavailable` ("not implemented in moela.kernels yet")
    where neither exists; an error while importing an existing kernel module propagates (a
    broken kernel is an error, not a skip).
    """
    kernels = importlib.import_module("moela.kernels")
    fn = getattr(kernels, name, None)
    if fn is None and importlib.util.find_spec(f"moela.kernels.{name}") is not None:
        fn = importlib.import_module(f"moela.kernels.{name}")
    if isinstance(fn, ModuleType):
        fn = getattr(fn, name, None)
    if not callable(fn):
        raise Unavailable(NOT_IMPLEMENTED)
    return fn


# -------------------------------------------------------------------- the registry
_OPS: dict[str, Op] = {}
_LOADED = False


def register(op: Op) -> Op:
    """Add an op (called by its module in ``moela.profiling.ops`` at import)."""
    if op.name in _OPS and _OPS[op.name] is not op:
        raise ValueError(f"op {op.name!r} is registered twice")
    _OPS[op.name] = op
    return op


def _load() -> None:
    global _LOADED
    if _LOADED:
        return
    from . import ops as ops_pkg

    for mod in pkgutil.iter_modules(ops_pkg.__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{ops_pkg.__name__}.{mod.name}")
    _LOADED = True


def all_ops() -> dict[str, Op]:
    """Every registered op by name, in the contract's order where known."""
    _load()
    order = {name: i for i, name in enumerate(CONTRACT_ORDER)}
    return dict(sorted(_OPS.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))


def warm_groups(ops: Mapping[str, Op] | None = None) -> list[list[str]]:
    """How the GPU script splits its compile warm-up over processes: each ``warm_alone`` op on
    its own, the others in two groups (every op exactly once)."""
    ops = all_ops() if ops is None else ops
    rest = [n for n, op in ops.items() if not op.warm_alone]
    return [[n] for n, op in ops.items() if op.warm_alone] + [g for g in (rest[0::2], rest[1::2]) if g]


def get_op(name: str) -> Op:
    ops = all_ops()
    if name not in ops:
        raise KeyError(f"unknown op {name!r}; known ops: {', '.join(ops)}")
    return ops[name]


CONTRACT_ORDER = (
    "route", "gate", "make_routing", "permute", "unpermute", "moe_dispatch_combine", "grouped_gemm", "swiglu",
    "quant_act", "quant_weight", "dequant", "fp8_gemm", "fp8_grouped_gemm", "fp8_grouped_gemm_masked", "fp8_linear",
    "mla_decode",
)


#: Order in which ``full`` runs the op-specific sets (the anchors' grids first), so that a time
#: budget cuts the least important problems. Sets not named here run last.
SET_PRIORITY = (
    "tiny", "check", "quick", "deepgemm-dense", "deepgemm-grouped", "flashmla-decode", "flashmla-ragged",
    "flashmla-fp8", "flashmla-paged", "v3-decode", "v3-prefill",
    "v3-linear", "deepseek", "v2lite-decode", "v2lite-prefill",
)


def expand_sets(op: Op, names: Sequence[str]) -> list[str]:
    """Set names for ``op`` from CLI words: a set name, ``full`` (its op-specific sets) or ``all``.

    Names an op does not have are left out (``v3-decode`` means nothing to ``quant_weight``);
    the CLI checks that every word means something to at least one op.
    """
    out: list[str] = []
    for n in names:
        if n == "full":
            picked = op.full_sets()
        elif n == "all":
            picked = list(op.shape_sets)
        else:
            picked = [n] if n in op.shape_sets else []
        out += [s for s in picked if s not in out]
    return out


def make_plan(ops: Sequence[Op], words: Sequence[str], interleave: bool = False) -> list[tuple[Op, Problem]]:
    """Every (op, problem) the CLI words select, set by set: each word in turn, within a word the
    sets in ``SET_PRIORITY`` order, within a set the ops in the given order.

    ``interleave``: the ops take turns instead (every op's first problem, then every op's
    second, ..., each op's problems in the order above), so that a time budget that cuts the
    sweep short leaves every op its most important problems rather than some ops none.
    """
    entries = []
    for oi, op in enumerate(ops):
        for s in expand_sets(op, words):
            word = next(i for i, w in enumerate(words) if w in (s, "all") or (w == "full" and s in op.full_sets()))
            prio = SET_PRIORITY.index(s) if s in SET_PRIORITY else len(SET_PRIORITY)
            entries += [((word, prio, oi, pi), op, p) for pi, p in enumerate(op.problems(s))]
    entries.sort(key=lambda e: e[0])
    plan = [(op, p) for _, op, p in entries]
    if interleave:
        rank: dict[str, int] = {}
        keyed = []
        for op, p in plan:
            keyed.append(((rank.get(op.name, 0), ops.index(op)), op, p))
            rank[op.name] = rank.get(op.name, 0) + 1
        keyed.sort(key=lambda e: e[0])
        plan = [(op, p) for _, op, p in keyed]
    return plan
