"""Grouped expert GEMM: each group of rows multiplies its own expert's weight.

Legend: M rows (grouped by expert), K input features, N output features, E experts.
Weights follow ``F.linear``: ``w[e]`` is (N, K) and rows of group e compute ``x · w[e]ᵀ``.

Two layouts of the rows:

- contiguous (:func:`grouped_gemm`): xs (M, K), group e owns rows ``offsets[e-1]:offsets[e]``;
- masked (:func:`grouped_gemm_masked`, DeepGEMM's ``m_grouped_*_masked`` and DeepEP's
  low-latency layout, what an expert-parallel decode step under CUDA graphs holds): x
  (E, max_m, K), expert e's rows are ``x[e, :masked_m[e]]``; the output's rows at or past
  ``masked_m[e]`` are zeros. ``masked_m`` is clamped into [0, max_m] (:func:`masked_rows`),
  ``validate=True`` raises on values outside it (:func:`check_masked_m`, a host sync).

Malformed offsets (negative, past M, decreasing) compute a documented result, in the kernels
as here: the ends are clamped into [0, M] and made non-decreasing with a running max
(:func:`group_ends`), so a group ending before its predecessor is empty. ``validate=True``
raises on them instead (:func:`check_offsets`, a host sync).

``check_grouped_gemm`` / ``check_grouped_gemm_dw`` / ``check_grouped_gemm_masked`` are the ops'
contracts (arguments in, output spec out, no values read), run by these references and by the
Triton kernels alike.
"""

from __future__ import annotations

import torch

from ._checks import (
    FLOAT_DTYPES,
    INT_DTYPES,
    TensorSpec,
    accumulate_dtype,
    check_bool,
    check_has_values,
    check_same_device,
    check_tensor,
)

__all__ = ["grouped_gemm", "grouped_gemm_dw", "grouped_gemm_masked", "check_grouped_gemm", "check_grouped_gemm_dw",
           "check_grouped_gemm_masked", "check_offsets", "check_masked_m", "group_ends", "masked_rows"]


def group_ends(offsets: torch.Tensor, num_rows: int) -> list[int]:
    """The group ends the ops use (a host read): offsets clamped into [0, num_rows], running max."""
    return offsets.long().clamp(0, num_rows).cummax(0).values.tolist() if offsets.numel() else []


def check_offsets(offsets: torch.Tensor, num_rows: int) -> None:
    """Value check (synchronises): offsets are non-negative, non-decreasing and end <= num_rows."""
    check_has_values("offsets", offsets, "validate=True")
    o = offsets.long().cpu()
    if o.numel() and (o[0] < 0 or bool((o[1:] < o[:-1]).any()) or o[-1] > num_rows):
        shown = o.tolist() if o.numel() <= 16 else f"{o[:16].tolist()}..."
        raise ValueError(f"offsets: expected non-decreasing cumulative row ends in [0, {num_rows}], got {shown}")


def masked_rows(masked_m: torch.Tensor, max_m: int) -> list[int]:
    """The rows of each expert the masked ops use (a host read): ``masked_m`` clamped into [0, max_m]."""
    return masked_m.long().clamp(0, max_m).tolist()


def check_masked_m(masked_m: torch.Tensor, max_m: int) -> None:
    """Value check (synchronises): every ``masked_m[e]`` lies in [0, max_m]."""
    check_has_values("masked_m", masked_m, "validate=True")
    m = masked_m.long().cpu()
    bad = (m < 0) | (m > max_m)
    if bool(bad.any()):
        e = int(bad.nonzero()[0])
        raise ValueError(f"masked_m: expected row counts in [0, {max_m}] (max_m), got {int(m[e])} for expert {e}")


