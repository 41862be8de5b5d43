"""``python -m moela.profiling tune``: autotune the kernels at DeepSeek's problems, write the GPU's config table.

Every autotuned moela kernel (``kernels._common.autotune``) keeps what it tuned (key -> best
config). This runs the moela implementation of the chosen ops over the chosen problems on the
GPU with the config tables off (``MOELA_CONFIG_TABLES=0``: everything measured), stops starting
new problems when the time budget is spent, then writes each tuned (kernel, key, dtypes) ->
config as an entry of ``kernels/configs/<gpu>.json`` (merged into the existing table; see
``kernels.config_tables``). Commit that file: later runs on that GPU model use it instead of
tuning (first-call latency and host cost go), and autotune only keys no table holds.
"""

from __future__ import annotations

import datetime as _dt
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["tune", "tuned_entries"]


def tuned_entries(tuners: Sequence[Any] | None = None) -> list[dict[str, Any]]:
    """Table entries of everything the autotuners tuned in this process (not what came from a table)."""
    from moela.kernels import _common, config_tables

    out = []
    for t in _common._TUNERS if tuners is None else tuners:
        for key, config in t.cache.items():
            if t.source_of(config) != "tuned":
                continue
            n = len(t.keys)
            out.append(config_tables.entry(t.moela_name, dict(zip(t.keys, key[:n], strict=True)),
                                           [str(d) for d in key[n:]], config))
    return out


def tune(plan, device, budget_s: float, out: Path | None = None, seed: int = 0, log=print) -> tuple[Path, int]:
    """Run each (op, problem) of ``plan``'s moela kernel once (autotuning it), within ``budget_s``
    seconds of starting problems; write the table. Returns (path, entries written)."""
    import torch

    from moela.kernels import config_tables

    from .environment import git_ref

    if device.type != "cuda":
        raise ValueError(f"tune: autotuning times configs on a CUDA GPU, got device {device}")
    os.environ["MOELA_CONFIG_TABLES"] = "0"  # measure everything, whatever a table says
    os.environ.pop("MOELA_AUTOTUNE", None)
    t0 = time.perf_counter()
    done = 0
    for op, problem in plan:
        if time.perf_counter() - t0 > budget_s:
            log(f"tune: budget of {budget_s:.0f} s spent after {done} of {len(plan)} problems")
            break
        case = op.make_case(problem, device, seed)
        fn = op.resolve_kernel()
        args, kwargs = op.signature(case)
        t = time.perf_counter()
        fn(*args, **kwargs)
        torch.cuda.synchronize(device)
        done += 1
        log(f"  {op.name:<22} {problem.name:<40} {time.perf_counter() - t:7.1f} s")
        del case
    entries = tuned_entries()
    name = torch.cuda.get_device_name(device)
    path = out or config_tables.table_path(name)
    meta = {"device": name, "triton": _version("triton"), "torch": torch.__version__, "git": git_ref(),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    config_tables.write_table(path, entries, meta)
    return path, len(entries)


def _version(pkg: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "unknown"
