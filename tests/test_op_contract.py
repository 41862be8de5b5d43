"""Every public op is one name in five places: the reference and its contract, the kernel (made by
the op factory), a test file, a profiling op and a README row; kernel and reference signatures
are equal."""

import inspect
from pathlib import Path

import pytest

import moela.kernels as K
import moela.reference as R
from moela.profiling.registry import all_ops

ROOT = Path(__file__).resolve().parents[1]
PUBLIC = [n for n in K.__all__ if n != "registered_ops"]


def _params(fn):
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("name", PUBLIC)
def test_kernel_and_reference_share_a_signature(name):
    assert _params(getattr(K, name)) == _params(getattr(R, name)), (
        f"{name}: moela.kernels{inspect.signature(getattr(K, name))} != "
        f"moela.reference{inspect.signature(getattr(R, name))}")


@pytest.mark.parametrize("name", PUBLIC)
def test_every_op_has_its_five_places(name):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"| `{name}` |" in readme, f"{name}: no row in the README's contract table"
    assert name in all_ops(), f"{name}: no profiling op (profiling/ops/{name}.py)"
    tests = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "tests" / "kernels").glob("test_*.py"))
    assert f"{name}(" in tests, f"{name}: no kernel test calls it"
    ref_module = inspect.getmodule(getattr(R, name))
    assert hasattr(ref_module, f"check_{name}"), f"{name}: no check_{name} contract beside its reference"


def test_kernel_ops_come_from_the_factory():
    """Each public kernel op is the factory's public function, or an adapter over factory ops
    (a RoutingPlan or an fp8 switch in the signature, or a composite: gate)."""
    ops = K.registered_ops()
    made = {op.public for op in ops.values()}
    adapters = {"permute", "unpermute", "swiglu", "gate"}
    for name in PUBLIC:
        fn = getattr(K, name)
        assert fn in made or name in adapters, f"{name}: not made by kernels.factory"
