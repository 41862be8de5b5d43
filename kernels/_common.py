"""Host-side helpers shared by the kernel launchers: device checks, autotune config lists, small math.

Autotune rule: a kernel's configs come from a function; on a GPU all of them are tried unless
``MOELA_<KERNEL>_CONFIG`` pins one (``moela.knobs``); under the Triton interpreter exactly one
config is used (the interpreter cannot autotune more than one). ``MOELA_AUTOTUNE=0`` times
nothing: every kernel runs the first of its configs that its pruner keeps for the inputs.
:func:`autotune` is ``triton.autotune`` timing each config for ``MOELA_AUTOTUNE_REP_MS`` after
``MOELA_AUTOTUNE_WARMUP_MS`` (25 and 5 ms by default, instead of Triton's 100 + 25 ms).

:func:`run_direct` decides when a public op may skip its ``torch.library`` dispatch layers.

Hopper-native kernels (TMA loads, persistent tiles, warp specialisation) are taken by the rule of
:func:`tma_path`; :func:`device_capability`, :func:`num_sms` and :func:`smem_per_block` describe a
device without a host sync (cached; the Triton interpreter stands for an H100/H200:
``INTERPRETER_CAPABILITY``, ``INTERPRETER_SMS`` programs); :func:`ensure_tma_allocator` gives
Triton the global scratch its device-side tensor descriptors need.
"""

from __future__ import annotations

import functools

import torch
import triton
from triton.runtime import _allocation

from moela import knobs

from . import config_tables

__all__ = [
    "autotune", "autotune_configs", "autotune_off", "parse_config", "check_kernel_device", "cdiv", "m_bucket",
    "next_power_of_2", "run_direct", "check_fp8_capability", "MIN_FP8_CAPABILITY", "direct_path_probes",
    "kernel_dtype", "kernel_rows", "chosen_configs", "TunedAutotuner", "INTERPRETER_CAPABILITY", "INTERPRETER_SMS",
    "TMA_DTYPES", "device_capability", "num_sms", "smem_per_block", "tma_operand_ok", "tma_path", "uses_tma",
    "ensure_tma_allocator", "heuristics",
]

#: e4m3 needs Ada (sm_89) or Hopper (sm_90) and later.
MIN_FP8_CAPABILITY = (8, 9)

_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
# run_direct's probes (private torch API; without them every call goes through its op)
_dispatch_modes = getattr(torch._C, "_len_torch_dispatch_stack", None)
_functorch_stack = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack", None)
_function_modes = getattr(torch._C, "_is_torch_function_mode_enabled", None)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def m_bucket(M: int) -> int:
    """An autotune key's bucket of a row count: the next power of two, at least 16 (so that every
    bucket is one Triton specialization: divisible by 16)."""
    return max(16, next_power_of_2(M))


def parse_config(spec: str, env_var: str = "config") -> triton.Config:
    """``"BLOCK_M=64,BLOCK_N=128,num_warps=4"`` -> ``triton.Config``; bad specs raise ValueError."""
    kwargs: dict[str, int] = {}
    extra: dict[str, int] = {}
    for item in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not value.strip().lstrip("-").isdigit():
            raise ValueError(f"{env_var}: expected comma-separated NAME=INT items, got {spec!r}")
        (extra if key.strip() in ("num_warps", "num_stages", "num_ctas") else kwargs)[key.strip()] = int(value)
    if not kwargs:
        raise ValueError(f"{env_var}: no block sizes in {spec!r}")
    return triton.Config(kwargs, **extra)


def autotune_configs(name: str, configs: list[triton.Config]) -> list[triton.Config]:
    """The configs ``triton.autotune`` should try for kernel ``name`` (see the module docstring).

    ``configs[0]`` is the default: the one used under the interpreter (and, with
    MOELA_AUTOTUNE=0, the first one :func:`autotune`'s pruning keeps).
    """
    env_var = knobs.config_knob(name)
    pinned = knobs.get(env_var)
    if pinned:
        return [parse_config(pinned, env_var)]
    if knobs.interpret():
        return configs[:1]
    return configs


def autotune_off() -> bool:
    """``MOELA_AUTOTUNE=0``: run each kernel's first fitting config, time nothing."""
    return knobs.get("MOELA_AUTOTUNE") == "0"


