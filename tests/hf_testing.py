"""Helpers of the tests that compare moela with Hugging Face transformers (an optional extra).

Import as ``import hf_testing`` (pyproject puts tests/ on the path). :func:`import_transformers`
skips the calling test module without transformers >= 5.

transformers 5 imports Hugging Face's ``kernels`` package; with the repository root on
``sys.path`` (``python -m pytest`` run from it) the bare name finds the repository's
``kernels/`` folder first, which hands the name over to Hugging Face's package
(``kernels/__init__.py``), so nothing here needs to work around it.
"""

from __future__ import annotations

from types import ModuleType

import pytest


def import_transformers() -> ModuleType:
    """``transformers`` (>= 5), or skip the calling module with the reason."""
    return pytest.importorskip("transformers", minversion="5.0", reason="needs transformers >= 5 (an optional extra)")
