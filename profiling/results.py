"""Result files: one JSON (everything) and one CSV (one line per implementation x problem).

JSON layout (``schema`` = ``moela.profiling.results/1``)::

    {"schema": ..., "kind": "bench" | "check",
     "environment": {date, git_ref, torch, triton, device, nvml: {name, driver, ...}, ...},
     "settings": {ops, sets, impls, device, rep_ms, ...},
     "ceilings": {"copy": {"value", "unit", ...}, "matmul_bf16": {...}, ...},
     "stats": {problems_run, problems_left_out, seconds},
     "rows": [{op, set, problem, impl, status, median_ms, tflops, gbps, frac_roofline, speedup,
               check: {...}, telemetry: {...}, memory: {peak_mib, above_start_mib} | {skipped}, ...}, ...]}

The CSV repeats, on every line, the GPU, driver, torch and triton versions, git ref and date.
"""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path
from typing import Any

__all__ = ["SCHEMA", "save_results", "load_results", "csv_columns", "default_stem"]

SCHEMA = "moela.profiling.results/1"

_ENV_COLUMNS = ("device", "driver", "torch", "triton", "git_ref", "date")
_ROW_COLUMNS = (
    "op", "set", "problem", "series", "tokens", "impl", "kind", "status", "reason",
    "median_ms", "p20_ms", "p80_ms", "min_ms", "reps", "method", "rotation", "l2_flush",
    "flops", "bytes", "intensity", "tflops", "gbps", "compute_ceiling", "frac_compute", "frac_bandwidth",
    "roofline_ms", "frac_roofline", "bound", "baseline", "speedup",
    "check_ok", "check_metric", "check_value", "check_tol", "peak_mib", "peak_above_start_mib",
    "sm_clock_mhz_min", "sm_clock_mhz_max", "power_w_max", "temperature_c_max", "throttled",
)


def csv_columns() -> tuple[str, ...]:
    return _ROW_COLUMNS + _ENV_COLUMNS


def _env_values(env: dict[str, Any]) -> dict[str, Any]:
    nvml = env.get("nvml") or {}
    return {
        "device": env.get("device"), "driver": nvml.get("driver") if nvml.get("available") else None,
        "torch": env.get("torch"), "triton": env.get("triton"), "git_ref": env.get("git_ref"), "date": env.get("date"),
    }


def _flat(row: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    out = {c: row.get(c) for c in _ROW_COLUMNS}
    chk = row.get("check") or {}
    out.update(check_ok=chk.get("ok"), check_metric=chk.get("metric"), check_value=chk.get("value"),
               check_tol=chk.get("tol"))
    mem = row.get("memory") or {}
    out.update(peak_mib=mem.get("peak_mib"), peak_above_start_mib=mem.get("above_start_mib"))
    tel = row.get("telemetry") or {}
    for k in ("sm_clock_mhz_min", "sm_clock_mhz_max", "power_w_max", "temperature_c_max", "throttled"):
        out[k] = tel.get(k)
    out.update(env)
    return out


def default_stem(env: dict[str, Any], kind: str = "bench") -> str:
    """``bench-<device>-<date>``, e.g. ``bench-nvidia-h200-20261128-152233``."""
    device = re.sub(r"[^a-z0-9]+", "-", str(env.get("device", "device")).lower()).strip("-")
    date = re.sub(r"[^0-9]", "", str(env.get("date", "")))[:14]
    return f"{kind}-{device}-{date[:8]}-{date[8:14]}"


def save_results(data: dict[str, Any], out_dir: str | os.PathLike, stem: str) -> tuple[Path, Path]:
    """Write ``<stem>.json`` and ``<stem>.csv`` into ``out_dir`` (created); returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = {"schema": SCHEMA, **data}
    json_path, csv_path = out / f"{stem}.json", out / f"{stem}.csv"
    json_path.write_text(json.dumps(data, indent=1, default=_jsonable, allow_nan=True) + "\n", encoding="utf-8")
    env = _env_values(data.get("environment", {}))
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=csv_columns())
        w.writeheader()
        for row in data.get("rows", []):
            w.writerow(_flat(row, env))
    return json_path, csv_path


def _jsonable(v: Any) -> Any:
    if hasattr(v, "as_dict"):
        return v.as_dict()
    return str(v)


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    """Read a result JSON written by :func:`save_results`; ``ValueError`` for anything else."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such result file")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not a JSON result file ({e})") from e
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ValueError(f"{p}: not a moela.profiling result (expected schema {SCHEMA!r})")
    return data
