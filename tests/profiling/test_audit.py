"""profiling.audit: every Triton kernel of moela.kernels compiled for sm_90 (no GPU) and held to
the audit's rules.

The audit runs once per session, in a child process without TRITON_INTERPRET (it compiles the
real kernels), over every config each kernel's pruner keeps at its representative DeepSeek launch
(``--quick``; the full shape sweep is ``python -m moela.profiling audit``). The rule tests read
its JSON, one test per (rule, kernel). ``KNOWN_VIOLATIONS`` lists exactly which configs break a
rule today: those tests are expected failures, and any change to the list of breaking configs (a
kernel fixed, or a new break) fails them until the list is updated.

The detectors themselves are checked on small probe kernels with known answers
(``audit_probes.py``) and on hand-written PTX, ptxas logs and findings.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from moela.profiling.audit import RULES, Finding, ctas_per_sm, main_loop_loads, parse_ptxas, violations
from moela.profiling.audit_shapes import LAUNCHES

pytestmark = pytest.mark.slow  # compiles every kernel for sm_90: about a minute on a 2-core CPU

#: (rule, kernel) -> the configs that break it on sm_90 today, and why.
KNOWN_VIOLATIONS: dict[tuple[str, str], tuple[set[str], str]] = {}


class RuleBroken(AssertionError):
    """A rule broken by exactly the configs ``KNOWN_VIOLATIONS`` lists (the expected failure)."""


def _audit_env() -> dict[str, str]:
    """The environment without the interpreter and without config pins (every config is audited)."""
    pinned = lambda k: k == "MOELA_AUTOTUNE" or (k.startswith("MOELA_") and k.endswith("_CONFIG"))
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" and not pinned(k)}


def _run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)


@pytest.fixture(scope="session")
def report(tmp_path_factory) -> dict:
    """The sm_90 audit of every kernel at its representative launch (one child process, 2 compiles at a time)."""
    path = tmp_path_factory.mktemp("audit") / "audit.json"
    proc = _run([sys.executable, "-m", "moela.profiling", "audit", "--quick", "--arch", "90", "--jobs", "2",
                 "--json", str(path)], _audit_env())
    if not path.exists():
        pytest.fail(f"the audit wrote no JSON (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------- coverage
def test_every_kernel_has_audit_launches(report):
    assert report["unaudited"] == [], (
        f"kernels of moela.kernels without launches in moela.profiling.audit_shapes.LAUNCHES: {report['unaudited']} "
        "(add their DeepSeek shapes there)")
    assert report["stale"] == [], f"audit_shapes.LAUNCHES entries that match no kernel: {report['stale']}"


def test_every_config_compiles(report):
    errors = [(f["kernel"], f["config"], f["error"]) for f in report["findings"] if f["error"]]
    assert not errors, errors
    assert {f["kernel"] for f in report["findings"]} == set(LAUNCHES)
    assert {f["arch"] for f in report["findings"]} == {90}


def test_findings_are_read(report):
    """Every compile has its registers, shared memory and occupancy read; the GEMMs issue MMAs."""
    for f in report["findings"]:
        assert f["regs"] and f["regs"] <= 255 and f["threads"] >= 32, f
        assert f["ctas_per_sm"] >= 1 or "smem" in f["violations"], f
        assert f["smem"] is not None and f["mma"] in ("wgmma", "mma.sync", "none"), f
        if f["dots"]:
            assert f["mma"] != "none", f


def _rule_cases():
    for rule in sorted(RULES):
        for kernel in sorted(LAUNCHES):
            known, why = KNOWN_VIOLATIONS.get((rule, kernel), (set(), ""))
            marks = [pytest.mark.xfail(strict=True, raises=RuleBroken,
                                       reason=f"{sorted(known)} break {rule!r}: {why}")] if known else []
            yield pytest.param(rule, kernel, marks=marks, id=f"{rule}-{kernel}")


def test_known_violations_name_rules_and_kernels():
    for rule, kernel in KNOWN_VIOLATIONS:
        assert rule in RULES and kernel in LAUNCHES, (rule, kernel)


@pytest.mark.parametrize("rule, kernel", list(_rule_cases()))
def test_rule(report, rule, kernel):
    """The configs of ``kernel`` that break ``rule`` on sm_90 are exactly those KNOWN_VIOLATIONS lists."""
    known = KNOWN_VIOLATIONS.get((rule, kernel), (set(), ""))[0]
    found = [f for f in report["findings"] if f["kernel"] == kernel and f["arch"] == 90 and not f["error"]]
    assert found, f"{kernel}: no compiled config in the audit"
    broken = {f["config"] for f in found if rule in f["violations"]}
    if broken != known:
        pytest.fail(f"{kernel}: the configs that break {rule!r} ({RULES[rule]}) are now {sorted(broken)}, "
                    f"KNOWN_VIOLATIONS lists {sorted(known)}: fix the kernel or update the list")
    if broken:
        raise RuleBroken(f"{kernel}: {sorted(broken)} break {rule!r} ({RULES[rule]})")


#: The Hopper-native GEMMs: TMA pipelines, so nothing in their main loop may wait on a plain load.
_TMA_GEMMS = ("grouped_gemm_tma/prefill", "grouped_gemm_tma/medium", "grouped_gemm_tma/decode", "grouped_gemm_dw_tma",
              "grouped_gemm_masked_tma", "fp8_wgrad_tma", "fp8_grouped_wgrad_tma")


@pytest.mark.parametrize("kernel", _TMA_GEMMS)
def test_hopper_native_gemms(report, kernel):
    """Every config of the TMA GEMMs: wgmma fed by TMA, warp specialisation exactly where the config
    asks for it (Triton 3.6 takes it at num_warps=4), no synchronous global load in the main loop."""
    if report["archs"].get("90"):
        pytest.skip(f"no sm_90 toolchain: {report['archs']['90']}")
    found = [f for f in report["findings"] if f["kernel"] == kernel and f["arch"] == 90 and not f["error"]]
    assert found, f"{kernel}: no compiled config in the audit"
    for f in found:
        assert f["mma"] == "wgmma" and f["tma"] and f["asks_tma"], f
        assert f["warp_specialized"] == ("WARP_SPECIALIZE=True" in f["config"]), f
        assert f["loop_loads"] == 0, f


# ------------------------------------------------------------------------------- the detectors
@pytest.fixture(scope="module")
def probes() -> dict[str, dict]:
    proc = _run([sys.executable, str(Path(__file__).with_name("audit_probes.py"))], _audit_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


@pytest.mark.parametrize("name, broken, reads", [
    ("tma+ws w4", [], dict(tma=True, warp_specialized=True, mma="wgmma", loop_loads=0)),
    ("tma+ws w8", ["warp-spec"], dict(tma=True, warp_specialized=False)),  # Triton 3.6 drops the flag at 8 warps
    ("tma w4", [], dict(tma=True, warp_specialized=False, asks_warp_spec=False)),
    ("fp8 scaled", ["fp8-loop-load"], dict(loop_loads=1, mma="wgmma", tma=False)),
    ("fp8 unscaled", [], dict(loop_loads=0, mma="wgmma")),
    ("fp8 128x128 w4", ["spills"], dict(regs=255)),
    ("bf16 64-row w2", ["wgmma"], dict(mma="mma.sync")),
    ("bf16 5 stages of 128x128x128", ["smem"], dict(smem=5 * 2 * 128 * 128 * 2)),
])
def test_detectors_on_probe_kernels(probes, name, broken, reads):
    f = probes[name]
    assert f["error"] is None, f["error"]
    assert f["violations"] == broken, f
    assert {k: f[k] for k in reads} == reads


_PTX = """\
.visible .entry k()
{
	ld.global.b32 	%r1, [%rd1];
$L__BB0_1:                              // %outer
                                        // =>This Loop Header: Depth=1
                                        //     Child Loop BB0_2 Depth 2
	ld.global.b32 	%r2, [%rd2];
$L__BB0_2:                              //   Parent Loop BB0_1 Depth=1
                                        // =>  This Inner Loop Header: Depth=2
	cp.async.cg.shared.global [%r3], [%rd3], 16;
	// begin inline asm
	@%p3 ld.global.nc.v4.b32 { %r4, %r5, %r6, %r7 }, [ %rd4 + 0 ];
	// end inline asm
	{MMA}
	@%p1 bra 	$L__BB0_2;
// %bb.3:                               //   in Loop: Header=BB0_1 Depth=1
	ld.global.b32 	%r5, [%rd5];
	@%p2 bra 	$L__BB0_1;
// %bb.4:
	ret;
}
"""


@pytest.mark.parametrize("mma", ["wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 {%f1}, %rd6, %rd7;",
                                 "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%f1}, {%r8}, {%r9}, {%f1};",
                                 "add.f32 %f1, %f1, %f2;"])
@pytest.mark.parametrize("comments", [True, False], ids=["llvm-loop-comments", "label-ranges"])
def test_main_loop_loads(mma, comments):
    """The inner loop holds one ld.global (the outer loop's two do not count), with or without
    an MMA in it (without: the innermost loop is the main loop); cp.async is not a load."""
    ptx = _PTX.replace("{MMA}", mma)
    if not comments:
        ptx = "\n".join(line.split("//")[0].rstrip() if "Loop" in line or "%bb" in line else line
                        for line in ptx.splitlines())
    assert main_loop_loads(ptx) == 1
    straight = re.sub(r"(Loop Header|in Loop:|Parent Loop)", "", re.sub(r".*\bbra\b.*\n", "", ptx))
    assert main_loop_loads(straight) is None


def test_parse_ptxas():
    log = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'k' for 'sm_90a'
ptxas info    : Function properties for k
    16 bytes stack frame, 260 bytes spill stores, 248 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 1024 bytes smem
ptxas info    : Compile time = 107.676 ms
"""
    assert parse_ptxas(log, "k") == dict(regs=255, stack=16, spill_stores=260, spill_loads=248, static_smem=1024)


@pytest.mark.parametrize("regs, threads, smem, expected", [
    (32, 128, 0, 16),  # the 2048-thread limit
    (16, 32, 0, 32),  # the 32-block limit
    (240, 128, 128 * 1024, 1),  # shared memory: 2 x 129 KB > 228 KB
    (128, 128, 96 * 1024, 2),  # 2 x 97 KB
    (255, 256, 0, 1),  # 8 warps of 8192 registers: all of the SM's 64K
    (168, 256, 0, 1),  # 168 x 32 = 5376 per warp: 3 warps per sub-partition, 12 per SM
    (96, 128, 0, 5),  # 3072 per warp: 5 per sub-partition, 20 per SM
    (64, 128, 228 * 1024, 0),  # more than a block may take
])
def test_ctas_per_sm(regs, threads, smem, expected):
    assert ctas_per_sm(regs, threads, smem) == expected


def _clean(**changes) -> Finding:
    f = Finding("k", "launch", "w4 s3", 90, regs=128, spill_stores=0, spill_loads=0, stack=0, smem=96 * 1024,
                threads=128, ctas_per_sm=2, mma="wgmma", tma=True, warp_specialized=True, loop_loads=0,
                dots=[[128, 128, 128, "f8E4M3FN"]], asks_tma=True, asks_warp_spec=True)
    for key, value in changes.items():
        setattr(f, key, value)
    return f


@pytest.mark.parametrize("changes, broken", [
    ({}, []),
    (dict(spill_loads=4), ["spills"]),
    (dict(smem=227 * 1024), []),
    (dict(smem=227 * 1024 + 1), ["smem"]),
    (dict(mma="mma.sync"), ["wgmma"]),
    (dict(mma="mma.sync", dots=[[32, 128, 128, "f8E4M3FN"]]), []),  # below 64 rows
    (dict(mma="mma.sync", dots=[[128, 128, 64, "f32"]]), []),  # float32 operands
    (dict(mma="tcgen05", arch=100), []),  # the wgmma rule is Hopper's
    (dict(tma=False), ["tma"]),
    (dict(tma=False, asks_tma=False), []),
    (dict(warp_specialized=False), ["warp-spec"]),
    (dict(warp_specialized=False, asks_warp_spec=False), []),
    (dict(loop_loads=2), ["fp8-loop-load"]),
    (dict(loop_loads=2, dots=[[128, 128, 64, "bf16"]]), []),  # only the FP8 loop
    (dict(error="CompilationError: ..."), []),  # a failed compile is reported as such, not as broken rules
])
def test_violations(changes, broken):
    assert violations(_clean(**changes)) == broken


def test_cli_under_the_interpreter(tmp_path):
    """With TRITON_INTERPRET=1 (a test process, a user's shell), `audit` compiles in a child process
    without it; --kernels picks kernels, an unknown one is an error that names it."""
    path = tmp_path / "a.json"
    env = {**_audit_env(), "TRITON_INTERPRET": "1"}
    proc = _run([sys.executable, "-m", "moela.profiling", "audit", "--kernels", "mla_decode_combine", "--quick",
                 "--arch", "90,100", "--jobs", "1", "--json", str(path)], env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(path.read_text())
    archs = [90] if data["archs"]["100"] else [90, 100]  # sm_100: compiled, or skipped with the reason
    assert [(f["kernel"], f["arch"]) for f in data["findings"]] == [("mla_decode_combine", a) for a in archs]
    proc = _run([sys.executable, "-m", "moela.profiling", "audit", "--kernels", "no_such_kernel", "--arch", "90"], env)
    assert proc.returncode == 2 and "no_such_kernel" in proc.stderr
