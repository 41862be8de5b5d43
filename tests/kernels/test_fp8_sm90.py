"""The Hopper FP8 kernels compiled for sm_90 without a GPU: what the compiler made of the configs
their pruners pick at DeepSeek's shapes.

For fp8_gemm, fp8_grouped_gemm, fp8_grouped_gemm_masked and fp8_wgrad, at DeepSeek problems of each
M class (the wgrad's: training micro-batches, a partial last token block), the config each pruner
ranks first for a 132-SM Hopper (what ``MOELA_AUTOTUNE=0`` runs) and every warp-specialised or
split-K config it keeps are bound as a launch would bind them and compiled for sm_90 in a
subprocess without ``TRITON_INTERPRET`` (``sm90_compile``). Asserted: no spills, shared memory
within a block's 227 KB, wgmma, TMA (``cp.async.bulk.tensor``); warp specialisation
(``ttg.warp_specialize`` and ``setmaxnreg``) where the config asks for it; without it, no
``ld.global`` in the K loop (the scales come through ``cp.async``) and the promotion overlapped
with the next wgmma (in the K loop's TTGIR an asynchronous ``warp_group_dot`` is followed by a
promotion before any ``warp_group_dot_wait``; in the PTX, the second wgmma of a pair is committed
and the promotions' FMAs follow before the next wait); with split-K (the decode configs), a CTA
barrier right before the tile counter's ``atom.global.gpu.acq_rel.add`` and ``ld.global.cg`` loads
of the partials after it. The warp-specialised schedule's math warpgroups load their scales
themselves, one K block ahead (Triton 3.6 leaves loads that feed no dot operand in the consumer
partitions): there the K loop holds exactly those loads, a_s and b_s in each of the two math
warpgroups. The wgrad reads both scales through descriptors in both schedules (x_t's per column of
dW: (BLOCK_N, 4) boxes); its tiles wider than 64 columns cannot hold four float32 tiles beside
those column scales, so there one promotion of each pair overlaps the next wgmma (the other runs
between the wait and the issue).

Skipped (with the reason) where Triton's bundled ptxas does not run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)

# (kernel module, label, problem) per M class; the problem's keys are the module's shapes.
PROBLEMS = [
    ("fp8_gemm", "decode 64x2112x7168", dict(M=64, N=2112, K=7168)),
    ("fp8_gemm", "decode 64x4096x7168", dict(M=64, N=4096, K=7168)),
    ("fp8_gemm", "medium 128x7168x2048", dict(M=128, N=7168, K=2048)),
    ("fp8_gemm", "prefill 4096x2112x7168", dict(M=4096, N=2112, K=7168)),
    ("fp8_gemm", "prefill 4096x7168x16384", dict(M=4096, N=7168, K=16384)),
    ("fp8_grouped_gemm", "v3 decode 256x2 n4096 k7168", dict(E=256, rows=2, N=4096, K=7168)),
    ("fp8_grouped_gemm", "medium 32x100 n4096 k7168", dict(E=32, rows=100, N=4096, K=7168)),
    ("fp8_grouped_gemm", "contiguous 4x8192 n4096 k7168", dict(E=4, rows=8192, N=4096, K=7168)),
    ("fp8_grouped_gemm_masked", "v3 decode 32x64 n4096 k7168", dict(E=32, max_m=64, N=4096, K=7168)),
    ("fp8_grouped_gemm_masked", "masked 4x256 n7168 k2048", dict(E=4, max_m=256, N=7168, K=2048)),
    ("fp8_wgrad", "wgrad 4096 tokens n7168 k2048", dict(M=4096, N=7168, K=2048)),
    ("fp8_wgrad", "wgrad 8192 tokens n4096 k7168", dict(M=8192, N=4096, K=7168)),
    ("fp8_wgrad", "wgrad 4112 tokens n2112 k7168", dict(M=4112, N=2112, K=7168)),
]


def _launch(kernel: str, shape: dict):
    """(tuner, JITFunction, bound arguments by name) of the Hopper kernel for ``shape`` (CPU tensors)."""
    import importlib

    import torch

    from moela.kernels._common import cdiv
    from moela.kernels.fp8_gemm import m_class
    from moela.kernels.fp8_quant import empty_col_major_scales

    f8 = torch.float8_e4m3fn
    mod = importlib.import_module(f"moela.kernels.{kernel}")
    if kernel == "fp8_gemm":
        M, N, K = shape["M"], shape["N"], shape["K"]
        args, consts = mod.tma_launch_args(
            torch.empty(M, N, dtype=torch.bfloat16), torch.empty(M, K, dtype=f8), empty_col_major_scales(M, K // 128),
            torch.empty(N, K, dtype=f8), torch.empty(cdiv(N, 128), K // 128), 128, None)
        cls, fn = m_class(M), mod._fp8_gemm_tma_kernel
    elif kernel == "fp8_grouped_gemm":
        E, rows, N, K = shape["E"], shape["rows"], shape["N"], shape["K"]
        M = E * rows
        args, consts = mod.tma_launch_args(
            torch.empty(M, N, dtype=torch.bfloat16), torch.empty(M, K, dtype=f8), empty_col_major_scales(M, K // 128),
            torch.empty(E * N, K, dtype=f8), torch.empty(E, cdiv(N, 128), K // 128),
            torch.arange(1, E + 1, dtype=torch.int32) * rows, 128)
        cls, fn = m_class(rows), mod._fp8_grouped_gemm_tma_kernel
    elif kernel == "fp8_wgrad":  # the token-direction quantizations: scales (rows, Mb) row-major
        M, N, K = shape["M"], shape["N"], shape["K"]
        args, consts = mod.tma_launch_args(
            torch.empty(N, K), torch.empty(N, M, dtype=f8), torch.empty(N, cdiv(M, 128)), torch.empty(K, M, dtype=f8),
            torch.empty(K, cdiv(M, 128)), 128)
        fn = mod._fp8_wgrad_tma_kernel
        return mod._tma_tuned, fn, {**dict(zip(fn.arg_names[:len(args)], args, strict=True)), **consts}
    else:
        E, max_m, N, K = shape["E"], shape["max_m"], shape["N"], shape["K"]
        args, consts = mod.tma_launch_args(
            torch.empty(E, max_m, N, dtype=torch.bfloat16), torch.empty(E * max_m, K, dtype=f8),
            torch.empty(E, K // 128, max_m).transpose(1, 2),  # column-major per expert: descriptor-read scales
            torch.empty(E * N, K, dtype=f8), torch.empty(E, cdiv(N, 128), K // 128),
            torch.full((E,), max_m, dtype=torch.int32), 128)
        cls, fn = m_class(max_m), mod._fp8_grouped_gemm_masked_tma_kernel
    return mod._TMA_TUNED[cls], fn, {**dict(zip(fn.arg_names[:len(args)], args, strict=True)), **consts}


def _overlap(ttgir: str) -> bool:
    """In the K loop (the scf.for stepping by 2), an asynchronous warp_group_dot followed by a
    promotion (a 2-D mulf) before the next warp_group_dot_wait."""
    m = re.search(r"scf\.for [^\n]* step %c2_i32[^\n]*\{\n(.*?)\n\s*scf\.yield", ttgir, re.S)
    if not m:
        return False
    in_flight = False
    for line in m.group(1).splitlines():
        if "ttng.warp_group_dot " in line or "ttng.warp_group_dot\t" in line:
            in_flight = "isAsync = true" in line
        elif "ttng.warp_group_dot_wait" in line:
            in_flight = False
        elif in_flight and re.search(r"arith\.mulf .*tensor<\d+x\d+xf32", line):
            return True
    return False


def _wgmma_sequence(ptx: str) -> str:
    """The PTX as a string of its wgmma issues (M), commits (C), waits (W) and float32 FMAs (f)."""
    codes = {"wgmma.mma_async": "M", "wgmma.commit_group": "C", "wgmma.wait_group": "W", "fma.rn.f32": "f"}
    seq = []
    for line in ptx.splitlines():
        op = line.strip().split(" ")[0]
        seq.extend(code for prefix, code in codes.items() if op.startswith(prefix))
    return "".join(seq)


def _ptx_overlap(ptx: str) -> bool:
    """In the PTX: wgmma of block 2j, commit, wait 0, wgmma of block 2j+1, commit, then the
    promotions' FMAs before any further wait: the tensor cores run while the FMAs do."""
    return re.search(r"M+CWM+Cf{16,}", _wgmma_sequence(ptx)) is not None