def _tuning_bench(kernel_call, quantiles):
    """How ``triton.autotune`` times one config (read at tuning time, so tests can change it)."""
    from triton.testing import do_bench

    return do_bench(kernel_call, warmup=knobs.get_ms("MOELA_AUTOTUNE_WARMUP_MS"),
                    rep=knobs.get_ms("MOELA_AUTOTUNE_REP_MS"), quantiles=quantiles)


def _untimed(kernel_call, quantiles):
    """The do_bench of MOELA_AUTOTUNE=0: the pruning left one config, nothing to compare."""
    return [0.0] * len(quantiles)


_TUNERS: list[triton.runtime.Autotuner] = []

#: Argument types without a dtype (the launch arguments that are not tensors), skipped cheaply.
_NO_DTYPE = frozenset({int, float, bool, str, type(None)})
_DTYPE_NAMES: dict[torch.dtype, str] = {}


def _dtype_name(dtype) -> str:
    """``str(dtype)``, remembered (autotune keys hold dtypes as strings)."""
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = str(dtype)
    return name


class TunedAutotuner(triton.runtime.Autotuner):
    """``triton.autotune`` that asks the per-GPU config tables (``kernels.config_tables``) first.

    Triton calls ``prune_configs`` only for a key it has not met: there the table is consulted
    (the kernel's key values from Triton's own arguments), and a hit replaces the candidates by
    the tabled config, which the do_bench below then runs untimed. Hits cost nothing per call.
    """

    moela_name: str
    moela_sources: dict[int, str]
    _table_hit: bool
    _arg_set: frozenset[str]
    _key_pos: tuple[tuple[str, int], ...]

    def run(self, *args, **kwargs):
        """Triton's ``Autotuner.run`` for a key tuned before, with less host work per launch: the
        same key as Triton's (the key arguments in ``keys`` order, then the dtype of every
        argument that has one, positional first), built from argument positions found once,
        without the dict of all arguments; each config's kwargs built once. New keys, and
        anything unusual (pre-hooks), take Triton's own path."""
        if len(self.configs) > 1:
            n = len(args)
            key = [args[i] if i < n else kwargs[k] for k, i in self._key_pos if i < n or k in kwargs]
            for v in args:
                if type(v) not in _NO_DTYPE and hasattr(v, "dtype"):
                    key.append(_dtype_name(v.dtype))
            if kwargs:
                for k, v in kwargs.items():
                    if k in self._arg_set and type(v) not in _NO_DTYPE and hasattr(v, "dtype"):
                        key.append(_dtype_name(v.dtype))
            config = self.cache.get(tuple(key))
        else:
            config = self.configs[0]
        if config is None or config.pre_hook is not None:
            return super().run(*args, **kwargs)
        self.best_config = config
        kw = getattr(config, "_moela_all_kwargs", None)  # on the config itself: ids of freed configs recur
        if kw is None:
            kw = config._moela_all_kwargs = config.all_kwargs()
        return self.fn.run(*args, **kwargs, **kw)

    def prune_configs(self, kwargs):
        self._table_hit = False
        if config_tables.tables_enabled():
            named = {**self.nargs, **kwargs}
            dev = next((v.device for v in named.values() if isinstance(v, torch.Tensor)), None)
            if dev is not None and dev.type == "cuda":
                key = {k: named[k] for k in self.keys if k in named}
                dtypes = tuple(str(v.dtype) for k, v in named.items() if k in self.arg_names and hasattr(v, "dtype"))
                cfg = config_tables.lookup(self.moela_name, key, dtypes, torch.cuda.get_device_name(dev))
                if cfg is not None:
                    self._table_hit = True
                    self.moela_sources[id(cfg)] = "table"
                    return [cfg]
        return super().prune_configs(kwargs)

    def source_of(self, config: triton.Config) -> str:
        if len(self.configs) == 1:
            return "pinned" if knobs.get(knobs.config_knob(self.moela_name)) else "single"
        return self.moela_sources.get(id(config), "tuned")


