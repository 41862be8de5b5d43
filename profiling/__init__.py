"""moela.profiling: shapes registry, timers, ceilings, NVML telemetry, benchmarks, reports.

Run ``python -m moela.profiling --help``. From Python (a GPU test reading its shapes)::

    from moela.profiling import get_op
    op = get_op("grouped_gemm")
    for problem in op.problems("check"):          # DeepSeek shapes, from the registry
        case = op.make_case(problem, torch.device("cuda"), seed=0)
        xs, w, offsets = op.signature(case)[0]

Modules: ``shapes`` (DeepSeek dims, token sweeps, DeepGEMM/FlashMLA grids, routings),
``registry`` (Op, Impl, Case; ``ops/`` holds one module per op), ``timing``, ``ceilings``,
``environment`` (versions, NVML), ``runner`` (check, bench), ``results``, ``report``, ``cli``,
``layers`` (the reference layers, timed), ``audit`` (every Triton kernel compiled for sm_90 without
a GPU, and judged; ``audit_shapes`` holds its launches), ``perf_reports`` (``triton.testing.perf_report``
sweeps of any op; ``examples/`` has one script per family to copy), ``host_overhead`` (an MoE decode
step's Python cost). Nothing here touches a GPU at import time.
"""

from .registry import NOT_IMPLEMENTED, Case, Check, Impl, Op, Unavailable, all_ops, get_op, register
from .shapes import Problem

__all__ = [
    "NOT_IMPLEMENTED", "Case", "Check", "Impl", "Op", "Problem", "Unavailable", "all_ops", "get_op", "register",
]
