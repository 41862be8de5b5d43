"""Expert parallelism on whatever torch.distributed backend is present: dispatch/combine and the EP MoE layer.

    torchrun --nproc_per_node=2 -m moela.profiling.ep                      # CPU: gloo, small shapes
    torchrun --nproc_per_node=8 -m moela.profiling.ep --out ep.json        # GPUs: NCCL, DeepSeek-V3 shapes

Each rank routes ``--tokens`` tokens of its own (random top-k ids over all experts) and times,
with a barrier before every repetition and the slowest rank's time reported:
- each dispatcher's ``dispatch`` and ``combine`` (identity experts), and both together;
- an ``all_gather_into_tensor`` of the same tokens: the baseline collective (Megatron's all-gather
  dispatch moves exactly this);
- the ``moela.model.MoE(ep_group=...)`` layer forward (``--backward``: and backward) per dispatcher.
Bytes are what leaves one rank: rows sent to other ranks (all-to-all, counted with DeepEP's
convention for dispatch and combine alike), ``2·(W-1)/W`` of the payload (ring all-reduce),
``(W-1)·T·D`` elements (all-gather); GB/s per rank = bytes / time. Rank 0 prints a table with the
world size, backend and device, and ``--out`` saves it as JSON. On CPUs (gloo, wall clock) the
numbers say nothing about GPUs; DeepEP's published intranode figures (H800, NVLink, 8 ranks,
V3 shapes) are ~153 GB/s dispatch and ~158 GB/s combine.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from moela.distributed import DISPATCHERS, deep_ep_available
from moela.model import MoE
from moela.reference import ModelArgs

from .environment import collect_environment
from .timing import summarize

#: Defaults per device kind: small on CPUs, DeepSeek-V3's MoE on GPUs.
DEFAULTS = {
    "cpu": dict(tokens=64, dim=256, experts=16, topk=4, inter=128, dtype="float32"),
    "cuda": dict(tokens=4096, dim=7168, experts=256, topk=8, inter=2048, dtype="bfloat16"),
}


def _init() -> tuple[str, torch.device]:
    """Join the group torchrun describes (or a group of one without torchrun); pick the device."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if "RANK" not in os.environ:  # python -m moela.profiling.ep: one rank
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get(
            "MASTER_PORT", "29533"))
    dist.init_process_group(backend, timeout=timedelta(minutes=5))
    return backend, device