def chosen_configs() -> dict[str, tuple[str, str]]:
    """kernel name -> (the config it ran last in this process, where it came from: "table",
    "tuned", "pinned" or "single"); for the benchmark rows."""
    return {t.moela_name: (str(t.best_config), t.source_of(t.best_config))
            for t in _TUNERS if getattr(t, "best_config", None) is not None}


def autotune(name: str, configs: list[triton.Config], key: list[str], prune_configs_by: dict | None = None, **kwargs):
    """The autotuner of kernel ``name`` (a name unique among moela's autotuners: its config
    tables' key, its ``MOELA_<NAME>_CONFIG`` pin): :func:`autotune_configs`'s list, the config
    tables first (``TunedAutotuner``), then ``triton.autotune`` with moela's shorter timing.

    With ``MOELA_AUTOTUNE=0`` (read when the kernel module is imported) the kernel's
    ``early_config_prune`` still runs on each new key, and only its first survivor is kept
    and run, untimed.
    """
    configs = autotune_configs(name, configs)
    untimed = len(configs) > 1 and autotune_off()
    if untimed:
        early = (prune_configs_by or {}).get("early_config_prune")

        def first_fit(cfgs, named_args, **kw):
            return (early(cfgs, named_args, **kw) if early is not None else cfgs)[:1]

        prune_configs_by = {**(prune_configs_by or {}), "early_config_prune": first_fit}

    def decorate(fn):
        tuner = triton.autotune(configs=configs, key=key, prune_configs_by=prune_configs_by, **kwargs)(fn)
        tuner.__class__ = TunedAutotuner
        tuner.moela_name, tuner.moela_sources, tuner._table_hit = name, {}, False
        tuner._arg_set = frozenset(tuner.arg_names)
        tuner._key_pos = tuple((k, tuner.arg_names.index(k)) for k in tuner.keys if k in tuner.arg_names)

        def do_bench(kernel_call, quantiles):
            if untimed or tuner._table_hit:
                return _untimed(kernel_call, quantiles)
            return _tuning_bench(kernel_call, quantiles)

        tuner._do_bench = do_bench  # what Triton's do_bench property returns
        if any(t.moela_name == name for t in _TUNERS):
            raise ValueError(f"autotune: a kernel named {name!r} exists already (names key the config tables)")
        _TUNERS.append(tuner)
        return tuner

    return decorate


class _Arguments:
    """A launch's arguments by name, read lazily (what a heuristic indexes: ``a["K"]``)."""

    __slots__ = ("_pos", "_args", "_kwargs")

    def __init__(self, pos: dict[str, int], args: tuple, kwargs: dict):
        self._pos, self._args, self._kwargs = pos, args, kwargs

    def __getitem__(self, name: str):
        i = self._pos.get(name)
        if i is not None and i < len(self._args):
            return self._args[i]
        return self._kwargs[name]


class _Heuristics(triton.runtime.Heuristics):
    """``triton.heuristics`` whose functions read the arguments through :class:`_Arguments`
    instead of a dict of every argument built per launch (~1.5 µs of host time saved)."""

    _pos: dict[str, int]

    def run(self, *args, **kwargs):
        named = _Arguments(self._pos, args, kwargs)
        for name, heuristic in self.values.items():
            kwargs[name] = heuristic(named)
        return self.fn.run(*args, **kwargs)


def heuristics(values: dict):
    """``triton.heuristics(values)``, each function given a read-only view of the launch's
    arguments by name (``a["K"]``; nothing else of a dict)."""

    def decorate(fn):
        tuner = triton.heuristics(values)(fn)
        tuner.__class__ = _Heuristics
        tuner._pos = {name: i for i, name in enumerate(tuner.arg_names)}
        return tuner

    return decorate


def check_kernel_device(name: str, t: torch.Tensor) -> None:
    """Triton kernels run on CUDA tensors, or on CPU tensors under the interpreter."""
    if t.device.type == "cuda" or (t.device.type == "cpu" and knobs.interpret()):
        return
    raise ValueError(
        f"{name}: expected a CUDA tensor (or a CPU tensor with TRITON_INTERPRET=1), got device {t.device}"
    )


@functools.cache
def _device_capability(device: torch.device) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(device))


