"""Helpers of the tests that compare moela with Hugging Face transformers (an optional extra).

Import as ``import hf_testing`` (pyproject puts tests/ on the path). :func:`import_transformers`
skips the calling test module without transformers >= 5.

transformers 5 imports the ``kernels`` package (Hugging Face's, one of its dependencies). When
the repository root is on ``sys.path`` (``python -m pytest`` run from it), the repository's own
``kernels/`` folder is found first under that bare name and transformers' import fails;
:func:`import_transformers` imports the real package once with the root left out of the path.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]


def _is_repo_root(entry: str) -> bool:
    try:
        return Path(entry or ".").resolve() == REPO
    except OSError:
        return False


def import_transformers() -> ModuleType:
    """``transformers`` (>= 5), or skip the calling module with the reason."""
    transformers = pytest.importorskip("transformers", minversion="5.0",
                                       reason="needs transformers >= 5 (an optional extra)")
    spec = importlib.util.find_spec("kernels") if "kernels" not in sys.modules else None
    if spec is not None and spec.origin and Path(spec.origin).resolve().parent == REPO / "kernels":
        saved = sys.path[:]
        sys.path[:] = [p for p in sys.path if not _is_repo_root(p)]
        try:
            importlib.import_module("kernels")
        except ImportError:
            pass  # not installed: transformers then runs without it
        finally:
            sys.path[:] = saved
    return transformers
