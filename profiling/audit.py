"""``python -m moela.profiling audit``: every Triton kernel of moela.kernels compiled for Hopper
(sm_90, and sm_100 where the bundled ptxas allows) on any machine, no GPU needed, and judged.

How. Each module of ``moela.kernels`` is imported (with ``TRITON_INTERPRET`` unset: the real
``JITFunction``s) and searched by type: every ``triton.autotune`` Autotuner (also inside dicts,
lists and tuples) is one audit target, and so is every kernel (a ``@triton.jit`` function no
other Triton function calls) that no autotuner wraps. ``moela.profiling.audit_shapes`` holds
each target's launches at DeepSeek shapes. For a launch, the target's own pruner
(``early_config_prune``) picks the configs, and each config goes through Triton's launch-time
specialisation (the binder a launch uses: the same signature, constexprs and divisibility
attributes), ``triton.compile`` for ``GPUTarget("cuda", arch, 32)`` and the bundled ``ptxas -v``.

What is read, per (target, launch, config, arch):

- registers, spill bytes and stack (ptxas), shared memory (Triton's allocation plus ptxas's static);
- CTAs per SM from those and the SM's limits (``SM_LIMITS``: registers per warp in 256-register
  units over 4 sub-partitions, shared memory plus the 1 KB the driver reserves per block);
- the MMA instruction in the PTX (``wgmma.mma_async``, ``tcgen05.mma`` or ``mma.sync``), TMA
  (``cp.async.bulk.tensor``), warp specialisation (``ttg.warp_specialize`` in the TTGIR);
- synchronous global loads (``ld.global``; cp.async and TMA are asynchronous) in the main loop:
  the innermost loops of the PTX that hold the MMA (any innermost loop in a kernel without MMA),
  read from the loop structure LLVM writes next to each basic block;
- what the kernel asks for: ``tt.dot`` operand dtypes and tile shapes, tensor descriptors,
  ``warp_specialize`` loops (the TTIR).

Rules (``RULES``; the test suite asserts them on sm_90): no spills; shared memory within the
227 KB a block may take; on sm_90 wgmma for every 16-bit or FP8 ``tl.dot`` of 64 rows or more;
TMA and warp specialisation wherever the kernel asks for them; no synchronous global load in the
main loop of a kernel with an FP8 ``tl.dot``.

Identical specialisations (two launches that differ only in values Triton does not specialise
on) are compiled once. Compiles go through Triton's cache (``~/.triton/cache``).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import io
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "RULES", "SM_LIMITS", "Target", "Finding", "discover", "audit", "violations", "ctas_per_sm", "main_loop_loads",
    "format_table", "build_parser", "to_argv", "run", "main",
]

#: rule id -> what it asks.
RULES = {
    "spills": "no register spills",
    "smem": "shared memory within the 227 KB a block may take",
    "wgmma": "sm_90: wgmma for every 16-bit or FP8 tl.dot of 64 rows or more",
    "tma": "TMA (cp.async.bulk.tensor) wherever the kernel uses tensor descriptors",
    "warp-spec": "warp specialisation wherever a loop asks for it (tl.range(..., warp_specialize=True))",
    "fp8-loop-load": "no synchronous global load (ld.global) in the main loop of a kernel with an FP8 tl.dot",
}


@dataclass(frozen=True)
class SmLimits:
    """Per-SM resources of a compute capability (CUDA occupancy calculator values)."""

    regs: int = 65536
    reg_unit: int = 256  # registers are allocated per warp in units of this many
    sub_partitions: int = 4
    smem: int = 228 * 1024
    smem_per_block: int = 227 * 1024
    smem_reserved: int = 1024  # per block, taken by the driver
    max_blocks: int = 32
    max_threads: int = 2048


SM_LIMITS = {90: SmLimits(), 100: SmLimits()}


# ------------------------------------------------------------------------------------ discovery
@dataclass
class Target:
    """An autotuner (``tuner``) or a kernel launched without one; ``kernel`` is its JITFunction."""

    name: str
    module: str
    kernel: Any
    tuner: Any = None


def _base_name(fn) -> str:
    return fn.__name__.strip("_").removesuffix("_kernel")


def _unwrap(fn):
    """The JITFunction under an Autotuner / Heuristics chain."""
    while not _is_jit(fn):
        fn = fn.fn
    return fn


def _is_jit(obj) -> bool:
    from triton.runtime.jit import JITFunction

    return isinstance(obj, JITFunction)


def _walk(value, path: tuple, depth: int = 0) -> Iterable[tuple[tuple, Any]]:
    """(path, value) for a module global and what dicts, lists, tuples and moela objects hold."""
    yield path, value
    if depth >= 2:
        return
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    elif type(value).__module__.startswith("moela.") and hasattr(value, "__dict__") and not isinstance(value, type):
        items = vars(value).items()
    else:
        return
    for key, v in items:
        yield from _walk(v, (*path, key), depth + 1)


def _called_names(fn) -> set[str]:
    """Names a jit function calls or passes on (a combine function of ``tl.associative_scan``)."""
    tree = ast.parse(textwrap.dedent(fn.src))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            for f in (node.func, *node.args):
                names.add(f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else "")
    return names


def kernel_modules() -> list[Any]:
    """Every module of the moela.kernels package, imported."""
    import moela.kernels as pkg

    return [importlib.import_module(f"moela.kernels.{m.name}") for m in pkgutil.iter_modules(pkg.__path__)]


def discover() -> list[Target]:
    """The audit targets of moela.kernels, found by type (see the module docstring)."""
    from triton.runtime.autotuner import Autotuner

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("audit: TRITON_INTERPRET is set; the audit compiles the real kernels: run it in a "
                           "process without it (`python -m moela.profiling audit` does)")
    tuners: dict[int, tuple[Any, tuple]] = {}
    jits: dict[int, tuple[Any, str]] = {}
    for module in kernel_modules():
        for name, value in vars(module).items():
            for path, obj in _walk(value, (name,)):
                if isinstance(obj, Autotuner):
                    # the path that names it: a module attribute or a dict key (not a registry list)
                    old = tuners.get(id(obj))
                    if old is None or (not isinstance(old[1][-1], str) and isinstance(path[-1], str)):
                        tuners[id(obj)] = (obj, path)
                elif _is_jit(obj) and obj.fn.__module__ == module.__name__:
                    jits.setdefault(id(obj), (obj, module.__name__))
                elif type(obj).__name__ == "InterpretedFunction":
                    raise RuntimeError(f"audit: {module.__name__}.{name} is interpreted (imported under "
                                       "TRITON_INTERPRET=1); run the audit in a fresh process without it")
    called = set().union(*(_called_names(fn) for fn, _ in jits.values()))
    targets, tuned = [], set()
    for tuner, path in tuners.values():
        fn = _unwrap(tuner.fn)
        tuned.add(id(fn))
        key = f"/{path[-1]}" if len(path) > 1 and isinstance(path[-1], str) else ""
        if not isinstance(path[-1], str):
            raise RuntimeError(f"audit: autotuner {getattr(tuner, 'moela_name', fn.__name__)} is only reachable "
                               f"through {path}: bind it to a module attribute or a dict key")
        targets.append(Target(_base_name(fn) + key, fn.fn.__module__, fn, tuner))
    for fn, module in jits.values():
        if id(fn) not in tuned and fn.__name__ not in called:
            targets.append(Target(_base_name(fn), module, fn))
    names = [t.name for t in targets]
    if len(set(names)) != len(names):
        raise RuntimeError(f"audit: two targets share a name: {sorted(n for n in names if names.count(n) > 1)}")
    return sorted(targets, key=lambda t: t.name)


# ------------------------------------------------------------------------------------ compiling
@dataclass
class Finding:
    """What one compile says (sizes in bytes; ``None`` where it could not be read)."""

    kernel: str
    launch: str
    config: str
    arch: int
    regs: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack: int | None = None
    smem: int | None = None
    threads: int | None = None
    ctas_per_sm: int | None = None
    mma: str | None = None  # "wgmma", "tcgen05", "mma.sync" or "none"
    tma: bool | None = None
    warp_specialized: bool | None = None
    loop_loads: int | None = None  # ld.global in the main loop(s); None: no loop
    dots: list[list] = field(default_factory=list)  # [M, N, K, operand dtype] of each tt.dot
    asks_tma: bool = False
    asks_warp_spec: bool = False
    compile_s: float = 0.0
    error: str | None = None
    violations: list[str] = field(default_factory=list)


def config_label(config, options: dict[str, Any]) -> str:
    """``M=128 N=128 K=64 GROUP_M=8 w4 s4`` (BLOCK_ dropped); an untuned launch: its options."""
    kw = dict(config.all_kwargs()) if config is not None else {}
    kw.update({k: v for k, v in options.items() if k in ("num_warps", "num_stages", "maxnreg")})
    parts = [f"{k.removeprefix('BLOCK_')}={v}" for k, v in kw.items() if k not in
             ("num_warps", "num_stages", "num_ctas", "maxnreg", "ir_override")]
    parts.append(f"w{kw.get('num_warps', 4)} s{kw.get('num_stages', 3)}")
    if kw.get("maxnreg"):
        parts.append(f"maxnreg={kw['maxnreg']}")
    return " ".join(parts)


def _specialize(target: Target, launch, config, arch: int):
    """Triton's launch-time specialisation of this launch: (fn, signature, constexprs, attrs, options)."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.autotuner import Heuristics
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", arch, 32))
    kw = {**launch.args, **launch.options, **(config.all_kwargs() if config is not None else {})}
    fn = target.tuner.fn if target.tuner is not None else target.kernel
    while not _is_jit(fn):
        if isinstance(fn, Heuristics):
            for name, rule in fn.values.items():
                kw[name] = rule(dict(kw))
        fn = fn.fn
    kw["debug"] = kw.get("debug", fn.debug) or knobs.runtime.debug
    kw["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    try:
        bound, specialization, options = binder(**kw)
        options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, specialization, options)
    except (TypeError, KeyError) as e:  # a parameter the table misses, or one the kernel no longer has
        raise ValueError(f"{target.name}: launch {launch.label!r} does not match {fn.__name__}'s parameters "
                         f"{fn.arg_names}: {e}") from None
    return fn, signature, constexprs, attrs, options


