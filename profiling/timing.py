"""Timers: CUDA events on a GPU, wall clock on a CPU (labelled as such).

CUDA (:func:`time_cuda`): every input set is called once first (compilation, autotuning and
handle creation stay out of the numbers), one call estimates the time, then warm-up calls
and repetitions timed one by one with CUDA events. Working sets smaller than a few L2s are
rotated over several input sets (:func:`rotation_sets`); where that would need too many
sets, L2 is flushed before every timed call instead (outside the events). Before each timed
call the GPU is kept busy (the flush, or ``torch.cuda._sleep``) so that the host has queued
the call when its start event runs: the times are GPU time, launch latency shows only where it
exceeds that head start (many small launches). Statistics: median, 20th/80th percentiles,
min, max, mean.

CUDA graphs (:func:`time_cuda_graphs`, ``bench --graphs``): each input set's call captured once
into a CUDA graph and the replays timed the same way: the device time of calls whose eager
time is mostly the host's launch work (decode-sized ops), as a CUDA-graph-captured decode step
sees them.

CPU (:func:`time_cpu`): ``time.perf_counter`` around each call after one warm-up call (none where a
check already ran the call at these shapes). Such
numbers (and the Triton interpreter's) say nothing about GPU speed; ``Timing.method`` says
which timer was used and every report prints it.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

__all__ = [
    "Timing", "time_cuda", "time_cuda_graphs", "time_cpu", "time_fns", "rotation_sets", "l2_bytes", "summarize",
]

#: Rotate until the input sets together exceed this many L2s.
ROTATE_L2_MULTIPLE = 3
#: At most this many input sets, and at most this many bytes for them.
MAX_ROTATION_SETS = 16
MAX_ROTATION_BYTES = 8 << 30
#: GPU cycles spun before each timed call when L2 is not flushed (~50 µs at 2 GHz).
SPACER_CYCLES = 100_000


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    min_ms: float
    max_ms: float
    mean_ms: float
    reps: int
    method: str  # "cuda-events", "cpu-wall" or "cpu-wall (triton interpreter)"
    rotation: int = 1  # input sets rotated over
    l2_flush: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _quantile(sorted_ms: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of sorted values."""
    if len(sorted_ms) == 1:
        return sorted_ms[0]
    pos = q * (len(sorted_ms) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_ms) - 1)
    return sorted_ms[lo] + (sorted_ms[hi] - sorted_ms[lo]) * (pos - lo)


def summarize(times_ms: Sequence[float], method: str, rotation: int = 1, l2_flush: bool = False) -> Timing:
    if not times_ms:
        raise ValueError("no times to summarize")
    s = sorted(times_ms)
    return Timing(
        median_ms=statistics.median(s), p20_ms=_quantile(s, 0.2), p80_ms=_quantile(s, 0.8),
        min_ms=s[0], max_ms=s[-1], mean_ms=statistics.fmean(s), reps=len(s), method=method,
        rotation=rotation, l2_flush=l2_flush,
    )


def l2_bytes(device: torch.device) -> int:
    """L2 size of a CUDA device as torch reports it (H200: 60 MB); 50 MiB if unknown."""
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 0) or 50 << 20)


def rotation_sets(working_set_bytes: float, allocated_bytes: int, l2: int) -> int:
    """How many input sets to rotate over so that they outgrow L2; 0 means "flush L2 instead".

    ``working_set_bytes`` is what one call touches (the counted bytes), ``allocated_bytes``
    what one more input set costs in memory.
    """
    target = ROTATE_L2_MULTIPLE * l2
    if working_set_bytes >= target:
        return 1
    n = math.ceil(target / max(working_set_bytes, 1.0))
    if n > MAX_ROTATION_SETS or n * allocated_bytes > MAX_ROTATION_BYTES:
        return 0
    return n