#: What the Triton interpreter (CPU tensors) stands for: a Hopper GPU with this many SMs (few, so
#: that each persistent program walks several tiles) and Hopper's shared memory per block.
INTERPRETER_CAPABILITY = (9, 0)
INTERPRETER_SMS = 3
_HOPPER_SMEM_PER_BLOCK = 227 * 1024

#: Input dtypes of the Hopper-native (TMA) GEMM kernels.
TMA_DTYPES = (torch.float16, torch.bfloat16)


def _cuda_index(device: torch.device) -> torch.device:
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def device_capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) of a CUDA device (cached), ``INTERPRETER_CAPABILITY`` for CPU tensors."""
    if device.type != "cuda":
        return INTERPRETER_CAPABILITY
    return _device_capability(_cuda_index(device))


@functools.cache
def _cuda_props(device: torch.device):
    return torch.cuda.get_device_properties(device)


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached): a persistent kernel's grid size;
    ``INTERPRETER_SMS`` for CPU tensors."""
    if device.type != "cuda":
        return INTERPRETER_SMS
    return _cuda_props(_cuda_index(device)).multi_processor_count


def smem_per_block(device: torch.device) -> int:
    """The shared memory one block may take (opt-in limit) on a CUDA device; Hopper's for CPU tensors."""
    if device.type != "cuda":
        return _HOPPER_SMEM_PER_BLOCK
    return getattr(_cuda_props(_cuda_index(device)), "shared_memory_per_block_optin", _HOPPER_SMEM_PER_BLOCK)


def tma_operand_ok(t: torch.Tensor) -> bool:
    """Can a TMA tensor descriptor read or write ``t`` as it is: base address and every stride but
    the last in multiples of 16 bytes, the last stride 1."""
    return t.data_ptr() % 16 == 0 and _tma_strides_ok(t.stride(), t.dtype)


@functools.lru_cache(maxsize=4096)
def _tma_strides_ok(strides: tuple[int, ...], dtype: torch.dtype) -> bool:
    size = dtype.itemsize
    return bool(strides) and strides[-1] == 1 and all(s > 0 and s * size % 16 == 0 for s in strides[:-1])


def tma_path(capability: tuple[int, int], *operands: torch.Tensor) -> bool:
    """The rule that picks a GEMM op's kernels: the Hopper-native ones (TMA, persistent, warp
    specialised) exactly when

    - the GPU has TMA: compute capability >= 9.0 (the interpreter counts as 9.0), and
      ``MOELA_TMA`` is not ``0``;
    - the inputs are fp16/bf16 (float32 stays on the pointer kernels: its IEEE dots run on FMA
      units, its TF32 wgmma would need K-major operands that dX does not have);
    - every operand, in the layout its descriptor reads (innermost dimension last), passes
      :func:`tma_operand_ok`, and none is empty.

    Otherwise the pointer-based kernels (cp.async or plain loads, any strides) run. ``capability``
    is an input so that tests can run either path anywhere.
    """
    if knobs.get("MOELA_TMA") == "0" or tuple(capability) < (9, 0):
        return False
    dtype = operands[0].dtype
    if dtype not in TMA_DTYPES:
        return False
    for t in operands:
        if t.dtype is not dtype or t.data_ptr() % 16 or not t.numel() or not _tma_strides_ok(t.stride(), dtype):
            return False
    return True


def uses_tma(*operands: torch.Tensor, config: triton.Config | None = None) -> bool:
    """Does a GEMM op's call on ``operands`` (each in the layout its descriptor would read) run its
    Hopper-native kernels: :func:`tma_path` on the operands' device, or, given a ``config``, the
    family the config belongs to (TMA configs carry ``WARP_SPECIALIZE``; a TMA config where the
    rule says no raises ValueError)."""
    rule = tma_path(device_capability(operands[0].device), *operands)
    if config is None:
        return rule
    tma_config = "WARP_SPECIALIZE" in config.kwargs
    if tma_config and not rule:
        raise ValueError(f"config: {config} is a config of the Hopper-native (TMA) kernels, but these operands "
                         f"take the pointer kernels (kernels._common.tma_path)")
    return tma_config


def _tma_scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    """Triton's allocator: global scratch for the tensor maps a kernel builds on the device. From
    torch's caching allocator on the current device and stream (Triton launches there): no host
    sync, and under CUDA-graph capture the block comes from the graph's private pool."""
    device = "cuda" if torch.cuda.is_available() and not knobs.interpret() else "cpu"
    return torch.empty(size, dtype=torch.int8, device=device)