def _ptx_overlap_one(ptx: str) -> bool:
    """The wgrad's tiles wider than 64 columns (its promotion holds x_t's column scales, so four
    float32 tiles do not fit): wgmma of block 2j, commit, wait, block 2j-1's promotion, wgmma of
    block 2j+1, commit, block 2j's promotion before the next wait: one promotion of two overlapped."""
    return re.search(r"M+CWf{16,}M+Cf{16,}", _wgmma_sequence(ptx)) is not None


def _split_k_fixup(ptx: str) -> dict:
    """The split-K fixup in the PTX: the tile counter's atomic (``atom.global.gpu.acq_rel.add``),
    whether a CTA barrier (``bar.sync``) comes right before it (nothing but moves, predicate
    setup and comments between), and the ``ld.global.cg`` loads of the partials after it."""
    lines = [line.strip() for line in ptx.splitlines()]
    atoms = [i for i, line in enumerate(lines) if re.search(r"\batom\.global\.gpu\.acq_rel\.add\b", line)]
    barrier_before = bool(atoms)
    for i in atoms:
        j = i - 1
        skip = ("//", ".loc", "mov", "setp", "$L")
        while j >= 0 and (not lines[j] or lines[j].startswith(skip) or "inline asm" in lines[j]):
            j -= 1
        barrier_before &= j >= 0 and lines[j].startswith(("bar.sync", "barrier.sync"))
    cg = sum(1 for line in lines[atoms[0]:] if "ld.global.cg" in line) if atoms else 0
    after = lines[atoms[-1]:] if atoms else []
    first_cg = next((i for i, line in enumerate(after) if "ld.global.cg" in line), len(after))
    barrier_after = any(line.startswith(("bar.sync", "barrier.sync")) for line in after[:first_cg])
    return dict(atomics=len(atoms), barrier_before_atomic=barrier_before, cg_loads=cg,
                barrier_after_atomic=barrier_after)