def _time(fn: Callable[[], Any], device: torch.device, warmup: int, reps: int) -> dict[str, Any]:
    """Median (and spread) of ``reps`` calls, each started after a barrier; the slowest rank's times."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        dist.barrier()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    slowest = torch.tensor(sorted(times), dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)  # rank-wise max of each order statistic
    return summarize(slowest.tolist(), "cuda-events" if device.type == "cuda" else "cpu-wall").as_dict()


def _remote_rows(ids: torch.Tensor, n_experts: int, world: int, rank: int) -> int:
    """Valid (token, slot) rows whose expert lives on another rank."""
    dest = ids.long() // (n_experts // world)
    return int(((ids >= 0) & (ids < n_experts) & (dest != rank)).sum())


def run(ns: argparse.Namespace) -> dict[str, Any]:
    backend, device = _init()
    world, rank = dist.get_world_size(), dist.get_rank()
    defaults = DEFAULTS[device.type]
    T, D, E, k, I = (getattr(ns, n) or defaults[n] for n in ("tokens", "dim", "experts", "topk", "inter"))
    dtype = getattr(torch, ns.dtype or defaults["dtype"])
    if E % world:
        raise SystemExit(f"--experts {E} must be a multiple of the {world} ranks")
    torch.manual_seed(1234)  # the same tokens everywhere for the all-reduce dispatcher (decode) ...
    replicated = torch.randn(T, D, device=device, dtype=dtype)
    torch.manual_seed(1234 + rank)  # ... and each rank its own for the others
    x = torch.randn(T, D, device=device, dtype=dtype)
    ids = torch.rand(T, E, device=device).argsort(-1)[:, :k].to(torch.int32)
    w = torch.rand(T, k, device=device)
    row_bytes = D * x.element_size()
    remote = torch.tensor([_remote_rows(ids, E, world, rank)], device=device)
    dist.all_reduce(remote, op=dist.ReduceOp.MAX)  # the busiest rank's traffic
    a2a_bytes = int(remote) * row_bytes
    rows: list[dict[str, Any]] = []

    def add(name: str, timing: dict[str, Any], nbytes: float | None) -> None:
        gbps = nbytes / (timing["median_ms"] * 1e6) if nbytes else None
        rows.append(dict(name=name, bytes_per_rank=nbytes, gbps_per_rank=gbps, **timing))

    gathered = torch.empty(world * T, D, device=device, dtype=dtype)
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # the name since torch 2.13
    add("all_gather (baseline)", _time(lambda: all_gather(gathered, x), device, ns.warmup, ns.reps),
        (world - 1) * T * row_bytes)

    names = [n for n in ns.dispatchers if n != "deep_ep" or deep_ep_available()]
    for name in names:
        if name == "deep_ep" and (device.type != "cuda" or dtype != torch.bfloat16):
            continue  # DeepEP: bf16 CUDA tokens only
        d = DISPATCHERS[name](E)
        xd = replicated if name == "all_reduce" else x
        nbytes = a2a_bytes if name != "all_reduce" else 2 * (world - 1) / world * T * row_bytes
        with torch.no_grad():
            xs, layout, handle = d.dispatch(xd, w, ids)
            add(f"{name} dispatch", _time(lambda d=d, xd=xd: d.dispatch(xd, w, ids), device, ns.warmup, ns.reps),
                nbytes if name != "all_reduce" else None)  # the all-reduce dispatcher moves nothing here
            add(f"{name} combine", _time(lambda d=d, xs=xs, h=handle: d.combine(xs, h), device, ns.warmup, ns.reps),
                nbytes)
            add(f"{name} dispatch+combine",
                _time(lambda d=d, xd=xd: d.combine(*d.dispatch(xd, w, ids)[::2]), device, ns.warmup, ns.reps),
                nbytes * (1 if name == "all_reduce" else 2))

    args = ModelArgs.from_name("tiny", dim=D, moe_inter_dim=I, n_routed_experts=E, n_activated_experts=k,
                               n_expert_groups=1, n_limited_groups=1, n_shared_experts=1, backend=ns.backend)
    for name in names:
        if name == "deep_ep" and (device.type != "cuda" or dtype != torch.bfloat16):
            continue
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # built in place, in its dtype: V3's experts are 22.5 GB in bf16 on one rank
        try:
            with torch.device(device):
                layer = MoE(args, ep_group=dist.group.WORLD, dispatcher=name)
        finally:
            torch.set_default_dtype(default)
        layer_x = replicated if name == "all_reduce" else x  # all-reduce: the same tokens on every rank (decode)
        if ns.backward:
            xg = layer_x.detach().requires_grad_(True)

            def step(layer=layer, xg=xg):
                layer(xg).sum().backward()
            timing = _time(step, device, ns.warmup, ns.reps)
        else:
            with torch.no_grad():
                timing = _time(lambda layer=layer, lx=layer_x: layer(lx), device, ns.warmup, ns.reps)
        add(f"MoE layer {'fwd+bwd' if ns.backward else 'fwd'} ({name}, {E // world} experts/rank)", timing, None)
        del layer

    env = collect_environment() if rank == 0 else {}
    result = dict(world_size=world, backend=backend, device=env.get("device", str(device)), dtype=str(dtype),
                  tokens_per_rank=T, dim=D, experts=E, topk=k, inter=I, model_backend=ns.backend,
                  environment=env, rows=rows)
    dist.barrier()
    dist.destroy_process_group()
    return result


def format_table(result: dict[str, Any]) -> str:
    head = (f"expert parallelism: {result['world_size']} ranks, {result['backend']} on {result['device']}, "
            f"{result['dtype']}; per rank T={result['tokens_per_rank']} D={result['dim']} E={result['experts']} "
            f"k={result['topk']} I={result['inter']} (MoE on {result['model_backend']}); times: slowest rank, median")
    lines = [head, f"{'':52s} {'ms':>9s} {'MB/rank':>9s} {'GB/s/rank':>10s}"]
    for r in result["rows"]:
        mb = f"{r['bytes_per_rank'] / 1e6:9.3f}" if r["bytes_per_rank"] else f"{'':9s}"
        gb = f"{r['gbps_per_rank']:10.3f}" if r["gbps_per_rank"] else f"{'':10s}"
        lines.append(f"{r['name']:52s} {r['median_ms']:9.3f} {mb} {gb}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="torchrun --nproc_per_node=N -m moela.profiling.ep",
                                     description=__doc__.split("\n")[0])
    for name, help_ in (("tokens", "tokens per rank"), ("dim", "hidden size D"), ("experts", "routed experts E"),
                        ("topk", "experts per token k"), ("inter", "expert hidden size I")):
        parser.add_argument(f"--{name}", type=int, default=None,
                            help=f"{help_} (default {DEFAULTS['cpu'][name]} on CPU, {DEFAULTS['cuda'][name]} on GPU)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="token and weight dtype (default float32 on CPU, bfloat16 on GPU)")
    parser.add_argument("--dispatchers", nargs="+", default=list(DISPATCHERS), choices=list(DISPATCHERS),
                        help="which dispatchers (deep_ep only where it is importable)")
    parser.add_argument("--backend", default="auto", choices=("auto", "triton", "reference"),
                        help="the MoE layer's ops (default auto: Triton on CUDA, references on CPU)")
    parser.add_argument("--backward", action="store_true", help="time the layer's forward and backward")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls first (default 2)")
    parser.add_argument("--reps", type=int, default=10, help="timed calls (default 10)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here (rank 0)")
    ns = parser.parse_args(argv)
    if min(ns.reps, ns.warmup + 1) < 1:
        parser.error("--reps must be >= 1 and --warmup >= 0")
    result = run(ns)
    if result["environment"]:  # rank 0
        print(format_table(result), flush=True)
        if ns.out is not None:
            ns.out.parent.mkdir(parents=True, exist_ok=True)
            ns.out.write_text(json.dumps(result, indent=1, default=str))
            print(f"saved {ns.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
