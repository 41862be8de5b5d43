"""Run the registry: correctness checks of the moela kernels, and benchmarks of every implementation.

:func:`run_check` compares each available moela kernel with its op's truth (the reference) on
a shape set. :func:`run_bench` times every selected implementation of every problem with the
device's timer (CUDA events, or the CPU wall clock), checks each output against the truth,
samples NVML telemetry around each timing, and derives throughput, the fraction of the
measured ceilings, the speedup over the op's baseline measured in the same run and (CUDA) the
peak memory of the timed calls. An out-of-memory problem is a skip with its reason, not an error.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from moela import knobs

from .ceilings import ceiling_for
from .environment import Telemetry
from .registry import Case, Impl, Op, Unavailable
from .shapes import Problem
from .timing import l2_bytes, rotation_sets, time_cuda_graphs, time_fns

__all__ = ["BenchSettings", "run_bench", "run_check", "derive", "add_speedups", "interpreter_active"]


def interpreter_active() -> bool:
    return knobs.interpret()


def _reason(e: BaseException, limit: int = 1000) -> str:
    """``Type: first line of the message`` (an :class:`Unavailable`'s message alone), at most ``limit`` characters."""
    text = str(e).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: {first}"[:limit] if not isinstance(e, Unavailable) else first[:limit]


#: Why a CPU row has no peak memory.
NO_PEAK_MEMORY = "not measured on CPU (torch tracks peak memory on CUDA devices only)"


class _PeakMemory:
    """``torch.cuda.max_memory_allocated`` around a region: ``{"peak_mib", "above_start_mib"}``
    (the peak, and the peak less what was allocated when the region began: the call's outputs and
    workspace, its inputs left out), or ``{"skipped": reason}`` on a CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.result: dict[str, Any] = {"skipped": NO_PEAK_MEMORY}

    def __enter__(self) -> _PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda" and exc[0] is None:
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            self.result = {"peak_mib": round(peak / 2**20, 2), "above_start_mib": round((peak - self.start) / 2**20, 2)}


def _progress(items: Sequence[Any], enabled: bool, desc: str) -> Iterable[Any]:
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:  # a dependency, but a missing progress bar is no reason to stop
        return items

    return tqdm(items, desc=desc, unit="problem", dynamic_ncols=True, leave=False, file=sys.stderr)


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------- derived numbers
def derive(row: dict[str, Any], ceilings: dict[str, dict[str, Any]], compute: str) -> None:
    """Add throughput, arithmetic intensity, fractions of the ceilings and the roofline bound."""
    ms = row.get("median_ms")
    flops, nbytes = row["flops"], row["bytes"]
    row["intensity"] = flops / nbytes if nbytes else None
    if not ms:
        return
    s = ms * 1e-3
    row["tflops"] = flops / s / 1e12 if flops else None
    row["gbps"] = nbytes / s / 1e9
    peak = ceiling_for(compute, ceilings) if flops else None
    bw = ceilings.get("copy", {}).get("value")
    row["compute_ceiling"] = peak[0] if peak else None
    row["frac_compute"] = row["tflops"] / peak[1] if peak else None
    row["frac_bandwidth"] = row["gbps"] / bw if bw else None
    t_compute = flops / (peak[1] * 1e12) if peak else 0.0
    t_memory = nbytes / (bw * 1e9) if bw else 0.0
    if t_compute or t_memory:
        row["roofline_ms"] = max(t_compute, t_memory) * 1e3
        row["frac_roofline"] = row["roofline_ms"] / ms
        row["bound"] = "compute" if t_compute > t_memory else "memory"


def add_speedups(rows: list[dict[str, Any]], order: Sequence[str]) -> None:
    """Speedup of every timed row of one problem over the first of ``order`` that was timed."""
    timed = {r["impl"]: r for r in rows if r.get("median_ms")}
    base = next((timed[n] for n in order if n in timed), None)
    for r in rows:
        if base is not None and r.get("median_ms"):
            r["baseline"] = base["impl"]
            r["speedup"] = base["median_ms"] / r["median_ms"]


# ---------------------------------------------------------------------- benchmark
@dataclass
class BenchSettings:
    device: torch.device
    impls: Sequence[str] | None = None  # None: all; names or kinds ("moela", "reference", "torch")
    warmup_ms: float = 10.0
    rep_ms: float = 40.0
    time_budget_s: float | None = None
    verify: bool = True
    progress: bool = True
    seed: int = 0
    telemetry: bool = True
    on_row: Callable[[dict[str, Any]], None] | None = None  # called as each row completes
    graphs: bool = False  # CUDA: also time CUDA-graph replays of the rows faster than graph_below_ms
    graph_below_ms: float = 1.0
    # Calls per interpreted moela row, with no separate warm-up (a check ran them already), or None:
    # timed like every other row.
    interpreter_calls: int | None = None
    gpu_busy: list[dict[str, Any]] = field(default_factory=list)  # other processes on the GPU (rows flagged)
    cross_check: bool = True  # CUDA: each moela row timed again by triton.testing.do_bench
    stats: dict[str, Any] = field(default_factory=dict)  # filled: problems run / left out, seconds


def _selected(impl: Impl, wanted: Sequence[str] | None) -> bool:
    if wanted is None:
        return True
    return impl.name in wanted or impl.kind in wanted or "all" in wanted


def _base_row(op: Op, p: Problem, impl: Impl) -> dict[str, Any]:
    return {
        "op": op.name, "set": p.set, "problem": p.name, "series": p.series, "tokens": p.tokens,
        "params": dict(p.params), "impl": impl.name, "kind": impl.kind, "same_function": impl.same_function,
        "note": impl.note, "status": "skipped", "reason": "", "flops": None, "bytes": None,
    }


def run_bench(plan: Sequence[tuple[Op, Problem]], ceilings: dict[str, dict[str, Any]],
              s: BenchSettings) -> list[dict[str, Any]]:
    """Benchmark every (op, problem) of ``plan``; one row per implementation (run or skipped)."""
    device = s.device
    flush = None
    if device.type == "cuda":
        l2 = l2_bytes(device)
        flush = torch.empty(max(256 << 20, 2 * l2), dtype=torch.int8, device=device)
    telemetry = Telemetry(_nvml_index(device), enabled=s.telemetry and device.type == "cuda")
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    wall: dict[str, float] = {}  # op -> seconds spent on its problems (inputs, compiling, timing, checks)
    done = 0
    interrupted = False
    try:
        for op, p in _progress(plan, s.progress, "bench"):
            if s.time_budget_s is not None and time.perf_counter() - start > s.time_budget_s:
                break
            t0 = time.perf_counter()
            problem_rows = _bench_problem(op, p, ceilings, s, telemetry, flush)
            wall[op.name] = wall.get(op.name, 0.0) + time.perf_counter() - t0
            add_speedups(problem_rows, op.baseline_order)
            for r in problem_rows:
                if s.on_row is not None:
                    s.on_row(r)
            rows += problem_rows
            done += 1
            _free(device)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: keep what was measured
        interrupted = True
    finally:
        telemetry.close()
    s.stats.update({"problems_run": done, "problems_left_out": len(plan) - done, "interrupted": interrupted,
                    "seconds": time.perf_counter() - start, "telemetry": telemetry.reason or "nvml",
                    "seconds_by_op": {k: round(v, 3) for k, v in sorted(wall.items(), key=lambda kv: -kv[1])}})
    return rows


def _nvml_index(device: torch.device) -> int:
    from .environment import nvml_index

    return nvml_index(device.index or 0) if device.type == "cuda" else 0


def _bench_problem(op: Op, p: Problem, ceilings: dict[str, dict[str, Any]], s: BenchSettings,
                   telemetry: Telemetry, flush: torch.Tensor | None) -> list[dict[str, Any]]:
    device = s.device
    impls = [i for i in op.impls() if _selected(i, s.impls)]
    rows = [_base_row(op, p, i) for i in impls]  # in the op's order: moela, reference, baselines
    order = sorted(range(len(impls)), key=lambda j: impls[j].name != op.truth)  # the truth runs first
    t_setup = time.perf_counter()
    try:
        cases = [op.make_case(p, device, s.seed)]
    except Exception as e:
        for r in rows:
            r["status"], r["reason"] = "error", f"inputs: {_reason(e)}"
        return rows
    case0 = cases[0]
    n_sets = 1
    if device.type == "cuda":
        n_sets = rotation_sets(case0.bytes, case0.allocated_bytes(), l2_bytes(device))
    try:
        for i in range(1, max(n_sets, 1)):
            cases.append(op.make_case(p, device, s.seed + i))
    except torch.OutOfMemoryError:  # no room for more input sets: flush L2 instead
        del cases[1:]
        _free(device)
        n_sets = 0
    use_flush = flush if n_sets == 0 else None
    setup_s = time.perf_counter() - t_setup

    truth_out: Any = None
    truth_reason = ""
    if s.verify and not any(i.name == op.truth for i in impls):
        truth_out, truth_reason = _truth(op, case0)

    for j in order:
        impl, row = impls[j], rows[j]
        row.update(flops=case0.flops, bytes=case0.bytes, info=case0.info)
        t_impl = time.perf_counter()
        row["wall_s"] = {"setup": round(setup_s, 4)}  # the problem's inputs (shared by its rows)
        try:
            fns = [impl.prepare(c) for c in cases]
        except Unavailable as e:
            row["status"], row["reason"] = "skipped", _reason(e)
            if impl.name == op.truth:
                truth_reason = f"{op.truth} skipped: {row['reason']}"
            continue
        except Exception as e:
            row["status"], row["reason"] = "error", f"prepare: {_reason(e)}"
            continue
        kind_interp = impl.kind == "moela" and interpreter_active()
        timer = {"warmup_ms": s.warmup_ms, "rep_ms": s.rep_ms}
        if impl.kind == "reference" or kind_interp:
            timer["min_reps"] = 1  # the definition is slow at DeepSeek sizes, the interpreter always
        if kind_interp and s.interpreter_calls is not None:
            timer.update(min_reps=s.interpreter_calls, max_reps=s.interpreter_calls, warm=True)
        if impl.kind == "reference" and device.type == "cuda":
            timer["estimate_from_first"] = True  # nothing to compile: its first call sizes the reps
        t_time = time.perf_counter()
        row["wall_s"]["prepare"] = round(t_time - t_impl, 4)
        if impl.kind == "moela":
            _forget_configs()
        try:
            with telemetry.around() as samples, _PeakMemory(device) as memory:
                timing, out = time_fns(fns, device, interpreter=kind_interp, flush=use_flush, **timer)
        except torch.OutOfMemoryError as e:  # the problem does not fit beside the others' inputs: a skip
            row["status"], row["reason"] = "skipped", f"out of memory: {_reason(e)}"
            if impl.name == op.truth:
                truth_reason = f"{op.truth} skipped: {row['reason']}"
            _free(device)
            continue
        except Exception as e:
            row["status"], row["reason"] = "error", _reason(e)
            if impl.name == op.truth:
                truth_reason = f"{op.truth} failed: {row['reason']}"
            _free(device)
            continue
        row["wall_s"]["timing"] = round(time.perf_counter() - t_time, 4)  # first call (compile, tuning) included
        row.update(status="ok", **timing.as_dict(), telemetry=samples.summary(), memory=memory.result)
        if impl.kind == "moela":
            row["configs"] = _configs_used()  # kernel -> [config, where it came from]
            if s.cross_check and device.type == "cuda":
                row["do_bench"] = _do_bench_check(fns[0], timing.median_ms, timer)
        if s.gpu_busy:
            row["gpu_busy"] = [p["pid"] for p in s.gpu_busy]
        derive(row, ceilings, op.compute)
        not_capturable = s.stats.setdefault("graph_not_capturable", {})  # "op / impl" -> why
        if (s.graphs and device.type == "cuda" and impl.kind != "reference" and timing.median_ms < s.graph_below_ms
                and f"{op.name} / {impl.name}" not in not_capturable):
            row["graph"] = _graph_timing(fns, timer, use_flush)
            if "reason" in row["graph"]:  # not tried again for this op's other problems
                not_capturable[f"{op.name} / {impl.name}"] = row["graph"]["reason"]
        if impl.name == op.truth:
            truth_out = out if s.verify else None
        elif s.verify and impl.same_function:
            _record_check(row, op, out, truth_out, truth_reason)
        del out, fns
    return rows


#: moela's CUDA-event median and triton's do_bench median may differ by this much (relative)
#: before a row is flagged: different warm-up, flushing and repetition choices, not a wrong clock.
TIMER_TOLERANCE = 0.15


def _do_bench_check(fn: Callable[[], Any], median_ms: float, timer: dict[str, Any]) -> dict[str, Any]:
    """The same call timed by ``triton.testing.do_bench`` (a second, independent clock)."""
    import triton.testing

    try:
        ms = float(triton.testing.do_bench(fn, warmup=timer["warmup_ms"], rep=timer["rep_ms"], return_mode="median"))
    except Exception as e:
        return {"ms": None, "agree": None, "reason": _reason(e)}
    ratio = ms / median_ms if median_ms > 0 else float("nan")
    return {"ms": ms, "ratio": ratio, "agree": abs(ratio - 1) <= TIMER_TOLERANCE}


def _forget_configs() -> None:
    """Clear what every autotuned moela kernel ran last, so that the next row records its own."""
    from moela.kernels import _common

    for t in _common._TUNERS:
        t.best_config = None


def _configs_used() -> dict[str, list[str]]:
    from moela.kernels import _common

    return {name: list(v) for name, v in _common.chosen_configs().items()}


def _graph_timing(fns: Sequence[Callable[[], Any]], timer: dict[str, Any], flush: torch.Tensor | None) -> dict:
    """``{"median_ms", "p20_ms", "p80_ms", "reps"}`` of CUDA-graph replays, or ``{"reason"}``."""
    try:
        t = time_cuda_graphs(fns, warmup_ms=timer["warmup_ms"], rep_ms=timer["rep_ms"], flush=flush)
        return {"median_ms": t.median_ms, "p20_ms": t.p20_ms, "p80_ms": t.p80_ms, "reps": t.reps}
    except Exception as e:  # not capturable (a host sync, say): the eager time stands alone
        with contextlib.suppress(Exception):
            torch.cuda.synchronize()
        return {"reason": _reason(e)}


def _truth(op: Op, case: Case) -> tuple[Any, str]:
    try:
        fn = op.impl(op.truth).prepare(case)
        return fn(), ""
    except Exception as e:
        return None, f"{op.truth}: {_reason(e)}"


def _record_check(row: dict[str, Any], op: Op, out: Any, truth_out: Any, truth_reason: str) -> None:
    if truth_out is None:
        row["check"] = {"metric": None, "value": None, "tol": None, "ok": None,
                        "detail": f"not checked: {truth_reason or 'no truth output'}"}
        return
    try:
        row["check"] = op.compare(out, truth_out).as_dict()
    except torch.OutOfMemoryError as e:  # no room to compare: not checked, not wrong
        row["check"] = {"metric": None, "value": None, "tol": None, "ok": None,
                        "detail": f"not checked: out of memory while comparing ({_reason(e)})"}
    except Exception as e:
        row["check"] = {"metric": None, "value": None, "tol": None, "ok": False, "detail": f"compare: {_reason(e)}"}


# ---------------------------------------------------------------------- check
def run_check(plan: Sequence[tuple[Op, Problem]], device: torch.device, impls: Sequence[str] | None = None,
              progress: bool = True, seed: int = 0,
              on_row: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Compare implementations (default: the moela kernels) with each op's truth, once per problem.

    Rows: op, set, problem, impl, status ("pass", "FAIL", "error", "skipped"), check, reason.
    ``on_row`` is called with each row once its problem is done (a log sees progress).
    """
    wanted = impls if impls is not None else ("moela",)
    rows: list[dict[str, Any]] = []
    for op, p in _progress(plan, progress, "check"):
        before = len(rows)
        _check_problem(op, p, device, wanted, seed, rows)
        if on_row is not None:
            for r in rows[before:]:
                on_row(r)
    return rows


def _check_problem(op: Op, p: Problem, device: torch.device, wanted: Sequence[str], seed: int,
                   rows: list[dict[str, Any]]) -> None:
    """Append the check rows of one problem to ``rows``."""
    candidates = [i for i in op.impls() if _selected(i, wanted) and i.same_function
                  and i.name != op.truth]
    if not candidates:
        return
    base = {"op": op.name, "set": p.set, "problem": p.name}
    prepared: list[tuple[Impl, Any]] = []
    try:
        case = op.make_case(p, device, seed)
    except Exception as e:
        rows += [{**base, "impl": i.name, "status": "error", "reason": f"inputs: {_reason(e)}"} for i in candidates]
        return
    for impl in candidates:
        try:
            prepared.append((impl, impl.prepare(case)))
        except Unavailable as e:
            rows.append({**base, "impl": impl.name, "status": "skipped", "reason": _reason(e)})
        except Exception as e:
            rows.append({**base, "impl": impl.name, "status": "error", "reason": f"prepare: {_reason(e)}"})
    if not prepared:
        return
    truth, why = _truth(op, case)
    for impl, fn in prepared:
        row = {**base, "impl": impl.name}
        if truth is None:
            rows.append({**row, "status": "error", "reason": f"no truth output ({why})"})
            continue
        try:
            out = fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            chk = op.compare(out, truth)
        except torch.OutOfMemoryError as e:
            rows.append({**row, "status": "skipped", "reason": f"out of memory: {_reason(e)}"})
            _free(device)
            continue
        except Exception as e:
            rows.append({**row, "status": "error", "reason": _reason(e)})
            continue
        rows.append({**row, "status": "pass" if chk.ok else "FAIL", "check": chk.as_dict(),
                     "reason": chk.detail})
    del case, truth, prepared
    _free(device)

