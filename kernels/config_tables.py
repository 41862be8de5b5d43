"""Per-GPU tables of tuned kernel configs: what ``python -m moela.profiling tune`` measured, used first.

A table is a JSON file in ``kernels/configs/``, one per GPU model, named after the device
(``torch.cuda.get_device_name``, lowercased, non-alphanumerics as ``-``: ``nvidia-h200.json``).
Each entry holds a kernel's name, its autotune key (the values of the kernel's key arguments,
the M bucket included when the kernel has one), the dtypes of its tensor arguments and the
best config. An autotuned kernel (``kernels._common.autotune``) meeting a key it has not tuned
looks here first: an entry with the same kernel, dtypes and key values, the M bucket aside,
gives the config of the nearest M bucket (log distance) without timing anything. Only keys no
table holds are autotuned. ``MOELA_CONFIG_TABLES=0`` turns the lookup off (``tune`` does, to
measure). Which config each kernel ran last, and where it came from, is kept for the benchmark
rows (:func:`chosen_configs`).
"""

from __future__ import annotations

import functools
import json
import math
import re
from pathlib import Path
from typing import Any

import triton

from moela import knobs

__all__ = [
    "TABLE_DIR", "FORMAT", "device_slug", "table_path", "load_table", "lookup", "config_from_json",
    "config_to_json", "entry", "write_table", "record_choice", "chosen_configs", "tables_enabled", "M_KEYS",
]

TABLE_DIR = Path(__file__).resolve().parent / "configs"
FORMAT = 1
#: Autotune key arguments that carry a row count: matched by nearest bucket, not exactly.
M_KEYS = ("M_BUCKET", "T_CLASS")

_chosen: dict[str, tuple[str, str]] = {}


def tables_enabled() -> bool:
    return knobs.get("MOELA_CONFIG_TABLES") != "0"


def device_slug(device_name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")


def table_path(device_name: str, directory: Path | None = None) -> Path:
    return (TABLE_DIR if directory is None else directory) / f"{device_slug(device_name)}.json"


def config_to_json(config: triton.Config) -> dict[str, Any]:
    return {"kwargs": dict(config.kwargs), "num_warps": config.num_warps, "num_stages": config.num_stages,
            "num_ctas": config.num_ctas}


def config_from_json(d: dict[str, Any]) -> triton.Config:
    return triton.Config(dict(d["kwargs"]), num_warps=d["num_warps"], num_stages=d["num_stages"],
                         num_ctas=d.get("num_ctas", 1))


def entry(kernel: str, key: dict[str, Any], dtypes: list[str], config: triton.Config, **extra: Any) -> dict[str, Any]:
    """One table entry (``extra``: e.g. the measured ms)."""
    return {"kernel": kernel, "key": key, "dtypes": list(dtypes), "config": config_to_json(config), **extra}


Index = dict[tuple, list[tuple[float | None, triton.Config]]]


@functools.cache
def _load(path: str) -> Index:
    """Index of a table file: (kernel, dtypes, key without the M bucket) -> [(log2 M bucket, config)]."""
    p = Path(path)
    if not p.exists():
        return {}
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not a moela config table ({e})") from None
    if data.get("format") != FORMAT:
        raise ValueError(f"{p}: config table format {data.get('format')!r}, expected {FORMAT}")
    index: Index = {}
    for e in data.get("entries", []):
        key = dict(e["key"])
        m = next((key.pop(k) for k in M_KEYS if k in key), None)
        ident = (e["kernel"], tuple(e["dtypes"]), tuple(sorted(key.items())))
        index.setdefault(ident, []).append((None if m is None else math.log2(max(m, 1)), config_from_json(e["config"])))
    return index


def load_table(device_name: str, directory: Path | None = None) -> Index:
    """The indexed table of a device (empty when there is none); read once per process."""
    return _load(str(table_path(device_name, directory)))


def lookup(kernel: str, key: dict[str, Any], dtypes: tuple[str, ...], device_name: str,
           directory: Path | None = None) -> triton.Config | None:
    """The tabled config of ``kernel`` for this key on this device, or None."""
    key = dict(key)
    m = next((key.pop(k) for k in M_KEYS if k in key), None)
    found = load_table(device_name, directory).get((kernel, tuple(dtypes), tuple(sorted(key.items()))))
    if not found:
        return None
    if m is None:
        return found[0][1]
    target = math.log2(max(m, 1))
    return min(found, key=lambda mc: abs(mc[0] - target) if mc[0] is not None else math.inf)[1]


def write_table(path: Path, entries: list[dict[str, Any]], meta: dict[str, Any]) -> Path:
    """Write (or merge into) a table: entries of the same kernel, dtypes and key replace older ones."""
    old = json.loads(path.read_text(encoding="utf-8")).get("entries", []) if path.exists() else []

    def ident(e):
        return e["kernel"], tuple(e["dtypes"]), tuple(sorted(e["key"].items()))

    merged = {ident(e): e for e in old}
    merged.update({ident(e): e for e in entries})
    data = {"format": FORMAT, **meta, "entries": sorted(merged.values(), key=lambda e: (e["kernel"], str(e["key"])))}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    _load.cache_clear()
    return path


def record_choice(kernel: str, config: triton.Config, source: str) -> None:
    """Remember the config a kernel ran last and its source ("table", "tuned", "pinned", "single")."""
    _chosen[kernel] = (str(config), source)


def chosen_configs() -> dict[str, tuple[str, str]]:
    """kernel name -> (config, source) of its last launch in this process."""
    return dict(_chosen)
