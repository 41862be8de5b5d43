"""Baselines from outside torch (profiling/ops/_outside.py): a missing or broken package is a skip
with its reason, never an error; DeepGEMM's contiguous layout is built right."""

from __future__ import annotations

import importlib
import importlib.util

import pytest
import torch

from moela.profiling import all_ops, get_op
from moela.profiling.ops import _outside
from moela.profiling.registry import make_plan
from moela.profiling.runner import BenchSettings, run_bench

OUTSIDE_OPS = ("route", "grouped_gemm", "fp8_gemm", "fp8_grouped_gemm", "mla_decode", "moe_layer",
               "moe_layer_fwd_bwd", "moe_layer_fp8")


def _outside_rows(ops=OUTSIDE_OPS):
    plan = [(op, p) for op, p in make_plan([get_op(n) for n in ops], ["tiny"])]
    plan = list({op.name: (op, p) for op, p in plan}.values())  # one problem per op is enough
    rows = run_bench(plan, {}, BenchSettings(torch.device("cpu"), impls=["outside"], rep_ms=1, progress=False,
                                             telemetry=False))
    return [r for r in rows if r["kind"] == "outside"]


def test_every_outside_package_has_a_baseline():
    impls = [i for op in all_ops().values() for i in op.impls() if i.kind == "outside"]
    assert {op for op in OUTSIDE_OPS} == {n for n, op in all_ops().items()
                                          if any(i.kind == "outside" for i in op.impls())}
    notes = " ".join(i.note for i in impls).lower()
    for what in ("deepgemm", "vllm", "flashmla", "sgl_kernel", "transformers"):
        assert what in notes, what


def test_a_missing_package_is_a_skip_with_its_reason(monkeypatch):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):  # every outside package absent, whatever this machine has
        return None if name.split(".")[0] in _outside.PACKAGES else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    rows = _outside_rows()
    assert {r["op"] for r in rows} == set(OUTSIDE_OPS)
    for r in rows:
        package = next(p for p in _outside.PACKAGES if f"{p} is not installed" in r["reason"])
        assert r["status"] == "skipped" and _outside.PACKAGES[package] in r["reason"], r


def test_a_package_that_fails_to_import_is_a_skip_with_the_error(monkeypatch):
    real_find, real_import = importlib.util.find_spec, importlib.import_module
    fake = importlib.machinery.ModuleSpec("deep_gemm", None)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: fake if name == "deep_gemm" else real_find(name, *a, **k))

    def import_module(name, *args, **kwargs):
        if name == "deep_gemm":
            raise ImportError("libcudart.so.13: cannot open shared object file")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", import_module)
    rows = _outside_rows(("fp8_gemm",))
    deepgemm = next(r for r in rows if r["impl"] == "deepgemm")
    assert deepgemm["status"] == "skipped"
    assert deepgemm["reason"] == ("DeepGEMM fp8_gemm_nt: importing deep_gemm failed: ImportError: libcudart.so.13: "
                                  "cannot open shared object file")


def test_deepgemm_contiguous_layout_pads_each_group_and_keeps_the_rows():
    sizes = [0, 5, 0, 3]
    gather, groups, keep = _outside._contiguous_layout(sizes, 4, torch.device("cpu"))
    assert gather.tolist() == [0, 1, 2, 3, 4, -1, -1, -1, 5, 6, 7, -1]
    assert groups.tolist() == [1, 1, 1, 1, 1, -1, -1, -1, 3, 3, 3, -1]
    assert keep.tolist() == [0, 1, 2, 3, 4, 8, 9, 10]
    x = torch.randn(8, 16).to(torch.float8_e4m3fn)
    padded = _outside._pad_rows(x, gather)
    assert padded.dtype == x.dtype and padded.shape == (12, 16)
    assert torch.equal(padded[keep].view(torch.uint8), x.view(torch.uint8))
    assert not padded[gather < 0].view(torch.uint8).any()  # padding rows are zeros
    assert _outside._contiguous_layout([4, 8], 4, torch.device("cpu"))[2] is None  # aligned: nothing to undo


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed")
def test_transformers_grouped_mm_layer_matches_the_reference_on_cpu():
    rows = [r for r in _outside_rows(("moe_layer",)) if r["impl"] == "transformers grouped_mm"]
    assert rows and rows[0]["status"] == "ok" and rows[0]["check"]["ok"], rows
