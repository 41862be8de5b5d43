"""Test-suite setup shared by tests/reference, tests/kernels, tests/model and tests/profiling.

- Without CUDA, Triton kernels run through the Triton interpreter: ``TRITON_INTERPRET=1`` is
  set here, before any kernel module is imported (triton reads it when ``@triton.jit``
  decorates a kernel), and the interpreter compatibility layer is installed
  (``moela.kernels.interpreter``: correct bf16 dots and float downcasts).
- ``@pytest.mark.gpu`` tests are skipped without CUDA ("needs a CUDA device"); ``slow`` tests
  run by default (deselect with ``-m "not slow"``).
- Hypothesis profiles: ``ci`` (default), ``dev`` and ``thorough``, chosen with
  ``HYPOTHESIS_PROFILE=<name>``.
- Every test starts from its own seed (a stable hash of its node id) for torch, random and
  numpy: inputs differ between tests but are the same on every run. Request the ``seed``
  fixture to read it.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

# Must run before anything imports a module that defines Triton kernels.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from moela_testing import seed_for  # noqa: E402

from moela.kernels.interpreter import install_compat, interpreter_active  # noqa: E402  (after TRITON_INTERPRET)

install_compat()  # a no-op unless the interpreter is active

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # hypothesis is a test extra; suites that use it import it themselves
    settings = None

if settings is not None:
    # Interpreted kernels take tens of milliseconds per example: no deadlines, no too_slow.
    _common = dict(deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("ci", max_examples=25, derandomize=False, **_common)
    settings.register_profile("dev", max_examples=10, derandomize=False, **_common)
    settings.register_profile("thorough", max_examples=300, derandomize=False, **_common)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """``MOELA_FAILURE_LOG=path``: append each failure's traceback to ``path`` as it happens, so a
    run cut short by a time limit (the one-shot GPU script) still says why tests failed."""
    path = os.environ.get("MOELA_FAILURE_LOG")
    if path and report.failed and not os.environ.get("PYTEST_XDIST_WORKER"):  # xdist: the controller writes
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"==== {report.nodeid} ({report.when})\n{report.longreprtext}\n\n")


def pytest_report_header(config: pytest.Config) -> str:
    import triton

    mode = "the Triton interpreter" if interpreter_active() else "CUDA"
    return f"moela: torch {torch.__version__}, triton {triton.__version__}, kernels on {mode}"


@pytest.fixture(scope="session")
def device() -> str:
    """The device tests allocate on: "cuda" when available, else "cpu" (kernels interpreted)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _release_cuda_memory():
    """Give the caching allocator's free blocks back after each test: test processes that share
    one GPU (pytest-xdist) need each other's memory for the DeepSeek-sized tests."""
    yield
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


@pytest.fixture(autouse=True)
def seed(request: pytest.FixtureRequest) -> int:
    """Seed torch (CPU and CUDA), random and numpy from a stable hash of the test's node id."""
    value = seed_for(request.node.nodeid)
    torch.manual_seed(value)
    random.seed(value)
    np.random.seed(value)  # noqa: NPY002 - tests may draw from numpy's global generator
    return value