def pruned_configs(target: Target, launch) -> list[Any]:
    """The configs the target's pruner keeps for this launch (``[None]``: an untuned kernel)."""
    if target.tuner is None:
        return [None]
    tuner = target.tuner
    tuner.nargs = dict(launch.args)
    return list(tuner.prune_configs(dict(launch.args)))


def _ptxas(ptx: str, arch: int, fp_fusion: bool, ptx_options: str | None) -> str:
    """``ptxas -v`` of the PTX as Triton runs it (the log Triton throws away)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(arch).path, "-v", *([] if fp_fusion else ["--fmad=false"]),
               *(ptx_options.split() if ptx_options else []), f"--gpu-name={sm_arch_from_capability(arch)}", src,
               "-o", os.path.join(tmp, "kernel.cubin")]
        return subprocess.run(cmd, check=True, capture_output=True, text=True).stderr


def parse_ptxas(log: str, kernel_name: str) -> dict[str, int]:
    """Registers, spill stores/loads, stack and static shared memory of the entry function."""
    start = log.find(f"Compiling entry function '{kernel_name}'")
    section = log[start:] if start >= 0 else log
    nxt = section.find("Compiling entry function", 10)
    section = section if nxt < 0 else section[:nxt]

    def num(pattern: str) -> int:
        m = re.search(pattern, section)
        return int(m.group(1)) if m else 0

    return dict(regs=num(r"Used (\d+) registers"), stack=num(r"(\d+) bytes stack frame"),
                spill_stores=num(r"(\d+) bytes spill stores"), spill_loads=num(r"(\d+) bytes spill loads"),
                static_smem=num(r"(\d+) bytes smem"))


def ctas_per_sm(regs: int, threads: int, smem: int, limits: SmLimits = SM_LIMITS[90]) -> int:
    """Resident blocks per SM: the least of the register, shared-memory, thread and block limits."""
    warps = -(-threads // 32)
    per_warp = -(-max(regs, 1) * 32 // limits.reg_unit) * limits.reg_unit
    by_regs = (limits.regs // limits.sub_partitions // per_warp) * limits.sub_partitions // warps
    if smem > limits.smem_per_block:
        return 0
    by_smem = limits.smem // (smem + limits.smem_reserved)
    return min(by_regs, by_smem, limits.max_threads // (warps * 32), limits.max_blocks)


_BLOCK = re.compile(r"^(?:\$L__(BB\d+_\d+):|// %bb\.\d+:)")
_HEADER = re.compile(r"=>\s*This (?:Inner )?Loop Header: Depth=\d+")
_IN_LOOP = re.compile(r"in Loop: Header=(BB\d+_\d+) Depth=(\d+)")
_PARENT = re.compile(r"Parent Loop (BB\d+_\d+) Depth=(\d+)")
_LD_GLOBAL = re.compile(r"\bldu?(?:\.[\w:]+)*?\.global\b")
_MMA = re.compile(r"\b(wgmma\.mma_async|tcgen05\.mma|mma\.sync)\b")
_MMA_NAMES = (("wgmma", "wgmma.mma_async"), ("tcgen05", "tcgen05.mma"), ("mma.sync", "mma.sync"))


def _ptx_blocks(ptx: str) -> list[tuple[tuple[str, ...], list[str]]]:
    """Basic blocks of the PTX: (enclosing loop headers, outermost first; instruction lines).

    Reads the loop comments LLVM writes at each block (``=>This Loop Header``, ``in Loop:
    Header=BB0_2``, ``Parent Loop BB0_2``); a PTX without them falls back to label ranges.
    """
    blocks: list[tuple[list[tuple[int, str]], str | None, list[str], list[str]]] = []
    comments: list[str] = []
    cur = ([], None, [], comments)
    blocks.append(cur)
    for raw in ptx.splitlines():
        line = raw.strip()
        m = _BLOCK.match(line)
        if m:
            cur = ([], m.group(1), [], [line])
            blocks.append(cur)
        elif line.startswith("//"):
            if not cur[2]:
                cur[3].append(line)
        else:
            cur[2].append(line.split("//")[0])
    if not any(_HEADER.search(c) for b in blocks for c in b[3]):
        return _ptx_blocks_by_range(ptx)
    out = []
    for _, label, lines, notes in blocks:
        text = " ".join(notes)
        chain = sorted((int(d), h) for h, d in _PARENT.findall(text))
        if _HEADER.search(text) and label:
            chain.append((len(chain) + 1, label))
        else:
            chain += [(int(d), h) for h, d in _IN_LOOP.findall(text)]
        out.append((tuple(h for _, h in sorted(set(chain))), lines))
    return out


def _ptx_blocks_by_range(ptx: str) -> list[tuple[tuple[str, ...], list[str]]]:
    """Fallback: a loop is the lines from a ``$L__BB`` label to the last branch back to it."""
    lines = [raw.split("//")[0].strip() for raw in ptx.splitlines()]
    labels = {m.group(1): i for i, l in enumerate(lines) if (m := re.match(r"^\$L__(BB\d+_\d+):", l))}
    spans = {}
    for i, l in enumerate(lines):
        for target in re.findall(r"\bbra(?:\.uni)?\s+\$L__(BB\d+_\d+)", l):
            if target in labels and labels[target] < i:
                spans[target] = (labels[target], max(i, spans.get(target, (0, 0))[1]))
    return [(tuple(h for h, (a, b) in sorted(spans.items(), key=lambda s: s[1][0]) if a <= i <= b), [l])
            for i, l in enumerate(lines)]


def main_loop_loads(ptx: str) -> int | None:
    """``ld.global`` instructions in the main loops: the innermost loops holding the MMA (every
    innermost loop if no loop does). None when the PTX has no loop."""
    blocks = _ptx_blocks(ptx)
    loops = {h for chain, _ in blocks for h in chain}
    if not loops:
        return None
    body = {h: [l for chain, lines in blocks if h in chain for l in lines] for h in loops}
    inner = {h: {c for chain, _ in blocks if h in chain for c in chain[chain.index(h) + 1:]} for h in loops}
    mma = {h for h in loops if any(_MMA.search(l) for l in body[h])}
    pool = mma or loops
    main = [h for h in pool if not (inner[h] & pool)]
    return sum(1 for h in main for l in body[h] if _LD_GLOBAL.search(l))


_DOT = re.compile(r"\btt\.dot\s[^\n]*?:\s*tensor<(\d+)x(\d+)x(\w+)>\s*\*\s*tensor<(\d+)x(\d+)x\w+>")
_ASKS_TMA = re.compile(r"\btt\.(?:make_tensor_descriptor|descriptor_\w+)\b|!tt\.tensordesc")


def analyse(kernel, arch: int, ptxas_log: str | None = None) -> dict[str, Any]:
    """Everything ``Finding`` holds about one compiled kernel (a ``triton.compile`` result);
    ``ptxas_log``: the ``ptxas -v`` output of its compile (None: run ptxas again)."""
    ptx, ttir, ttgir, md = kernel.asm["ptx"], kernel.asm["ttir"], kernel.asm["ttgir"], kernel.metadata
    if ptxas_log is None or "Compiling entry function" not in ptxas_log:
        ptxas_log = _ptxas(ptx, arch, md.enable_fp_fusion, md.ptx_options)
    info = parse_ptxas(ptxas_log, md.name)
    smem = md.shared + info["static_smem"]
    threads = md.num_warps * 32  # warp-specialised kernels: every partition's warps
    found = {m.group(1) for m in _MMA.finditer(ptx)}
    mma = next((name for name, instr in _MMA_NAMES if instr in found), "none")
    return dict(
        regs=info["regs"], spill_stores=info["spill_stores"], spill_loads=info["spill_loads"], stack=info["stack"],
        smem=smem, threads=threads, ctas_per_sm=ctas_per_sm(info["regs"], threads, smem, SM_LIMITS[arch]), mma=mma,
        tma="cp.async.bulk.tensor" in ptx, warp_specialized=bool(re.search(r"\bttg\.warp_specialize\(", ttgir)),
        loop_loads=main_loop_loads(ptx), dots=[[int(a), int(b), int(k), t] for a, k, t, _, b in _DOT.findall(ttir)],
        asks_tma=bool(_ASKS_TMA.search(ttir)), asks_warp_spec="tt.warp_specialize" in ttir)


def _is_16bit_or_fp8(dtype: str) -> bool:
    return dtype in ("bf16", "f16") or dtype.startswith("f8")


def violations(f: Finding) -> list[str]:
    """The rules (``RULES``) this finding breaks."""
    if f.error is not None:
        return []
    broken = []
    if (f.spill_stores or 0) + (f.spill_loads or 0) > 0:
        broken.append("spills")
    if f.smem is not None and f.smem > SM_LIMITS.get(f.arch, SmLimits()).smem_per_block:
        broken.append("smem")
    if f.arch == 90 and f.mma != "wgmma" and any(m >= 64 and _is_16bit_or_fp8(t) for m, _, _, t in f.dots):
        broken.append("wgmma")
    if f.asks_tma and not f.tma:
        broken.append("tma")
    if f.asks_warp_spec and not f.warp_specialized:
        broken.append("warp-spec")
    if any(t.startswith("f8") for *_, t in f.dots) and (f.loop_loads or 0) > 0:
        broken.append("fp8-loop-load")
    return broken


def compile_finding(target: Target, launch, config, arch: int) -> Finding:
    """Compile one (launch, config) for ``arch`` and read it."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    finding = Finding(target.name, launch.label, config_label(config, launch.options), arch)
    t0 = time.perf_counter()
    try:
        fn, signature, constexprs, attrs, options = _specialize(target, launch, config, arch)
        log = io.StringIO()
        saved, knobs.nvidia.dump_ptxas_log = knobs.nvidia.dump_ptxas_log, True  # Triton prints ptxas -v on a miss
        try:
            with contextlib.redirect_stdout(log):
                kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                                        target=GPUTarget("cuda", arch, 32), options=options.__dict__)
        finally:
            knobs.nvidia.dump_ptxas_log = saved
        for key, value in analyse(kernel, arch, log.getvalue()).items():
            setattr(finding, key, value)
    except Exception as e:  # a compile error is a finding, not the end of the audit
        finding.error = f"{type(e).__name__}: {' '.join(str(e).split())}"[:500]
    finding.compile_s = round(time.perf_counter() - t0, 3)
    finding.violations = violations(finding)
    return finding


