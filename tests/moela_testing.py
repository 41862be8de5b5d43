"""Helpers for moela's tests: poisoned output buffers, derived tolerances, CUDA gates.

Import from any test as ``import moela_testing`` (pyproject puts tests/ on the path).

- ``nan_empty`` / ``nan_like``: output buffers pre-filled with NaN (a sentinel for integer
  dtypes) so that an element a kernel forgot to write fails the comparison.
- ``assert_close_derived``: flash-attention's rule, the kernel's error against a float64
  reference must stay within ``factor`` times the error torch makes at the same precision.
- ``requires_cuda``, ``requires_sm(major, minor)``, ``is_sm_at_least``: GPU gates that never
  touch the GPU at import (only the cheap ``torch.cuda.is_available()``).
- ``seed_for(nodeid)``: the seed conftest gives each test (request the ``seed`` fixture).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence

import pytest
import torch

__all__ = [
    "FP8_DTYPES",
    "INT_SENTINEL",
    "assert_close_derived",
    "is_sm_at_least",
    "nan_empty",
    "nan_like",
    "requires_cuda",
    "requires_sm",
    "seed_for",
]

#: Integer buffers are filled with -1 (all bits set: the max value of unsigned dtypes);
#: bool buffers with True.
INT_SENTINEL = -1

# fp8 formats and the byte their NaN is stored as (fn: S.1111.111 / S.11111.11; fnuz and
# e8m0: the single NaN encoding).
_FP8_NAN_BYTE: dict[torch.dtype, int] = {
    getattr(torch, name): byte
    for name, byte in (
        ("float8_e4m3fn", 0x7F),
        ("float8_e5m2", 0x7F),
        ("float8_e4m3fnuz", 0x80),
        ("float8_e5m2fnuz", 0x80),
        ("float8_e8m0fnu", 0xFF),
    )
    if hasattr(torch, name)
}

#: The 8-bit float dtypes this torch knows.
FP8_DTYPES: tuple[torch.dtype, ...] = tuple(_FP8_NAN_BYTE)


def nan_empty(
    shape: int | Sequence[int], dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """A new tensor every element of which is "not written yet".

    Float and complex dtypes hold NaN, fp8 dtypes their NaN bit pattern (set through a uint8
    view, since torch cannot fill fp8 directly), integer dtypes ``INT_SENTINEL`` (-1, i.e. all
    bits set, the max value for unsigned dtypes) and bool True.

    >>> nan_empty((2, 3), torch.bfloat16).isnan().all().item()
    True
    """
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if dtype in _FP8_NAN_BYTE:
        return torch.full(shape, _FP8_NAN_BYTE[dtype], dtype=torch.uint8, device=device).view(dtype)
    if dtype.is_floating_point or dtype.is_complex:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    if dtype == torch.bool:
        return torch.ones(shape, dtype=dtype, device=device)
    fill = INT_SENTINEL if dtype.is_signed else torch.iinfo(dtype).max
    return torch.full(shape, fill, dtype=dtype, device=device)


def nan_like(t: torch.Tensor) -> torch.Tensor:
    """``nan_empty(t.shape, t.dtype, t.device)``: a poisoned buffer shaped like ``t``."""
    return nan_empty(t.shape, t.dtype, t.device)


def _max_err(x: torch.Tensor, ref: torch.Tensor) -> tuple[float, int]:
    """max |x - ref| in float64 (equal infinities count as 0) and the flat index of the max."""
    if x.numel() == 0:
        return 0.0, -1
    diff = (x - ref).abs()
    diff = torch.where(x == ref, torch.zeros_like(diff), diff).flatten()
    idx = int(diff.argmax())
    return float(diff[idx]), idx


def assert_close_derived(
    out: torch.Tensor,
    ref_hi: torch.Tensor,
    ref_lo: torch.Tensor,
    factor: float = 2.0,
    floor: float | None = None,
    name: str = "",
) -> tuple[float, float]:
    """Assert ``max|out - ref_hi| <= factor * max|ref_lo - ref_hi| + floor`` (flash-attention).

    out:    the kernel's result, in its output dtype.
    ref_hi: the same computation in float64 (the reference run on upcast inputs).
    ref_lo: the same computation done by torch in ``out``'s precision (e.g. the reference run
            on the bf16 inputs in bf16): the error it makes is what that precision costs.
    floor:  added to the bound; default one unit in the last place of ``out``'s dtype at the
            largest magnitude of ``ref_hi`` (``finfo.eps * max|ref_hi|``), which covers a torch
            result that happens to be exact.

    NaN in ``out`` always fails (so do NaN in the references: a broken test). Returns the two
    errors ``(err_out, err_lo)``. Example::

        ref_hi = reference.grouped_gemm(x.double(), w.double(), offsets)
        ref_lo = reference.grouped_gemm(x, w, offsets)  # bf16 torch
        assert_close_derived(kernels.grouped_gemm(x, w, offsets), ref_hi, ref_lo, name="y")
    """
    label = f"{name}: " if name else ""
    if not out.dtype.is_floating_point:
        raise TypeError(f"{label}assert_close_derived compares float outputs, got {out.dtype}")
    if out.shape != ref_hi.shape or ref_lo.shape != ref_hi.shape:
        raise AssertionError(
            f"{label}shape mismatch: out {tuple(out.shape)}, ref_hi {tuple(ref_hi.shape)}, ref_lo {tuple(ref_lo.shape)}"
        )
    o, hi, lo = (t.detach().to(device="cpu", dtype=torch.float64) for t in (out, ref_hi, ref_lo))
    for what, t in (("out", o), ("ref_hi (float64 reference)", hi), ("ref_lo (torch reference)", lo)):
        nan = torch.isnan(t)
        if nan.any():
            first = tuple(int(i) for i in nan.nonzero()[0])
            raise AssertionError(
                f"{label}{int(nan.sum())} of {t.numel()} elements of {what} are NaN (first at {first})"
            )
    err_out, worst = _max_err(o, hi)
    err_lo, _ = _max_err(lo, hi)
    if floor is None:
        amax = float(hi.abs().max()) if hi.numel() else 0.0
        floor = float(torch.finfo(out.dtype).eps) * amax
    bound = factor * err_lo + floor
    if not err_out <= bound:
        where = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), o.shape))
        raise AssertionError(
            f"{label}max |out - ref| = {err_out:.4g} exceeds {factor:g} x max |torch {ref_lo.dtype} - ref| "
            f"= {factor:g} x {err_lo:.4g} + floor {floor:.3g} = {bound:.4g} "
            f"(worst at {where}: out {o.flatten()[worst].item():.6g}, ref {hi.flatten()[worst].item():.6g}, "
            f"torch {lo.flatten()[worst].item():.6g})"
        )
    return err_out, err_lo


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@functools.cache
def is_sm_at_least(major: int, minor: int = 0) -> bool:
    """True when CUDA device 0 has compute capability >= (major, minor); False without CUDA.

    Probes the GPU on first call only, so call it from tests or ``requires_sm``, not at import.
    """
    if not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(0) >= (major, minor)


def requires_sm(major: int, minor: int = 0) -> pytest.MarkDecorator:
    """Skip unless device 0 is at least sm_{major}{minor}, e.g. ``@requires_sm(9, 0)`` (Hopper).

    The condition is a string, so pytest evaluates it when the test runs, not at import.
    """
    return pytest.mark.skipif(
        f"not __import__('moela_testing').is_sm_at_least({int(major)}, {int(minor)})",
        reason=f"needs a CUDA device with compute capability >= {major}.{minor}",
    )


def seed_for(nodeid: str) -> int:
    """The per-test seed: a stable 32-bit hash of the pytest node id (same on every run and
    machine, different between tests)."""
    return int.from_bytes(hashlib.sha256(nodeid.encode()).digest()[:4], "little")


# ------------------------------------------------------------------------------- routing
def random_topk_ids(T: int, k: int, E: int, invalid_frac: float = 0.0, device="cpu") -> torch.Tensor:
    """(T, k) int32: k distinct experts per token (DeepSeek's top-k), a fraction of slots set to -1
    (experts on another rank)."""
    ids = torch.rand(T, max(E, k)).argsort(-1)[:, :k] % max(E, 1)
    if invalid_frac:
        ids[torch.rand(T, k) < invalid_frac] = -1
    return ids.to(device=device, dtype=torch.int32)


def check_plan_invariants(plan, ids: torch.Tensor, E: int, align: int) -> None:
    """A RoutingPlan's own invariants, independent of any implementation: counts, padded offsets,
    one row per valid slot inside its expert's segment, maps that invert each other, padding rows,
    (token, slot) order inside every expert, int32 everywhere."""
    from moela.reference import RoutingPlan, max_rows

    T, k = ids.shape
    ids = ids.long().cpu()
    plan = RoutingPlan(*(t.cpu() for t in plan))
    for t in plan:
        assert t.dtype == torch.int32
    valid = (ids >= 0) & (ids < E)
    n_valid = int(valid.sum())
    counts = plan.tokens_per_expert.long()
    assert counts.tolist() == torch.bincount(ids[valid], minlength=E).tolist()
    padded = (counts + align - 1) // align * align
    assert plan.offsets.tolist() == padded.cumsum(0).tolist()  # offsets end at valid slots + padding
    assert plan.max_rows == max_rows(T, k, E, align) >= (int(plan.offsets[-1]) if E else 0)
    rows = plan.slot_to_row[valid].long()
    assert (plan.slot_to_row[~valid] == -1).all()  # skipped slots have no row
    assert rows.unique().numel() == n_valid  # every valid slot exactly one row
    starts = plan.offsets.long() - padded
    e = ids[valid]
    assert ((rows >= starts[e]) & (rows < starts[e] + counts[e])).all()
    flat = torch.arange(T * k).view(T, k)[valid]
    assert (plan.row_to_slot[rows].long() == flat).all()  # the maps invert each other
    assert (plan.row_to_token[rows].long() == flat // k).all()
    assert int((plan.row_to_slot >= 0).sum()) == n_valid  # every other row is padding
    assert ((plan.row_to_token >= 0) == (plan.row_to_slot >= 0)).all()
    assert ((plan.row_to_slot == -1) | (plan.row_to_slot >= 0)).all()
    for ex in range(E):  # stable: (token, slot) order inside every expert
        seg = plan.row_to_slot[int(starts[ex]): int(starts[ex]) + int(counts[ex])]
        assert (seg.diff() > 0).all()