def _ttgir_barrier_before_atomic(ttgir: str) -> bool:
    """The kernel's own CTA barrier (``tl.debug_barrier``: ``gpu.barrier`` in the TTGIR) before
    the counter's atomic: asked for, not left to Triton's shared-memory barrier placement."""
    ops = [line.strip() for line in ttgir.splitlines() if "gpu.barrier" in line or "tt.atomic_rmw" in line]
    return any(a.startswith("gpu.barrier") and "tt.atomic_rmw" in b for a, b in zip(ops, ops[1:], strict=False))


def collect() -> None:
    """Subprocess entry: compile every picked (problem, config) and print JSON rows."""
    import sm90_compile

    # the tensors are on the CPU and the interpreter is off: the pruners rank for 132 SMs
    # (fp8_mainloop.num_sms)

    rows, seen = [], set()
    for kernel, label, shape in PROBLEMS:
        tuner, fn, nargs = _launch(kernel, shape)
        tuner.nargs = nargs
        kept = tuner.prune_configs({})
        picked = [kept[0]] + [c for c in kept[1:] if c.kwargs["WARP_SPECIALIZE"] or c.kwargs.get("SPLIT_K", 1) > 1]
        for c in picked:
            kw = {**nargs, **c.kwargs}
            key = (kernel, repr(sorted(c.kwargs.items())), c.num_warps, c.num_stages, shape.get("K"))
            if key in seen:
                continue
            seen.add(key)
            r = sm90_compile.compile_launch(fn, kw, c.num_warps, c.num_stages)
            ttgir, ptx = r.pop("ttgir"), r.pop("ptx")
            rows.append(dict(kernel=kernel, problem=label, config={**c.kwargs, "num_warps": c.num_warps},
                             scale_tma=nargs.get("SCALE_TMA", kernel == "fp8_wgrad"),  # the wgrad's: always
                             overlap=_overlap(ttgir), ptx_overlap=_ptx_overlap(ptx),
                             ptx_overlap_one=_ptx_overlap_one(ptx), **_split_k_fixup(ptx),
                             ttgir_barrier_before_atomic=_ttgir_barrier_before_atomic(ttgir), **r))
    print("SM90-JSON " + json.dumps(rows))