# ------------------------------------------------------------------------------------ the audit
def arch_support(arch: int) -> str | None:
    """None if the bundled toolchain compiles for ``arch``, else the reason it does not."""
    if arch not in SM_LIMITS:
        return f"sm_{arch}: no SM limits known here (known: {sorted(SM_LIMITS)})"
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        subprocess.run([get_ptxas(arch).path, "--version"], check=True, capture_output=True)
    except Exception as e:
        return f"sm_{arch}: Triton's bundled ptxas does not run ({type(e).__name__}: {e})"
    return None


_JOBS: list[tuple[Target, Any, Any, int]] = []  # what forked workers compile (set before the pool starts)


def _run_job(index: int) -> dict[str, Any]:
    return asdict(compile_finding(*_JOBS[index]))


@dataclass
class AuditResult:
    findings: list[Finding]
    archs: dict[int, str | None]  # arch -> None (compiled) or why it was skipped
    unaudited: list[str]  # targets found in moela.kernels without launches in audit_shapes
    stale: list[str]  # audit_shapes entries no target matches
    seconds: float
    pins: list[str]  # environment variables that narrow the configs


def audit(names: Sequence[str] | None = None, archs: Sequence[int] = (90,), sweep: bool = True,
          jobs: int = 1, progress=None) -> AuditResult:
    """Compile every target (or those in ``names``: a name also picks its ``name/...`` targets) at
    its launches (only the first unless ``sweep``) for each arch, ``jobs`` compiles at a time."""
    from .audit_shapes import LAUNCHES, launches

    t0 = time.perf_counter()
    targets = discover()
    found = {t.name for t in targets}
    unaudited = sorted(found - set(LAUNCHES))
    stale = sorted(set(LAUNCHES) - found)
    if names:
        picked = {n: [t for t in targets if t.name == n or t.name.startswith(n + "/")] for n in names}
        unknown = sorted(n for n, ts in picked.items() if not ts)
        if unknown:
            raise ValueError(f"--kernels: no kernel named {unknown}; the kernels are {sorted(found)}")
        targets = [t for t in targets if any(t in ts for ts in picked.values())]
    support = {a: arch_support(a) for a in archs}
    jobs_list: list[tuple[Target, Any, Any, int]] = []
    keys: list[Any] = []
    failed: list[Finding] = []  # launches whose configs could not even be picked
    for target in targets:
        if target.name not in LAUNCHES:
            continue
        for launch in launches(target.name, sweep):
            try:
                configs = pruned_configs(target, launch)
            except Exception as e:  # the pruner reads an argument the launch lacks
                failed += [Finding(target.name, launch.label, "-", a, error=f"pruner: {type(e).__name__}: {e}")
                           for a in archs if support[a] is None]
                continue
            for config in configs:
                for arch in archs:
                    if support[arch] is None:
                        jobs_list.append((target, launch, config, arch))
                        keys.append(_spec_key(target, launch, config, arch))
    unique = {}
    for i, key in enumerate(keys):
        unique.setdefault(key, i)
    results = _compile_all(jobs_list, sorted(set(unique.values())), jobs, progress)
    findings = []
    for (target, launch, _, _), key in zip(jobs_list, keys, strict=True):
        same = unique[key]
        first = results[same]
        findings.append(Finding(**{**first, "launch": launch.label, "kernel": target.name,
                                   "compile_s": first["compile_s"] if same == len(findings) else 0.0}))
    findings += failed
    pins = sorted(k for k in os.environ if k == "MOELA_AUTOTUNE" or (k.startswith("MOELA_") and k.endswith("_CONFIG")))
    return AuditResult(findings, support, unaudited, stale, round(time.perf_counter() - t0, 1), pins)


