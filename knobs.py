"""Every environment switch moela reads, declared once: name, meaning, default, and one parser.

Values are read at call time (never cached at import), so a test or a script can change them
between calls. ``python -m moela.profiling list`` prints this table. Families of switches (one
per kernel, such as ``MOELA_GROUPED_GEMM_FWD_PREFILL_CONFIG``) are declared once by their
pattern. ``TRITON_INTERPRET`` is Triton's own switch; :func:`interpret` is the one place moela
parses it, with Triton's spelling rules.

Example::

    from moela import knobs
    if knobs.get("MOELA_AUTOTUNE") == "0": ...
    knobs.interpret()          # True under TRITON_INTERPRET=1 (or "true", "on", ...)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["Knob", "KNOBS", "get", "get_ms", "interpret", "describe", "config_knob"]

# The spellings triton's own TRITON_INTERPRET parser (getenv_bool) accepts, case-insensitive.
_TRUTHY = frozenset({"1", "true", "on", "yes", "y"})


@dataclass(frozen=True)
class Knob:
    name: str  # the variable, or a pattern with <KERNEL> for a family
    default: str | None
    meaning: str
    where: str  # who reads it: kernels, tests, profiling, gpu_run.sh


KNOBS: tuple[Knob, ...] = (
    Knob("TRITON_INTERPRET", None, "Triton's switch: run kernels through its interpreter on the CPU "
         "(1/true/on/yes/y); moela installs its compatibility layer when moela.kernels is imported", "kernels"),
    Knob("MOELA_AUTOTUNE", "1", "0: time nothing; each kernel runs the first config its pruner keeps", "kernels"),
    Knob("MOELA_TMA", "1", "0: the GEMM ops never take their Hopper-native (TMA, persistent, warp-specialised) "
         "kernels; every call runs the pointer-based kernels that pre-Hopper GPUs run", "kernels"),
    Knob("MOELA_SCALE_TMA", "1", "0: the warp-specialised FP8 GEMM configs load the block scales with pointer "
         "loads in their math warpgroups instead of through the producer's TMA", "kernels"),
    Knob("MOELA_AUTOTUNE_WARMUP_MS", "5", "autotuning: warm-up per config, ms", "kernels"),
    Knob("MOELA_AUTOTUNE_REP_MS", "25", "autotuning: timed repetitions per config, ms", "kernels"),
    Knob("MOELA_CONFIG_TABLES", "1", "0: ignore the per-GPU tuned config tables (kernels/configs/*.json); "
         "`python -m moela.profiling tune` measures with them off", "kernels"),
    Knob("MOELA_<KERNEL>_CONFIG", None, "pin one config of a kernel, e.g. "
         "MOELA_GROUPED_GEMM_FWD_PREFILL_CONFIG='BLOCK_M=128,BLOCK_N=128,BLOCK_K=64,GROUP_M=8,num_warps=4'", "kernels"),
    Knob("MOELA_FAILURE_LOG", None, "pytest: append each failure's traceback to this file as it happens", "tests"),
    Knob("MOELA_GIT_REF", None, "the git ref results record, where the tree's .git is not the copy's", "profiling"),
    Knob("MOELA_SKIP_INSTALL", None, "gpu_run.sh: do not pip-install moela first", "gpu_run.sh"),
    Knob("MOELA_SKIP_TESTS", None, "gpu_run.sh: skip the pytest step", "gpu_run.sh"),
    Knob("MOELA_SKIP_WARMUP", None, "gpu_run.sh: skip the autotune warm-up step", "gpu_run.sh"),
    Knob("MOELA_TESTS", None, "gpu_run.sh: pytest targets (default: everything but the benchmarks)", "gpu_run.sh"),
    Knob("MOELA_TEST_LIMIT", "220", "gpu_run.sh: seconds for the pytest step", "gpu_run.sh"),
    Knob("MOELA_TEST_WORKERS", "8", "gpu_run.sh: pytest-xdist workers", "gpu_run.sh"),
    Knob("MOELA_WARM_LIMIT", "165", "gpu_run.sh: seconds for the autotune warm-up step", "gpu_run.sh"),
    Knob("MOELA_BENCH_OPS", None, "gpu_run.sh: ops to benchmark (default: the registry's kernel ops)", "gpu_run.sh"),
    Knob("MOELA_BENCH_SETS", "full", "gpu_run.sh: shape sets to benchmark", "gpu_run.sh"),
    Knob("MOELA_CHECK", None, "gpu_run.sh: also run `python -m moela.profiling check`", "gpu_run.sh"),
    Knob("MOELA_KEEP", None, "gpu_run.sh: also copy bench.json into this folder", "gpu_run.sh"),
    Knob("MOELA_TUNE_SECONDS", None, "gpu_run.sh: also run `python -m moela.profiling tune` for this many seconds "
         "and write OUTDIR/configs.json", "gpu_run.sh"),
    Knob("MOELA_SANITIZE", None, "gpu_run.sh: also run compute-sanitizer memcheck over the bad-input tests",
         "gpu_run.sh"),
)
_BY_NAME = {k.name: k for k in KNOBS}


def _declared(name: str) -> Knob:
    knob = _BY_NAME.get(name)
    if knob is None and name.startswith("MOELA_") and name.endswith("_CONFIG"):
        knob = _BY_NAME["MOELA_<KERNEL>_CONFIG"]
    if knob is None:
        raise KeyError(f"{name}: not a declared moela knob (add it to moela.knobs.KNOBS)")
    return knob


def _environ_reader():
    """``os.environ.get`` for a str name, read now, without the Mapping layer's per-call key
    encoding (on POSIX ``os.environ`` keeps its values in ``_data``, bytes to bytes, updated by
    its own setters, which ``monkeypatch.setenv`` and ``mock.patch.dict`` use): ~0.1 µs instead
    of ~0.7 µs, paid by every kernel launch that reads a knob. Elsewhere: ``os.environ.get``."""
    env = os.environ
    data, encode, decode = (getattr(env, a, None) for a in ("_data", "encodekey", "decodevalue"))
    if not isinstance(data, dict) or encode is None or decode is None:
        return lambda name: os.environ.get(name)
    keys: dict[str, object] = {}

    def read(name: str) -> str | None:
        if os.environ is not env:  # replaced wholesale: the slow, always-right read
            return os.environ.get(name)
        key = keys.get(name)
        if key is None:
            key = keys[name] = encode(name)
        raw = data.get(key)
        return None if raw is None else decode(raw)

    return read


_environ_get = _environ_reader()


def get(name: str) -> str | None:
    """The knob's value now (stripped), or its default when unset or empty."""
    knob = _BY_NAME.get(name) or _declared(name)
    raw = _environ_get(name)
    return (raw.strip() if raw else raw) or knob.default


def get_ms(name: str) -> float:
    """A positive number of milliseconds; a bad value raises ValueError naming the variable."""
    raw = get(name)
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a number of milliseconds, got {raw!r}") from None
    if not value > 0:
        raise ValueError(f"{name}: expected a positive number of milliseconds, got {raw!r}")
    return value


def interpret() -> bool:
    """True when ``TRITON_INTERPRET`` is set to a value Triton reads as true ("1", "true", "on"...).

    Triton reads the variable when ``@triton.jit`` decorates a kernel, so it must be set before
    any kernel module is imported for kernels to run interpreted.
    """
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUTHY


def config_knob(kernel: str) -> str:
    """The variable that pins one config of ``kernel``: ``MOELA_<KERNEL>_CONFIG``."""
    return f"MOELA_{kernel.upper()}_CONFIG"


def describe() -> list[tuple[str, str, str, str]]:
    """(name, default, where, meaning) rows, for listings."""
    return [(k.name, k.default or "", k.where, k.meaning) for k in KNOBS]
