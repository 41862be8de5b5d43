"""The repository's ``kernels/`` folder is only ever ``moela.kernels``: run from a checkout's root
(the root on ``sys.path``), a bare ``import kernels`` finds Hugging Face's package when it is
installed (transformers 5 depends on it) and fails as for a missing module when it is not."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_bare_kernels_is_never_the_repository_folder():
    r = _run("-c", "import kernels; print(kernels.__file__)")
    if r.returncode == 0:
        assert Path(r.stdout.strip()).resolve().parent != REPO / "kernels", r.stdout
    else:
        assert "ModuleNotFoundError: No module named 'kernels'" in r.stderr, r.stderr


def test_bare_kernels_without_the_package_is_a_missing_module():
    r = _run("-S", "-c", "import kernels")  # -S: no site-packages, so no Hugging Face package either
    assert r.returncode != 0
    assert "ModuleNotFoundError: No module named 'kernels' (the repository's kernels/ folder is moela.kernels)" \
        in r.stderr, r.stderr

