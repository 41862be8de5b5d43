"""The shapes registry: named problem sets, built from the DeepSeek configs.

Every benchmark and every GPU test takes its shapes from here (through the op modules in
``moela.profiling.ops``, which turn these building blocks into each op's problem sets).

Legend: T tokens, D model dim, I expert hidden dim, E routed experts, k experts per token,
M rows after dispatch (T·k), N×K a weight in ``F.linear`` layout.

Building blocks:

- ``V3``, ``V2_LITE``, ``TINY``: the ``ModelArgs`` presets; ``moe_dims(args)`` the MoE dims.
- ``expert_gemms(dims)``: the two GEMMs of one expert, up/gate fused (N = 2·I, K = D) and
  down (N = D, K = I).
- ``DECODE_TOKENS`` (1…256 per GPU) and ``PREFILL_TOKENS`` (4096…16384).
- ``DEEPGEMM_DENSE`` and ``DEEPGEMM_GROUPED``: DeepGEMM's benchmark grids (its README's tables).
- ``FLASHMLA_DECODE``: FlashMLA's decode shapes.
- ``routing_ids(T, E, k, load)``: deterministic expert choices, ``"balanced"`` (uniform) or
  ``"zipf"`` (expert popularity ∝ 1/rank^1.2, ranks shuffled); ``group_sizes`` counts them.

Standard set names every op has: ``tiny`` (CPU and the Triton interpreter, seconds),
``check`` (GPU correctness at DeepSeek dims), ``quick`` (a few representative GPU shapes).
Op-specific sets (``v3-decode``, ``deepgemm-dense``, ...) make up ``full``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from moela.reference import ModelArgs

__all__ = [
    "DECODE_TOKENS", "PREFILL_TOKENS", "LOADS", "ZIPF_EXPONENT", "STANDARD_SETS",
    "DEEPGEMM_DENSE", "DEEPGEMM_GROUPED", "FLASHMLA_DECODE",
    "V3", "V2_LITE", "TINY", "CONFIGS", "token_problems", "MoeDims", "moe_dims", "expert_gemms",
    "Problem", "routing_ids", "group_sizes", "expert_probabilities", "sizes_from_params",
    "moe_gemm_problems", "deepgemm_grouped_problems", "grouped_problem",
]

V3 = ModelArgs.from_name("deepseek-v3")
V2_LITE = ModelArgs.from_name("deepseek-v2-lite")
TINY = ModelArgs.from_name("tiny")
#: Short names the problems use for the configs.
CONFIGS = {"v3": V3, "v2lite": V2_LITE, "tiny": TINY}

#: Tokens per GPU in a decode step and in a prefill chunk.
DECODE_TOKENS = (1, 4, 16, 64, 128, 256)
PREFILL_TOKENS = (4096, 8192, 16384)

#: Expert load distributions: uniform, and Zipf with this exponent (a few hot experts).
LOADS = ("balanced", "zipf")
ZIPF_EXPONENT = 1.2

#: Sets every op defines. ``full`` (the CLI's alias) is every other set.
STANDARD_SETS = ("tiny", "check", "quick")

#: DeepGEMM's dense FP8 grid: m × (n, k).
DEEPGEMM_DENSE = {
    "m": (64, 128, 4096),
    "nk": ((2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)),
}

#: DeepGEMM's grouped shapes: (label, groups, rows per group, n, k). "masked" is laid out
#: contiguously here (4 groups of 256 rows), which is what a contiguous kernel sees.
DEEPGEMM_GROUPED = (
    ("contiguous 4x8192", 4, 8192, 4096, 7168),
    ("contiguous 8x4096", 8, 4096, 7168, 2048),
    ("masked 4x256", 4, 256, 7168, 2048),
)

#: FlashMLA decode: batch 128, one latent KV head of 576 (512 latent + 64 rope), dv = 512.
FLASHMLA_DECODE = {
    "batch": 128, "cache_len": (4096, 8192), "heads": (16, 32, 64, 128), "q_tokens": (1, 2),
    "head_dim": 576, "v_dim": 512,
}


@dataclass(frozen=True)
class MoeDims:
    """The MoE dims of a config: D, I, E, k (and the config's name)."""

    name: str
    dim: int
    inter: int
    experts: int
    topk: int


def moe_dims(args: ModelArgs, name: str) -> MoeDims:
    return MoeDims(name, args.dim, args.moe_inter_dim, args.n_routed_experts, args.n_activated_experts)


def expert_gemms(dims: MoeDims) -> tuple[tuple[str, int, int], ...]:
    """(label, N, K) of an expert's GEMMs: up/gate fused (2·I × D) and down (D × I)."""
    return (("up", 2 * dims.inter, dims.dim), ("down", dims.dim, dims.inter))


@dataclass(frozen=True)
class Problem:
    """One benchmark problem: an op, the set it belongs to, a readable name and its parameters.

    ``params`` is JSON-able and complete: an op's ``make_case`` builds the inputs from it
    alone. Two keys are read by reports: ``series`` (the curve a problem belongs to) and
    ``tokens`` (its x value in throughput-vs-tokens plots).
    """

    op: str
    set: str
    name: str
    params: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def key(self) -> str:
        return f"{self.op}/{self.set}/{self.name}"

    @property
    def series(self) -> str:
        return str(self.params.get("series", self.name))

    @property
    def tokens(self) -> int | None:
        t = self.params.get("tokens")
        return int(t) if t is not None else None


def expert_probabilities(n_experts: int, load: str, seed: int = 0) -> torch.Tensor:
    """(E,) float64 probabilities of each expert being chosen (before the top-k draw)."""
    if load == "balanced":
        return torch.full((n_experts,), 1.0 / n_experts, dtype=torch.float64)
    if load == "zipf":
        ranks = torch.arange(1, n_experts + 1, dtype=torch.float64)
        p = ranks.pow(-ZIPF_EXPONENT)
        perm = torch.randperm(n_experts, generator=torch.Generator().manual_seed(seed + 1))
        return (p / p.sum())[perm]  # hot experts at random ids, not 0, 1, 2...
    raise ValueError(f"load: expected one of {LOADS}, got {load!r}")


@functools.lru_cache(maxsize=64)
def routing_ids(tokens: int, n_experts: int, topk: int, load: str = "balanced", seed: int = 0) -> torch.Tensor:
    """(T, k) int32 CPU expert ids, k distinct per token, drawn from ``load``. Deterministic.

    The result is cached: do not modify it (``.clone()`` first).
    """
    if topk > n_experts:
        raise ValueError(f"topk: {topk} > n_experts={n_experts}")
    p = expert_probabilities(n_experts, load, seed)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.multinomial(p.expand(tokens, n_experts), topk, replacement=False, generator=gen)
    return ids.to(torch.int32)


def group_sizes(ids: torch.Tensor, n_experts: int) -> list[int]:
    """Rows per expert of ``ids (T, k)``: a host-side list (problems are built on the host)."""
    return torch.bincount(ids.reshape(-1).long(), minlength=n_experts)[:n_experts].tolist()


def sizes_from_params(params: dict[str, Any]) -> list[int]:
    """Rows per group of a grouped problem: explicit ``group_rows``, or a routing draw."""
    if "group_rows" in params:
        return [int(r) for r in params["group_rows"]]
    ids = routing_ids(params["tokens"], params["experts"], params["topk"], params["load"], params.get("seed", 0))
    return group_sizes(ids, params["experts"])


def moe_gemm_problems(op: str, set_name: str, dims: MoeDims, tokens: Iterable[int],
                      loads: Iterable[str] = LOADS, gemms: Iterable[str] = ("up", "down")) -> list[Problem]:
    """An expert GEMM sweep: each of ``gemms`` x ``loads`` x ``tokens`` (rows = T·k, routed by ``load``)."""
    out = []
    for label, n, k in expert_gemms(dims):
        if label not in gemms:
            continue
        for load in loads:
            for t in tokens:
                out.append(Problem(op, set_name, f"{dims.name} {label} T={t} {load}", {
                    "series": f"{dims.name} {label} {load}", "tokens": t, "experts": dims.experts,
                    "topk": dims.topk, "load": load, "n": n, "k": k,
                }))
    return out


def deepgemm_grouped_problems(op: str, set_name: str, which: Iterable[str] | None = None) -> list[Problem]:
    """DeepGEMM's grouped shapes as explicit groups of rows."""
    out = []
    for label, groups, rows, n, k in DEEPGEMM_GROUPED:
        if which is not None and label not in which:
            continue
        out.append(Problem(op, set_name, f"{label} n={n} k={k}", {
            "series": "deepgemm grouped", "group_rows": [rows] * groups, "n": n, "k": k,
        }))
    return out


def grouped_problem(op: str, set_name: str, name: str, group_rows: Sequence[int], n: int, k: int) -> Problem:
    """A grouped problem with explicit group sizes (edge cases: empty groups, odd sizes)."""
    return Problem(op, set_name, name, {"series": name, "group_rows": list(group_rows), "n": n, "k": k})


def token_problems(op: str, set_name: str, configs: Iterable[str], tokens: Iterable[int],
                   loads: Iterable[str] = ("balanced",), **extra: Any) -> list[Problem]:
    """A token sweep over configs (``CONFIGS`` keys) and loads: the dispatch ops' problems."""
    out, loads = [], tuple(loads)
    for cfg in configs:
        for load in loads:
            suffix = "" if loads == ("balanced",) else f" {load}"
            tag = "".join(f" {k}={v}" for k, v in extra.items())
            for t in tokens:
                out.append(Problem(op, set_name, f"{cfg}{tag} T={t}{suffix}", {
                    "series": f"{cfg}{tag}{suffix}", "tokens": t, "config": cfg, "load": load, **extra,
                }))
    return out


def duplicate_names(problems: Iterable[Problem]) -> Sequence[str]:
    """Names that occur more than once (an op module's registry sanity check)."""
    seen: set[str] = set()
    dup = []
    for p in problems:
        if p.name in seen:
            dup.append(p.name)
        seen.add(p.name)
    return dup
