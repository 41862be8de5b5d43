"""Fixtures of the profiling tests: small fake ops registered for one test, result files."""

from __future__ import annotations

import pytest
import torch

from moela.profiling import registry
from moela.profiling.ops._common import close, generator, randn
from moela.profiling.registry import Case, Impl, Op
from moela.profiling.shapes import STANDARD_SETS, Problem


def fake_op(name: str = "zz_fake", kernel=None, flops_per_elem: float = 2.0) -> Op:
    """A tiny op: y = 2·x, reference and a torch baseline; ``kernel`` as Op.kernel."""

    def make_case(p: Problem, device: torch.device, seed: int) -> Case:
        n = p.params["n"]
        x = randn((n,), torch.float32, device, generator(device, seed))
        return Case(p, {"x": x}, flops=flops_per_elem * n, bytes=8.0 * n)

    sets = {s: [Problem(name, s, f"n={n}", {"series": "x", "tokens": n, "n": n}) for n in (16, 64)]
            for s in (*STANDARD_SETS, "extra")}
    return Op(
        name=name, summary="y = 2x", make_case=make_case, signature=lambda c: ((c.inputs["x"],), {}),
        reference=lambda x: 2 * x, shape_sets=sets, compare=close(1e-12),
        kernel=kernel if kernel is not None else f"{name}_missing_kernel",
        baselines=(Impl("torch mul", lambda c: (lambda: c.inputs["x"] * 2)),),
        baseline_order=("torch mul", "reference"), compute="none",
    )


@pytest.fixture(name="fake_op")
def fake_op_fixture():
    """The :func:`fake_op` factory."""
    return fake_op


@pytest.fixture
def register_op():
    """Register ops for one test; they are removed afterwards."""
    added: list[str] = []

    def add(op: Op) -> Op:
        registry.all_ops()  # load the real ops first
        registry.register(op)
        added.append(op.name)
        return op

    yield add
    for name in added:
        registry._OPS.pop(name, None)

