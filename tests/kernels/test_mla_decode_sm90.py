"""mla_decode's configs in an sm_90 compile (no GPU): what ``CONFIGS`` and ``smem_bytes`` say
is what Triton and ptxas produce.

One child process (without TRITON_INTERPRET) runs ``python -m moela.profiling audit`` over the
decode kernel's launches (``moela.profiling.audit_shapes``: every config at FlashMLA's shapes,
paged, FP8, lse and float32 variants). For each: no spills, the shared memory
:func:`~moela.kernels.mla_decode.smem_bytes` predicts (the launcher's choice of parts depends on
it), the CTAs per SM the table records, and at the representative launches the table's
register count. The numbers are Triton 3.6's (the version CI pins).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import triton

from moela.kernels.mla_decode import CONFIGS, config_for, smem_bytes
from moela.profiling.audit_shapes import launches

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not triton.__version__.startswith("3.6"),
                       reason=f"the recorded compile numbers are triton 3.6's, this is {triton.__version__}"),
]


@pytest.fixture(scope="module")
def findings(tmp_path_factory) -> dict[str, dict]:
    path = tmp_path_factory.mktemp("audit") / "mla.json"
    env = {k: v for k, v in os.environ.items()
           if k != "TRITON_INTERPRET" and not (k.startswith("MOELA_") and k.endswith("_CONFIG"))}
    proc = subprocess.run([sys.executable, "-m", "moela.profiling", "audit", "--kernels", "mla_decode_fwd",
                           "--arch", "90", "--jobs", "2", "--json", str(path)],
                          env=env, capture_output=True, text=True, timeout=900, check=False)
    if not path.exists():
        pytest.fail(f"the audit wrote no JSON (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return {f["launch"]: f for f in json.loads(path.read_text())["findings"]}


def _kind(args: dict) -> tuple[str, torch.dtype, bool]:
    fp8 = args["FP8"]
    dtype = args["q_ptr"].dtype
    return ("fp8" if fp8 else "fp32" if dtype == torch.float32 else "16-bit"), dtype, fp8


@pytest.mark.parametrize("launch", launches("mla_decode_fwd"), ids=lambda launch: launch.label)
def test_compile_matches_the_config_table(findings, launch):
    f = findings[launch.label]
    assert f["error"] is None, f["error"]
    args, opts = launch.args, launch.options
    kind, dtype, fp8 = _kind(args)
    choice = config_for(args["S"] * args["H"], dtype, fp8)
    assert (choice.block_h, choice.block_n, choice.num_warps, choice.num_stages) == (
        args["BLOCK_H"], args["BLOCK_N"], opts["num_warps"], opts["num_stages"])
    assert f["spill_stores"] == 0 and f["spill_loads"] == 0 and f["stack"] == 0, f
    assert f["smem"] == smem_bytes(kind, choice.block_h, choice.block_n, choice.num_stages, args["BLOCK_DV"],
                                   args["BLOCK_DR"]), f
    assert f["ctas_per_sm"] == choice.ctas_per_sm, f
    plain = args["S"] == 1 and args["HAS_SEQLENS"] and not args["PAGED"] and not args["WRITE_LSE"]
    if plain:  # the table's registers are those of the plain launch (variants differ by a few)
        assert f["regs"] == choice.regs, f


def test_every_config_is_audited(findings):
    seen = set()
    for launch in launches("mla_decode_fwd"):
        kind, dtype, fp8 = _kind(launch.args)
        seen.add(config_for(launch.args["S"] * launch.args["H"], dtype, fp8))
    assert seen == set(CONFIGS)


def test_smem_model_on_configs_outside_the_table():
    """The model on configs the compile was read for while choosing (the issue's 16×64, 3 stages:
    164 KB, not the old estimate's 234 KB)."""
    assert smem_bytes("16-bit", 16, 64, 3) == 167936
    assert smem_bytes("16-bit", 16, 32, 2) == 56320
    assert smem_bytes("16-bit", 64, 16, 3) == 131072  # the epilogue's float32 o tile
    assert smem_bytes("fp8", 16, 32, 1) == 55296
    assert smem_bytes("fp32", 16, 32, 2) == 176128
