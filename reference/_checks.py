"""Argument checks shared by the references and the kernel launchers.

Every check raises ``TypeError`` (wrong type or dtype) or ``ValueError`` (wrong rank, shape,
device or value) naming the argument, what was expected and what was given. None of them
reads tensor values, so they never synchronise with the device. :func:`check_has_values` is
what a function that must read values (a reference, a ``validate=True`` check) runs first.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch

INT_DTYPES = (torch.int32, torch.int64)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return "/".join(str(d).removeprefix("torch.") for d in dtypes)


def check_tensor(
    name: str,
    t: object,
    *,
    ndim: int | Sequence[int] | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    shape: Sequence[int | None] | None = None,
) -> torch.Tensor:
    """Check that ``t`` is a tensor of the given rank, dtype and shape (``None`` = any size)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.ndim not in allowed:
            want = " or ".join(f"{n}-D" for n in allowed)
            raise ValueError(f"{name}: expected a {want} tensor, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype {_dtype_names(dtypes)}, got {t.dtype}")
    if shape is not None:
        if t.ndim != len(shape) or any(w is not None and w != s for w, s in zip(shape, t.shape, strict=True)):
            want = "(" + ", ".join("*" if w is None else str(w) for w in shape) + ")"
            raise ValueError(f"{name}: expected shape {want}, got {tuple(t.shape)}")
    return t


def check_same_device(**tensors: torch.Tensor | None) -> None:
    """All given tensors live on one device."""
    items = [(n, t) for n, t in tensors.items() if t is not None]
    if not items:
        return
    first_name, first = items[0]
    for n, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{n}: expected device {first.device} (that of {first_name}), got {t.device}")


def check_has_values(name: str, t: torch.Tensor, reader: str) -> None:
    """``t`` holds values ``reader`` can read: not a meta tensor (those carry shapes only)."""
    if t.is_meta:
        raise ValueError(f"{name}: got a meta tensor, which carries no values, and {reader} reads them "
                         f"(moela.kernels gives shapes on meta tensors)")


def check_int(name: str, v: object, minimum: int = 0) -> int:
    """An int (not a bool) >= ``minimum``: TypeError for other types, ValueError below the minimum."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name}: expected an int, got {v!r} ({type(v).__name__})")
    if v < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {v}")
    return v


def check_positive_int(name: str, v: object) -> int:
    """A positive int (not a bool): TypeError for other types, ValueError for values <= 0."""
    if not isinstance(v, int) or isinstance(v, bool):
        raise TypeError(f"{name}: expected a positive int, got {v!r} ({type(v).__name__})")
    if v <= 0:
        raise ValueError(f"{name}: expected a positive int, got {v!r}")
    return v


def check_bool(name: str, v: object) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{name}: expected a bool, got {v!r} ({type(v).__name__})")
    return v


def check_float(name: str, v: object, *, finite: bool = True) -> float:
    """A Python int or float (not a bool), finite unless ``finite=False``."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name}: expected a float, got {v!r} ({type(v).__name__})")
    if finite and not math.isfinite(v):
        raise ValueError(f"{name}: expected a finite float, got {v!r}")
    return float(v)


def check_dtype_arg(name: str, v: object, allowed: Sequence[torch.dtype]) -> torch.dtype:
    """A ``torch.dtype`` argument (such as ``out_dtype``) among ``allowed``."""
    if not isinstance(v, torch.dtype) or v not in allowed:
        raise TypeError(f"{name}: expected one of {_dtype_names(allowed)}, got {v!r}")
    return v


def check_choice(name: str, v: object, choices: Sequence[object]) -> object:
    if not any(v is c or (type(v) is type(c) and v == c) for c in choices):
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {v!r}")
    return v


def check_float_tensor(name: str, t: object) -> torch.Tensor:
    """A tensor of any floating-point dtype."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
    return t


def accumulate_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 if any input is float64, else float32 (the accumulator of every reference)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


class TensorSpec(NamedTuple):
    """What a contract check promises an op returns: one output's shape and dtype (on the
    device of the op's first tensor argument)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