def _spec_key(target: Target, launch, config, arch: int):
    try:
        fn, signature, constexprs, attrs, options = _specialize(target, launch, config, arch)
    except ValueError:
        return (target.name, launch.label, id(config), arch)  # compiled (and failing) on its own
    return (id(fn), arch, repr(sorted(signature.items())), repr(sorted(constexprs.items())),
            repr(sorted(attrs.items())), repr(sorted(options.__dict__.items())))


def _compile_all(jobs_list, indices: list[int], jobs: int, progress) -> dict[int, dict[str, Any]]:
    global _JOBS
    _JOBS = jobs_list
    results: dict[int, dict[str, Any]] = {}
    if jobs > 1 and len(indices) > 1 and hasattr(os, "fork"):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            for i, result in zip(indices, pool.map(_run_job, indices), strict=True):
                results[i] = result
                if progress:
                    progress(len(results), len(indices), result)
    else:
        for i in indices:
            results[i] = _run_job(i)
            if progress:
                progress(len(results), len(indices), results[i])
    return results


# ------------------------------------------------------------------------------------ output
def _yn(v: bool | None) -> str:
    return "-" if v is None else "yes" if v else "no"


def format_table(findings: Sequence[Finding]) -> list[str]:
    """One line per finding: kernel, launch, config, arch, regs, spills, smem, CTAs/SM, mma, TMA,
    WS, ld.global in the main loop, broken rules."""
    head = ("kernel", "launch", "config", "sm", "regs", "spill", "smem KB", "CTA/SM", "mma", "TMA", "WS", "loop ld",
            "broken")
    rows = [head]
    for f in findings:
        if f.error:
            rows.append((f.kernel, f.launch, f.config, str(f.arch), "ERROR", f.error, "", "", "", "", "", "", ""))
            continue
        rows.append((
            f.kernel, f.launch, f.config, str(f.arch), str(f.regs), str((f.spill_stores or 0) + (f.spill_loads or 0)),
            f"{f.smem / 1024:.1f}", str(f.ctas_per_sm), f.mma, _yn(f.tma), _yn(f.warp_specialized),
            "-" if f.loop_loads is None else str(f.loop_loads), ",".join(f.violations) or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def to_json(result: AuditResult) -> dict[str, Any]:
    import triton

    return {"triton": triton.__version__, "rules": RULES, "archs": {str(a): r for a, r in result.archs.items()},
            "seconds": result.seconds, "unaudited": result.unaudited, "stale": result.stale, "pins": result.pins,
            "findings": [asdict(f) for f in result.findings]}


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="python -m moela.profiling audit", description=__doc__,
                                          formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernels", nargs="+", metavar="NAME", help="audit only these targets (default: all)")
    p.add_argument("--arch", default="90,100", help="compute capabilities, comma-separated (default: 90,100)")
    p.add_argument("--json", metavar="PATH", help="also write the findings as JSON")
    p.add_argument("--quick", action="store_true",
                   help="only each kernel's representative launch (what the test suite compiles)")
    p.add_argument("--jobs", type=int, default=min(os.cpu_count() or 1, 8), help="compiles at a time")
    return p


def to_argv(args: argparse.Namespace) -> list[str]:
    """The command line of parsed ``build_parser`` arguments (to run the audit in another process)."""
    argv = ["--arch", str(args.arch), "--jobs", str(args.jobs)]
    argv += ["--kernels", *args.kernels] if args.kernels else []
    argv += ["--json", args.json] if args.json else []
    return argv + (["--quick"] if args.quick else [])


def run(args: argparse.Namespace) -> int:
    """Print the table (and write the JSON); exit status 0 clean, 1 rules broken, 2 errors."""
    try:
        archs = [int(a) for a in str(args.arch).split(",") if a.strip()]
    except ValueError:
        print(f"--arch: expected comma-separated compute capabilities like 90,100, got {args.arch!r}", file=sys.stderr)
        return 2

    def progress(done: int, total: int, _result) -> None:
        if sys.stderr.isatty():
            print(f"\r  compiled {done}/{total}", end="" if done < total else "\n", file=sys.stderr, flush=True)

    try:
        result = audit(args.kernels, archs, sweep=not args.quick, jobs=max(1, args.jobs), progress=progress)
    except (ValueError, RuntimeError) as e:
        print(f"audit: {e}", file=sys.stderr)
        return 2
    print("\n".join(format_table(result.findings)))
    for reason in filter(None, result.archs.values()):
        print(f"skipped {reason}")
    for name in result.unaudited:
        print(f"ERROR {name}: no launches in moela.profiling.audit_shapes.LAUNCHES (add its DeepSeek shapes)")
    for name in result.stale:
        print(f"ERROR audit_shapes.LAUNCHES[{name!r}]: no such kernel in moela.kernels")
    if result.pins:
        print(f"note: {', '.join(result.pins)} set: configs are narrowed as at run time")
    errors = [f for f in result.findings if f.error]
    broken = [f for f in result.findings if f.violations]
    print(f"{len(result.findings)} compiles ({len({(f.kernel, f.launch) for f in result.findings})} launches) in "
          f"{result.seconds:.0f} s; {len(broken)} break a rule, {len(errors)} failed to compile")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(to_json(result), fh, indent=1)
    return 2 if errors or result.unaudited or result.stale else 1 if broken else 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
