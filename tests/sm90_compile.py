"""Compile a kernel launch for sm_90 on any machine (no GPU) and read what the compiler made.

Import as ``import sm90_compile`` (pyproject puts tests/ on the path); run it in a process
WITHOUT ``TRITON_INTERPRET`` (the kernels must be real ``JITFunction``s). :func:`compile_launch`
binds the arguments a launcher passes exactly as a launch would (Triton's binder: the same
signature, constexprs and divisibility attributes), compiles with ``triton.compile`` for
``GPUTarget("cuda", 90, 32)``, runs the bundled ``ptxas -v`` and returns registers, spills,
shared memory, CTAs per SM, wgmma / TMA / warp specialisation, and the ``ld.global`` count inside
the innermost PTX loops that hold the wgmma (the K loop).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

__all__ = ["toolchain_missing", "compile_launch", "loop_loads"]

ARCH = 90
#: sm_90 per-SM limits (CUDA occupancy calculator): registers, shared memory, threads.
SM_REGS, SM_SMEM, SM_SMEM_BLOCK, SM_THREADS = 65536, 228 * 1024, 227 * 1024, 2048


def toolchain_missing() -> str | None:
    """None if Triton's bundled ptxas runs here, else why not."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        subprocess.run([get_ptxas(ARCH).path, "--version"], check=True, capture_output=True)
    except Exception as e:  # no CUDA backend, no ptxas binary, wrong platform
        return f"Triton's bundled ptxas does not run: {type(e).__name__}: {e}"
    return None


def _bind(fn, kwargs: dict):
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", ARCH, 32))
    kw = dict(kwargs)
    kw.setdefault("debug", fn.debug or knobs.runtime.debug)
    kw.setdefault("instrumentation_mode", knobs.compilation.instrumentation_mode)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(**kw)
    return fn._pack_args(backend, kw, bound, specialization, options)


def loop_loads(ptx: str) -> int:
    """``ld.global`` in the innermost PTX loops that hold a wgmma (LLVM's loop comments)."""
    blocks, cur = [], None
    for raw in ptx.splitlines():
        line = raw.strip()
        m = re.match(r"^\$L__(BB\d+_\d+):", line)
        if m:
            cur = {"label": m.group(1), "notes": line, "lines": []}
            blocks.append(cur)
        elif cur is not None:
            if line.startswith("//") and not cur["lines"]:
                cur["notes"] += " " + line
            else:
                cur["lines"].append(line.split("//")[0])
    loops: dict[str, list[str]] = {}
    parents: dict[str, set[str]] = {}
    for b in blocks:
        heads = set(re.findall(r"in Loop: Header=(BB\d+_\d+)", b["notes"]))
        heads |= set(re.findall(r"Parent Loop (BB\d+_\d+)", b["notes"]))
        if re.search(r"Loop Header: Depth", b["notes"]):
            heads.add(b["label"])
            parents.setdefault(b["label"], set()).update(re.findall(r"Parent Loop (BB\d+_\d+)", b["notes"]))
        for h in heads:
            loops.setdefault(h, []).extend(b["lines"])
    with_mma = {h for h, lines in loops.items() if any("wgmma.mma_async" in l for l in lines)}
    outer = set().union(*(parents.get(h, set()) for h in with_mma)) if with_mma else set()
    inner = with_mma - outer
    return sum(1 for h in inner for l in loops[h] if re.search(r"\bld(\.\w+)*\.global\b", l))


def compile_launch(fn, kwargs: dict, num_warps: int, num_stages: int) -> dict:
    """Compile ``fn`` bound to ``kwargs`` (every parameter by name, constexprs included)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    kw = dict(kwargs, num_warps=num_warps, num_stages=num_stages)
    options, signature, constexprs, attrs = _bind(fn, kw)
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", ARCH, 32),
                            options=options.__dict__)
    ptx, ttgir = kernel.asm["ptx"], kernel.asm["ttgir"]
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run([get_ptxas(ARCH).path, "-v", "--gpu-name=sm_90a", src, "-o", os.path.join(tmp, "k.cubin")],
                             check=True, capture_output=True, text=True).stderr

    def num(pattern: str) -> int:
        m = re.search(pattern, log)
        return int(m.group(1)) if m else 0

    regs = num(r"Used (\d+) registers")
    smem = kernel.metadata.shared + num(r"(\d+) bytes smem")
    threads = kernel.metadata.num_warps * 32
    warps = -(-threads // 32)
    by_regs = SM_REGS // (-(-regs * 32 // 256) * 256 * warps) if regs else 0
    ctas = min(by_regs, SM_SMEM // (smem + 1024), SM_THREADS // threads) if smem <= SM_SMEM_BLOCK else 0
    return dict(regs=regs, spill_bytes=num(r"(\d+) bytes spill stores") + num(r"(\d+) bytes spill loads"),
                smem=smem, threads=threads, ctas_per_sm=ctas, wgmma="wgmma.mma_async" in ptx,
                tma="cp.async.bulk.tensor" in ptx, warp_specialized="ttg.warp_specialize(" in ttgir,
                setmaxnreg="setmaxnreg" in ptx, loop_ld_global=loop_loads(ptx), ttgir=ttgir, ptx=ptx)