def time_cuda(
    fns: Sequence[Callable[[], Any]],
    *,
    warmup_ms: float = 10.0,
    rep_ms: float = 40.0,
    min_reps: int = 3,
    max_reps: int = 200,
    flush: torch.Tensor | None = None,
    estimate_from_first: bool = False,
) -> tuple[Timing, Any]:
    """Time ``fns`` (one callable per rotated input set) with CUDA events.

    Returns the timing and the output of the first call of ``fns[0]`` (for a correctness
    check: no extra call needed). ``estimate_from_first``: the first call has nothing to
    compile (a slow reference), so it sizes the repetitions and one call is saved.
    """
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    first = fns[0]()
    e.record()
    for fn in fns[1:]:
        fn()
    torch.cuda.synchronize()

    sleep = getattr(torch.cuda, "_sleep", None)

    def one(i: int, start: torch.cuda.Event, end: torch.cuda.Event) -> None:
        # Give the GPU something to do first (the L2 flush, or a short spin), so that the host
        # has queued the call before the start event runs: the events then time the GPU's work,
        # not Python's launch latency (as a CUDA graph replay would see it).
        if flush is not None:
            flush.zero_()
        elif sleep is not None:
            sleep(SPACER_CYCLES)
        start.record()
        fns[i % len(fns)]()
        end.record()

    if not estimate_from_first:
        one(0, s, e)
        torch.cuda.synchronize()
    estimate = max(s.elapsed_time(e), 1e-3)
    n_warm = min(100, int(warmup_ms / estimate))
    n_rep = max(min_reps, min(max_reps, int(rep_ms / estimate)))
    for i in range(n_warm):
        if flush is not None:
            flush.zero_()
        fns[i % len(fns)]()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    for i in range(n_rep):
        one(i, starts[i], ends[i])
    torch.cuda.synchronize()
    times = [a.elapsed_time(b) for a, b in zip(starts, ends, strict=True)]
    return summarize(times, "cuda-events", rotation=len(fns), l2_flush=flush is not None), first


def time_cuda_graphs(
    fns: Sequence[Callable[[], Any]],
    *,
    warmup_ms: float = 10.0,
    rep_ms: float = 40.0,
    min_reps: int = 3,
    max_reps: int = 200,
    flush: torch.Tensor | None = None,
) -> Timing:
    """Time CUDA-graph replays of ``fns`` (already run eagerly: compiled and tuned).

    Each callable is warmed on a side stream (as torch's graph docs ask), captured into its own
    graph, then the replays are timed with events like :func:`time_cuda`'s calls. Raises what the
    capture raises (a host synchronisation inside ``fn``, say); the caller records the reason.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graphs = []
    capture = torch.cuda.Stream()
    for fn in fns:
        g = torch.cuda.CUDAGraph()
        # The outer context restores the caller's stream even when the capture fails (a failed
        # capture_end raises before torch.cuda.graph would restore it).
        with torch.cuda.stream(capture), torch.cuda.graph(g, stream=capture):
            fn()
        graphs.append(g)
    torch.cuda.synchronize()
    timing, _ = time_cuda([g.replay for g in graphs], warmup_ms=warmup_ms, rep_ms=rep_ms, min_reps=min_reps,
                          max_reps=max_reps, flush=flush)
    timing.method = "cuda-graph replay"
    return timing


def time_cpu(
    fns: Sequence[Callable[[], Any]],
    *,
    rep_ms: float = 100.0,
    min_reps: int = 3,
    max_reps: int = 25,
    interpreter: bool = False,
    warm: bool = False,
) -> tuple[Timing, Any]:
    """Wall-clock milliseconds on the CPU after one warm-up call; same return as :func:`time_cuda`.

    ``warm``: the callables ran before at these shapes (a check did), so no warm-up call is made:
    the first call is timed too (``min_reps``..``max_reps`` calls in all; the interpreter's calls
    take up to seconds each)."""
    t0 = time.perf_counter()
    first = fns[0]()
    warm_ms = (time.perf_counter() - t0) * 1e3
    n_rep = max(min_reps, min(max_reps, int(rep_ms / max(warm_ms, 1e-3))))
    times = [warm_ms] if warm else []
    for i in range(len(times), n_rep):
        t0 = time.perf_counter()
        fns[i % len(fns)]()
        times.append((time.perf_counter() - t0) * 1e3)
    method = "cpu-wall (triton interpreter)" if interpreter else "cpu-wall"
    return summarize(times, method, rotation=len(fns)), first


def time_fns(fns: Sequence[Callable[[], Any]], device: torch.device, *, interpreter: bool = False,
             flush: torch.Tensor | None = None, **kwargs: Any) -> tuple[Timing, Any]:
    """:func:`time_cuda` on a CUDA device, :func:`time_cpu` elsewhere (kwargs of the right one)."""
    if device.type == "cuda":
        return time_cuda(fns, flush=flush, **kwargs)
    cpu_kwargs = {k: v for k, v in kwargs.items() if k in ("rep_ms", "min_reps", "max_reps", "warm")}
    return time_cpu(fns, interpreter=interpreter, **cpu_kwargs)
