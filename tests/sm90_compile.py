"""Compile Triton kernels for sm_90 without a GPU and read what the compiler made of them.

A test helper (import it as ``sm90_compile``). :func:`run_jobs` runs :func:`main` in a fresh Python
process without ``TRITON_INTERPRET`` (kernels must be imported as real ``JITFunction``s): each job
names a kernel (module and attribute), its argument types, constexprs and launch options; the
child compiles it with ``triton.compile(..., target=GPUTarget("cuda", 90, 32))`` and the bundled
``ptxas -v`` and returns one :class:`Report` per job.

What a report holds: registers and spill bytes (ptxas), shared memory (Triton's allocation),
CTAs per SM (the SM's register and shared-memory limits), ``wgmma.mma_async``, TMA
(``cp.async.bulk.tensor``), warp specialisation (``ttg.warp_specialize`` in the TTGIR) and the
synchronous global loads (``ld.global``) inside the innermost loops that issue the MMA, read from
the loop structure LLVM writes beside each PTX basic block.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

__all__ = ["Job", "Report", "toolchain_missing", "run_jobs", "main_loop_loads"]

SM_REGISTERS = 65536
SM_SMEM = 228 * 1024
BLOCK_SMEM_RESERVED = 1024  # per block, taken by the driver
MAX_CTAS = 32


@dataclass
class Job:
    """One compile: ``module.kernel`` with ``args`` (name -> "*bf16", "i32", ...), ``constexprs``
    (name -> value) and launch options; ``aligned``: arguments that get ``tt.divisibility=16``."""

    name: str
    module: str
    kernel: str
    args: dict
    constexprs: dict
    num_warps: int
    num_stages: int
    aligned: tuple = ()


@dataclass
class Report:
    name: str
    regs: int
    spill_bytes: int
    smem: int
    threads: int
    ctas_per_sm: int
    wgmma: bool
    tma: bool
    warp_specialize: bool
    main_loop_loads: int
    error: str = ""


def toolchain_missing() -> str:
    """Why sm_90 compiles cannot run here ('' when they can): Triton's CUDA backend and ptxas."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        path = get_ptxas(90).path
    except Exception as e:  # noqa: BLE001 - any import or lookup failure means no toolchain
        return f"triton's CUDA backend is unavailable ({type(e).__name__}: {e})"
    return "" if path and os.path.exists(path) else "the bundled ptxas is missing"


def main_loop_loads(ptx: str) -> int:
    """``ld.global`` instructions in the innermost PTX loops that hold a ``wgmma.mma_async``."""
    block_loop: dict[str, str] = {}  # block label -> header of its innermost loop
    inner: set[str] = set()
    blocks: dict[str, list[str]] = {}
    current = "entry"
    for line in ptx.splitlines():
        label = re.match(r"^(\$L__BB\d+_\d+):", line) or re.match(r"^// (%bb\.\d+):", line)
        if label:
            current = label.group(1).removeprefix("$L__")
            blocks[current] = []
        header = re.search(r"Header=(BB\d+_\d+)", line)
        if header:
            block_loop[current] = header.group(1)
        if "This Inner Loop Header" in line:
            inner.add(current)
            block_loop[current] = current
        elif "This Loop Header" in line:
            block_loop.setdefault(current, current)
        blocks.setdefault(current, []).append(line)
    loops: dict[str, list[str]] = {}
    for block, lines in blocks.items():
        if block_loop.get(block) in inner:
            loops.setdefault(block_loop[block], []).extend(lines)
    return sum(sum(1 for line in lines if re.search(r"\bld\.global", line))
               for lines in loops.values() if any("wgmma.mma_async" in line for line in lines))


def _ptxas(ptx: str) -> tuple[int, int]:
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", src, "-o", src + ".o"],
                             capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(int(b) for b in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return regs, spills


def _compile(job: Job) -> Report:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget

    fn = getattr(importlib.import_module(job.module), job.kernel)
    while not isinstance(fn, triton.runtime.jit.JITFunction):
        fn = fn.fn  # Autotuner / Heuristics -> the JITFunction
    signature = {a: ("constexpr" if a in job.constexprs else job.args[a]) for a in fn.arg_names}
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in job.aligned}
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=job.constexprs, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": job.num_warps, "num_stages": job.num_stages})
    ptx, ttgir = k.asm["ptx"], k.asm["ttgir"]
    regs, spills = _ptxas(ptx)
    threads = 32 * k.metadata.num_warps  # warp specialisation's partitions included
    smem = k.metadata.shared
    per_warp = -(-regs * 32 // 256) * 256
    ctas = min(SM_REGISTERS // (per_warp * threads // 32), SM_SMEM // (smem + BLOCK_SMEM_RESERVED), MAX_CTAS,
               2048 // threads)
    return Report(job.name, regs, spills, smem, threads, ctas, "wgmma.mma_async" in ptx,
                  "cp.async.bulk.tensor" in ptx, "ttg.warp_specialize" in ttgir, main_loop_loads(ptx))


def main() -> None:
    """Read a JSON list of jobs on stdin, write a JSON list of reports to the file named by argv[1]."""
    jobs = [Job(**j) for j in json.load(sys.stdin)]
    reports = []
    for job in jobs:
        try:
            reports.append(_compile(job))
        except Exception as e:  # noqa: BLE001 - reported per job
            reports.append(Report(job.name, 0, 0, 0, 0, 0, False, False, False, 0, error=f"{type(e).__name__}: {e}"))
    with open(sys.argv[1], "w") as f:
        json.dump([asdict(r) for r in reports], f)


def run_jobs(jobs: list[Job], timeout: float = 900) -> list[Report]:
    """Compile ``jobs`` in a child process without TRITON_INTERPRET (see the module docstring)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "reports.json")
        out = subprocess.run([sys.executable, __file__, result], input=json.dumps([asdict(j) for j in jobs]),
                             capture_output=True, text=True, env=env, timeout=timeout, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"sm90 compile process failed ({out.returncode}):\n{out.stderr[-4000:]}")
        with open(result) as f:
            return [Report(**r) for r in json.load(f)]


if __name__ == "__main__":
    main()
