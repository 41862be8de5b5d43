"""Spawn a torch.distributed group for a test and run named checks on every rank.

Import from any test as ``import distributed_testing`` (pyproject puts tests/ on the path).

A test module defines check functions ``def check_x(rank: Rank) -> None`` and registers them
for a group size at import (:func:`register_checks`); :func:`run_ranks` spawns ``world``
processes (torch.multiprocessing, a free local port), each of which initialises the process
group (gloo on CPU, NCCL with one GPU per rank), loads the modules from their paths and runs the
checks in order, seeded alike on every rank. One spawn serves all the checks of a group size
(tests/distributed/conftest.py runs it once per session): starting processes that import torch
costs seconds each. The environment is
inherited (``TRITON_INTERPRET=1`` set by conftest reaches the ranks) and each rank installs the
interpreter compatibility layer. A failing check stops its rank (the others then fail in their
next collective, or time out), and :meth:`RankResults.check` reports every rank's traceback.
"""

from __future__ import annotations

import importlib.util
import json
import socket
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import NamedTuple

import torch

__all__ = ["Rank", "RankResults", "run_ranks", "register_checks", "registered_checks", "free_port", "NOT_RUN"]

NOT_RUN = "not run: an earlier check failed on this rank"

BACKENDS = ("gloo", "nccl")
_REGISTRY: dict[tuple[int, str], list[tuple[str, str]]] = {}


def register_checks(path: str, world: int, names: list[str], backends: tuple[str, ...] = BACKENDS) -> list[str]:
    """Ask for the check functions ``names`` of the module at ``path`` to run on ``world`` ranks
    of each backend in ``backends`` (gloo: CPU, nccl: one GPU per rank)."""
    for backend in backends:
        checks = _REGISTRY.setdefault((world, backend), [])
        for name in names:
            if (str(path), name) not in checks:  # (a module collected twice registers once)
                checks.append((str(path), name))
    return list(names)


def _key(path: str, name: str) -> str:
    return f"{Path(path).stem}.{name}"


def registered_checks(world: int, backend: str) -> list[tuple[str, str]]:
    """(module path, function name) of every check registered for ``world`` ranks of ``backend``, in order."""
    return list(_REGISTRY.get((world, backend), []))


class Rank(NamedTuple):
    """What a check function gets: its place in the group, the device and a directory all ranks share."""

    rank: int
    world: int
    backend: str  # "gloo" or "nccl"
    device: torch.device
    shared_dir: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load(path: str):
    spec = importlib.util.spec_from_file_location(f"_ranks_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _worker(rank: int, world: int, port: int, backend: str, checks: list[tuple[str, str]], out_dir: str,
            timeout_s: float) -> None:
    import torch.distributed as dist
    from moela_testing import seed_for

    from moela.kernels.interpreter import install_compat

    torch.set_num_threads(1)  # the ranks share the machine's cores
    install_compat()  # a no-op unless TRITON_INTERPRET=1 came with the environment
    device = torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    results: dict[str, str | None] = {}
    seconds: dict[str, float] = {}
    try:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
        modules = {path: _load(path) for path in dict.fromkeys(path for path, _ in checks)}
        ctx = Rank(rank, world, backend, device, out_dir)
        for path, name in checks:
            key = _key(path, name)
            if any(results.values()):
                results[key] = NOT_RUN
                continue
            torch.manual_seed(seed_for(name))  # the same data on every rank
            start = time.perf_counter()
            try:
                getattr(modules[path], name)(ctx)
                results[key] = None
            except BaseException:  # noqa: B036 - reported to the parent, which fails the test
                results[key] = traceback.format_exc()
            seconds[key] = time.perf_counter() - start
    except BaseException:  # noqa: B036
        err = traceback.format_exc()
        results.update({_key(*c): err for c in checks if results.get(_key(*c)) is None})
    finally:
        tmp = Path(out_dir, f"rank{rank}.tmp")
        tmp.write_text(json.dumps({"results": results, "seconds": seconds}))
        tmp.replace(Path(out_dir, f"rank{rank}.json"))  # whole, or not there
        if dist.is_initialized() and not any(results.values()):
            dist.destroy_process_group()


class RankResults:
    """Each check's outcome on each rank; ``check(name)`` raises AssertionError with the failures.
    ``seconds[name]``: the check's longest time on a rank; ``wall_s``: the whole spawn."""

    def __init__(self, world: int, names: list[str], per_rank: list[dict], problem: str | None, wall_s: float):
        self.world, self.names, self.problem, self.wall_s = world, names, problem, wall_s
        self.per_rank = [r.get("results", {}) for r in per_rank]
        self.seconds = {n: max((r.get("seconds", {}).get(n, 0.0) for r in per_rank), default=0.0) for n in names}

    def check(self, path: str, name: str) -> None:
        """Raise AssertionError with every rank's traceback if check ``name`` of the module at ``path`` failed."""
        name = _key(path, name)
        if name not in self.names:
            raise KeyError(f"{name} was not run; ran {self.names}")
        errors = [f"---- rank {r}:\n{res.get(name, self.problem)}" for r, res in enumerate(self.per_rank)
                  if res.get(name, self.problem)]
        if errors:
            raise AssertionError(f"{name} failed on {len(errors)} of {self.world} ranks\n" + "\n".join(errors))


def _some_rank_failed(out_dir: str) -> bool:
    for f in Path(out_dir).glob("rank*.json"):
        try:
            if any(json.loads(f.read_text())["results"].values()):
                return True
        except ValueError:  # being written
            pass
    return False


def run_ranks(world: int, checks: list[tuple[str, str]], *, backend: str = "gloo", timeout_s: float = 240.0
              ) -> RankResults:
    """Run the checks, (module path, function name) each, on ``world`` spawned ranks."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="moela-ranks-") as out_dir:
        ctx = mp.start_processes(_worker, args=(world, free_port(), backend, list(checks), out_dir,
                                                timeout_s), nprocs=world, join=False, start_method="spawn")
        started = time.monotonic()
        problem, deadline = None, started + timeout_s
        try:
            while not ctx.join(timeout=0.5):
                now = time.monotonic()
                if now > deadline:
                    problem = f"timed out after {timeout_s:.0f} s"
                    break
                if _some_rank_failed(out_dir):  # the others wait in a collective: give them a moment, then stop
                    deadline = min(deadline, now + 10.0)
        except Exception as e:  # a rank died (a crash, a signal) instead of reporting
            problem = f"a rank process failed: {e}"
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            for p in ctx.processes:
                p.join(5.0)
        per_rank = []
        for r in range(world):
            f = Path(out_dir, f"rank{r}.json")
            per_rank.append(json.loads(f.read_text()) if f.exists() else {})
    if problem is None and any(not res for res in per_rank):
        problem = "the rank wrote no results"
    return RankResults(world, [_key(*c) for c in checks], per_rank, problem, time.monotonic() - started)
