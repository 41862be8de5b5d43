"""The Triton interpreter without an explicit compatibility-layer call: no silent wrong numbers.

- A fresh process with only ``TRITON_INTERPRET=1`` set (nothing calls ``install_compat``) runs
  ``moela.model.MoE(backend="triton")`` in bf16 bitwise equal to the same layer (same seed) in a
  process that installs the layer explicitly, and both agree with the reference layer within the
  derived tolerance (before the layer was installed on import, the first was off by ~1e11).
- With the layer uninstalled, a launch on CPU tensors refuses with a RuntimeError naming the
  argument and saying what to call; on the direct path and through the custom op alike.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from moela_testing import assert_close_derived
from torch.utils._python_dispatch import TorchDispatchMode

import moela.kernels as K
from moela.kernels.interpreter import compat_disabled, compat_installed, interpreter_active

CHILD = r"""
import sys
import torch

explicit, out = sys.argv[1] == "explicit", sys.argv[2]
if explicit:
    from moela.kernels import interpreter

    interpreter.uninstall_compat()
    assert interpreter.install_compat()
from moela.kernels.interpreter import compat_installed
from moela.model import MoE
from moela import reference

args = reference.ModelArgs.from_name("tiny", backend="triton")
torch.manual_seed(0)
layer = MoE(args)
with torch.no_grad():
    for p in layer.parameters():
        p.normal_(0, 0.3)
ref = reference.MoE(args)
ref.load_state_dict(layer.state_dict())
x = torch.randn(2, 5, args.dim)
with torch.no_grad():
    y = layer.bfloat16()(x.bfloat16())
    y_ref = ref.bfloat16()(x.bfloat16())
    y_exact = ref.double()(x.double())
torch.save({"installed": compat_installed(), "y": y, "y_ref": y_ref, "y_exact": y_exact}, out)
"""


def _env_with_only_the_interpreter() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRITON_", "MOELA_"))}
    env["TRITON_INTERPRET"] = "1"
    return env


def test_only_triton_interpret_runs_moe_bitwise_as_with_the_layer_installed(tmp_path: Path):
    procs = {
        mode: subprocess.Popen([sys.executable, "-c", CHILD, mode, str(tmp_path / f"{mode}.pt")],
                               env=_env_with_only_the_interpreter(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=tmp_path)
        for mode in ("implicit", "explicit")
    }
    runs = {}
    for mode, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{mode}: exited with {proc.returncode}: {err[-3000:]}"
        runs[mode] = torch.load(tmp_path / f"{mode}.pt")
    implicit, explicit = runs["implicit"], runs["explicit"]
    assert implicit["installed"], "importing moela.kernels under TRITON_INTERPRET=1 must install the layer"
    assert implicit["y"].dtype == torch.bfloat16
    assert torch.equal(implicit["y"].view(torch.int16), explicit["y"].view(torch.int16))
    assert_close_derived(implicit["y"], implicit["y_exact"], implicit["y_ref"], name="y")


@pytest.mark.skipif(not interpreter_active(), reason="the compatibility layer exists under the interpreter only")
def test_without_the_layer_a_cpu_launch_refuses_and_says_what_to_do():
    xs = torch.randn(6, 16, dtype=torch.bfloat16)
    w = torch.randn(2, 8, 16, dtype=torch.bfloat16)
    offsets = torch.tensor([3, 6], dtype=torch.int32)

    class Through(TorchDispatchMode):  # any dispatch mode sends the call through the custom op
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with compat_disabled():
        assert not compat_installed()
        for path in ("direct", "op"):
            with pytest.raises(RuntimeError) as info:
                if path == "op":
                    with Through():
                        K.grouped_gemm(xs, w, offsets)
                else:
                    K.grouped_gemm(xs, w, offsets)
            msg = str(info.value)
            assert msg.startswith("xs: "), msg
            assert "moela.kernels.interpreter.install_compat()" in msg, msg
        with pytest.raises(RuntimeError, match=r"install_compat\(\)"):
            K.quant_act(xs)
    assert compat_installed()
    assert K.grouped_gemm(xs, w, offsets).shape == (6, 8)
