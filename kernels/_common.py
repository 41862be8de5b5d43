"""Helpers shared by the kernel launchers: device checks, autotune config lists, small math.

Autotune rule (STYLE.md 6, INTERPRETER.md): a kernel's configs come from a function; on a GPU
all of them are tried unless an environment variable pins one; under the Triton interpreter
exactly one config is used (the interpreter cannot autotune more than one).

Pinning a config: ``MOELA_<KERNEL>_CONFIG="BLOCK_M=64,BLOCK_N=128,BLOCK_K=64,num_warps=4,num_stages=4"``
(names are the kernel's constexprs plus ``num_warps``/``num_stages``). ``MOELA_AUTOTUNE=0``
keeps only the first (default) config of every kernel.
"""

from __future__ import annotations

import os

import torch
import triton

from moela.kernels.interpreter import interpreter_active

__all__ = ["autotune_configs", "parse_config", "check_kernel_device", "cdiv", "next_power_of_2"]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


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

    ``configs[0]`` is the default: the one used under the interpreter and with MOELA_AUTOTUNE=0.
    """
    env_var = f"MOELA_{name.upper()}_CONFIG"
    pinned = os.environ.get(env_var)
    if pinned:
        return [parse_config(pinned, env_var)]
    if interpreter_active() or os.environ.get("MOELA_AUTOTUNE", "1") == "0":
        return configs[:1]
    return configs


def check_kernel_device(name: str, t: torch.Tensor) -> None:
    """Triton kernels run on CUDA tensors, or on CPU tensors under the interpreter."""
    if t.device.type == "cuda" or (t.device.type == "cpu" and interpreter_active()):
        return
    raise ValueError(
        f"{name}: expected a CUDA tensor (or a CPU tensor with TRITON_INTERPRET=1), got device {t.device}"
    )