@pytest.fixture(scope="module")
def compiled():
    sys.path.insert(0, TESTS)
    import sm90_compile

    missing = sm90_compile.toolchain_missing()
    if missing:
        pytest.skip(missing)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([HERE, TESTS, env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", "import test_fp8_sm90; test_fp8_sm90.collect()"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("SM90-JSON "))
    rows = json.loads(line.removeprefix("SM90-JSON "))
    for r in rows:  # the table the report quotes (pytest -s shows it)
        print(f"{r['kernel']:24s} {r['problem']:32s} {r['config']} regs={r['regs']} spill={r['spill_bytes']} "
              f"smem={r['smem']} ctas/SM={r['ctas_per_sm']} wgmma={r['wgmma']} tma={r['tma']} "
              f"ws={r['warp_specialized']} loop_ld_global={r['loop_ld_global']} overlap={r['overlap']}/"
              f"{r['ptx_overlap']} split_k_atomic={r['atomics']}/{r['barrier_before_atomic']}/{r['cg_loads']}")
    return rows


def test_every_kernel_and_class_was_compiled(compiled):
    assert {r["kernel"] for r in compiled} == {k for k, _, _ in PROBLEMS}
    assert any(r["config"]["WARP_SPECIALIZE"] for r in compiled)
    assert any(not r["config"]["WARP_SPECIALIZE"] for r in compiled)


def test_no_spills_and_shared_memory_within_a_block(compiled):
    for r in compiled:
        assert r["spill_bytes"] == 0, r
        assert r["smem"] <= 227 * 1024, r
        assert r["ctas_per_sm"] >= 1, r


def test_wgmma_and_tma(compiled):
    for r in compiled:
        assert r["wgmma"] and r["tma"], r


def test_warp_specialisation_where_asked(compiled):
    for r in compiled:
        if r["config"]["WARP_SPECIALIZE"]:
            assert r["warp_specialized"] and r["setmaxnreg"], r
            # column-major activation scales: both scales through the producer's TMA
            assert r["scale_tma"] and r["loop_ld_global"] == 0, r
        else:
            assert not r["warp_specialized"], r


def test_pipelined_schedule_has_async_scales_and_overlapped_promotion(compiled):
    for r in compiled:
        if not r["config"]["WARP_SPECIALIZE"]:
            assert r["loop_ld_global"] == 0, r
            if r["kernel"] == "fp8_wgrad" and r["config"]["BLOCK_N"] > 64:
                assert r["overlap"] and r["ptx_overlap_one"], r
            else:
                assert r["overlap"] and r["ptx_overlap"], r


def test_split_k_fixup_orders_partials_before_the_counter(compiled):
    """The split-K configs (decode): each unit's partial stores, a CTA barrier (the kernel's own,
    in the TTGIR, and in the PTX), then one atomic add with acquire-release semantics at gpu scope
    on the tile's counter, a CTA barrier after it (its result reaches every thread through shared
    memory) and the reducer's loads of the partials from L2 (``.cg``) after that. Unsplit configs
    have no atomic."""
    split = [r for r in compiled if r["config"].get("SPLIT_K", 1) > 1]
    assert {r["problem"] for r in split} >= {"decode 64x2112x7168", "decode 64x4096x7168"}
    assert any(r["config"]["BLOCK_N"] == 128 for r in split)  # the widest split tiles: 255 registers, no spill
    for r in compiled:
        if r["config"].get("SPLIT_K", 1) > 1:
            assert r["atomics"] == 1 and r["barrier_before_atomic"] and r["cg_loads"] > 0, r
            assert r["ttgir_barrier_before_atomic"] and r["barrier_after_atomic"], r
        else:
            assert r["atomics"] == 0, r