def ensure_tma_allocator() -> None:
    """Install :func:`_tma_scratch` as Triton's allocator unless one is set in this context.

    Triton keeps the allocator in a ContextVar, so a thread that never set one (autograd runs
    backward on its own threads) has none: launchers of kernels with device-side descriptors call
    this before each launch (~100 ns). An allocator the user set is kept.
    """
    current = getattr(_allocation, "_allocator", None)
    null = getattr(_allocation, "NullAllocator", None)
    if current is not None and null is not None and not isinstance(current.get(), null):
        return
    triton.set_allocator(_tma_scratch)


def check_fp8_capability(name: str, device: torch.device) -> None:
    """Raise ``RuntimeError`` on a CUDA device without e4m3 support (before sm_89).

    Reads the (cached) compute capability only; never synchronises. CPU devices pass (the
    Triton interpreter emulates fp8).
    """
    if device.type != "cuda":
        return
    cap = _device_capability(device)
    if tuple(cap) < MIN_FP8_CAPABILITY:
        raise RuntimeError(
            f"{name}: the FP8 (e4m3) kernels need a GPU of compute capability >= "
            f"{MIN_FP8_CAPABILITY[0]}.{MIN_FP8_CAPABILITY[1]} (Ada, Hopper or later); {device} is "
            f"sm_{cap[0]}{cap[1]}. Use the moela.reference FP8 functions (or dequant + F.linear) there."
        )


def direct_path_probes() -> dict[str, bool]:
    """Which of the private torch probes :func:`run_direct` relies on exist in this torch (a test
    asserts all of them: a torch that drops one must fail it, not silently lose the fast path)."""
    return {"dispatch modes": _dispatch_modes is not None, "functorch stack": _functorch_stack is not None,
            "torch-function modes": _function_modes is not None}


def run_direct(*tensors: object, grad: bool = True) -> bool:
    """May a public op call its launcher directly instead of through its ``torch.library`` op?

    The custom op (``torch.ops.moela.*``) is what autograd, ``torch.compile``, ``torch.jit.trace``,
    fake/meta tensors, dispatch and function modes (``FlopCounterMode``, ``FakeTensorMode``) and
    functorch transforms see; in plain eager inference it only adds Python dispatch layers:
    ~20 µs of host time per call, which decode-sized layers (a few µs of GPU work per kernel)
    pay in full. So the ops run their launcher directly when none of those can be involved: not
    compiling or tracing, no dispatch or torch-function mode (``with torch.device(...)`` is one)
    or functorch transform active, every tensor a plain ``Tensor``/``Parameter`` off the meta
    device, and no gradient to record (grad mode off, or no input requires it; ``grad=False``
    for ops without a gradient, whose outputs never record one). Both paths run the same
    launcher: the same kernels, bits and errors. ``None`` entries are skipped; anything else
    that is not a plain tensor sends the call through the op (whose checks name it). Costs
    about a microsecond.
    """
    if (torch.compiler.is_compiling() or _dispatch_modes is None or _functorch_stack is None
            or _function_modes is None or _dispatch_modes() or _functorch_stack() is not None
            or _function_modes() or torch.jit.is_tracing()):
        return False
    grad = grad and torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if type(t) not in _PLAIN_TENSORS or t.is_meta or (grad and t.requires_grad):
            return False
    return True


def _names(dtypes) -> str:
    return "/".join(str(d).removeprefix("torch.") for d in dtypes)


def kernel_dtype(op: str, name: str, t: torch.Tensor, dtypes) -> None:
    """The kernel's narrower dtype domain, said in words (the reference takes more)."""
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: the Triton {op} kernel takes {_names(dtypes)}, got {t.dtype} "
                        f"(moela.reference.{op} computes it)")


def kernel_rows(op: str, name: str, rows: int, limit: int = 2**31 - 1) -> None:
    """The kernels index rows (and plan rows) in int32: at most ``limit`` of them."""
    if rows > limit:
        raise ValueError(f"{name}: the Triton {op} kernel takes at most {limit} rows (int32 indices), got {rows}")