def check_grouped_gemm(xs: object, w: object, offsets: object, *, validate: object = False) -> TensorSpec:
    """The contract of ``grouped_gemm``: xs (M, K) float, w (E, N, K) of xs's dtype, offsets (E,)
    int32/int64, one device; returns the (M, N) output's spec."""
    check_tensor("xs", xs, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("w", w, ndim=3, dtypes=(xs.dtype,))
    E, N, K = w.shape
    if xs.shape[1] != K:
        raise ValueError(f"xs: expected K={K} columns (w is {tuple(w.shape)}), got shape {tuple(xs.shape)}")
    check_tensor("offsets", offsets, dtypes=INT_DTYPES, shape=(E,))
    check_same_device(xs=xs, w=w, offsets=offsets)
    check_bool("validate", validate)
    return TensorSpec((xs.shape[0], N), xs.dtype)


def check_grouped_gemm_dw(xs: object, dy: object, offsets: object) -> TensorSpec:
    """The contract of ``grouped_gemm_dw``: xs (M, K), dy (M, N) of xs's dtype, offsets (E,);
    returns the (E, N, K) weight gradient's spec."""
    check_tensor("xs", xs, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("dy", dy, ndim=2, dtypes=(xs.dtype,))
    if dy.shape[0] != xs.shape[0]:
        raise ValueError(f"dy: expected {xs.shape[0]} rows (those of xs), got shape {tuple(dy.shape)}")
    check_tensor("offsets", offsets, ndim=1, dtypes=INT_DTYPES)
    check_same_device(xs=xs, dy=dy, offsets=offsets)
    return TensorSpec((offsets.shape[0], dy.shape[1], xs.shape[1]), xs.dtype)


def check_grouped_gemm_masked(x: object, w: object, masked_m: object, *, validate: object = False) -> TensorSpec:
    """The contract of ``grouped_gemm_masked``: x (E, max_m, K) float, w (E, N, K) of x's dtype,
    masked_m (E,) int32/int64, one device; returns the (E, max_m, N) output's spec."""
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("w", w, ndim=3, dtypes=(x.dtype,))
    E, N, K = w.shape
    if x.shape[0] != E or x.shape[2] != K:
        raise ValueError(f"x: expected shape ({E}, max_m, {K}) (w is {tuple(w.shape)}), got {tuple(x.shape)}")
    check_tensor("masked_m", masked_m, dtypes=INT_DTYPES, shape=(E,))
    check_same_device(x=x, w=w, masked_m=masked_m)
    check_bool("validate", validate)
    return TensorSpec((E, x.shape[1], N), x.dtype)


def grouped_gemm(xs: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, *, validate: bool = False) -> torch.Tensor:
    """``out[r] = xs[r] · w[e]ᵀ`` for rows ``offsets[e-1] <= r < offsets[e]`` (offsets[-1] := 0).

    Args:
        xs: (M, K) rows grouped by expert; fp16/bf16/fp32/fp64.
        w: (E, N, K) expert weights, same dtype as xs.
        offsets: (E,) int32/int64 cumulative row ends; empty groups repeat the previous end.
        validate: raise ValueError on malformed offsets (else: the module docstring's rule).
    Returns:
        (M, N) in xs.dtype, accumulated in float32 (float64 for float64). Rows at or past
        ``offsets[E-1]`` belong to no group and are zero.
    """
    N = check_grouped_gemm(xs, w, offsets, validate=validate).shape[1]
    check_has_values("offsets", offsets, "moela.reference.grouped_gemm")
    if validate:
        check_offsets(offsets, xs.shape[0])

    acc = accumulate_dtype(xs.dtype)
    out = torch.zeros(xs.shape[0], N, dtype=xs.dtype, device=xs.device)
    start = 0
    for e, end in enumerate(group_ends(offsets, xs.shape[0])):
        out[start:end] = (xs[start:end].to(acc) @ w[e].to(acc).T).to(xs.dtype)
        start = end
    return out


def grouped_gemm_masked(x: torch.Tensor, w: torch.Tensor, masked_m: torch.Tensor, *,
                        validate: bool = False) -> torch.Tensor:
    """``out[e, r] = x[e, r] · w[e]ᵀ`` for ``r < masked_m[e]``, zeros for the rows past it.

    Args:
        x: (E, max_m, K) each expert's rows, padded to max_m; fp16/bf16/fp32/fp64. Rows at or past
            ``masked_m[e]`` are never read into a result (they may hold anything, NaN included).
        w: (E, N, K) expert weights, same dtype as x.
        masked_m: (E,) int32/int64 rows of each expert, clamped into [0, max_m] (module docstring).
        validate: raise ValueError on a masked_m outside [0, max_m] (else: the clamp).
    Returns:
        (E, max_m, N) in x.dtype, accumulated in float32 (float64 for float64).
    """
    spec = check_grouped_gemm_masked(x, w, masked_m, validate=validate)
    check_has_values("masked_m", masked_m, "moela.reference.grouped_gemm_masked")
    if validate:
        check_masked_m(masked_m, x.shape[1])
    acc = accumulate_dtype(x.dtype)
    out = torch.zeros(spec.shape, dtype=x.dtype, device=x.device)
    for e, rows in enumerate(masked_rows(masked_m, x.shape[1])):
        out[e, :rows] = (x[e, :rows].to(acc) @ w[e].to(acc).T).to(x.dtype)
    return out


def grouped_gemm_dw(xs: torch.Tensor, dy: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The weight gradient of :func:`grouped_gemm`: ``dw[e] = dy[rows of e]ᵀ · xs[rows of e]``.

    Args:
        xs: (M, K) the forward's input rows; dy: (M, N) the output gradient, same dtype.
        offsets: (E,) cumulative row ends (malformed ones: the module docstring's rule).
    Returns:
        (E, N, K) in xs.dtype, accumulated in float32 (float64 for float64); empty groups give 0.
        (dX needs no op of its own: it is ``grouped_gemm(dy, w.transpose(1, 2), offsets)``.)
    """
    check_grouped_gemm_dw(xs, dy, offsets)
    check_has_values("offsets", offsets, "moela.reference.grouped_gemm_dw")
    acc = accumulate_dtype(xs.dtype)
    dw = torch.zeros(offsets.shape[0], dy.shape[1], xs.shape[1], dtype=acc, device=xs.device)
    start = 0
    for e, end in enumerate(group_ends(offsets, xs.shape[0])):
        dw[e] = dy[start:end].to(acc).T @ xs[start:end].to(acc)
        start = end
    return dw.to(xs.dtype)
