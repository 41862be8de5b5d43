"""moela.knobs: every switch declared once, read at call time."""

import os
from unittest import mock

import pytest

from moela import knobs


def test_get_reads_the_environment_now(monkeypatch):
    monkeypatch.delenv("MOELA_TMA", raising=False)
    assert knobs.get("MOELA_TMA") == "1"  # the default
    monkeypatch.setenv("MOELA_TMA", " 0 ")
    assert knobs.get("MOELA_TMA") == "0"  # stripped
    monkeypatch.setenv("MOELA_TMA", "  ")
    assert knobs.get("MOELA_TMA") == "1"  # empty: the default
    with mock.patch.dict(os.environ, {"MOELA_TMA": "0"}):
        assert knobs.get("MOELA_TMA") == "0"
    monkeypatch.delenv("MOELA_TMA")
    assert knobs.get("MOELA_TMA") == "1"
    os.environ["MOELA_GROUPED_GEMM_FWD_DECODE_CONFIG"] = "BLOCK_M=16"
    try:
        assert knobs.get("MOELA_GROUPED_GEMM_FWD_DECODE_CONFIG") == "BLOCK_M=16"  # a family member
    finally:
        del os.environ["MOELA_GROUPED_GEMM_FWD_DECODE_CONFIG"]
    assert knobs.get("MOELA_GROUPED_GEMM_FWD_DECODE_CONFIG") is None


def test_every_declared_knob_reads_what_os_environ_holds(monkeypatch):
    for i, knob in enumerate(k for k in knobs.KNOBS if "<" not in k.name):
        monkeypatch.setenv(knob.name, f"v{i}")
        assert knobs.get(knob.name) == os.environ[knob.name] == f"v{i}"
        monkeypatch.delenv(knob.name)
        assert knobs.get(knob.name) == knob.default


def test_a_replaced_environ_is_still_read(monkeypatch):
    monkeypatch.setattr(os, "environ", {**os.environ, "MOELA_AUTOTUNE": "0"})
    assert knobs.get("MOELA_AUTOTUNE") == "0"


def test_undeclared_names_raise():
    with pytest.raises(KeyError, match="MOELA_NOPE: not a declared moela knob"):
        knobs.get("MOELA_NOPE")


def test_every_switch_gpu_run_sh_reads_is_declared():
    """profiling/gpu_run.sh's switches are moela knobs too (``python -m moela.profiling list`` shows them)."""
    import re
    from pathlib import Path

    import moela.profiling

    script = (Path(moela.profiling.__file__).parent / "gpu_run.sh").read_text()
    names = set(re.findall(r"\$\{?(MOELA_[A-Z0-9_]+)", script))
    assert {"MOELA_TUNE_SECONDS", "MOELA_SANITIZE", "MOELA_SKIP_TESTS"} <= names
    undeclared = sorted(n for n in names if n not in {k.name for k in knobs.KNOBS})
    assert not undeclared, f"gpu_run.sh reads undeclared switches: {undeclared} (add them to moela.knobs.KNOBS)"
