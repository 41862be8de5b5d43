"""DeepSeek-V3's FP8 *training* GEMMs: the token-direction quantization, dgrad and wgrad.

Legend: M rows (tokens; grouped by expert after dispatch), K input features, N output features
of a linear ``y = x · Wᵀ`` with W (N, K), E experts, B the block (128), ⌈n⌉ = ceil(n/B).

DeepSeek-V3 runs all three GEMMs of a linear layer in e4m3 (technical report §3.3):

    GEMM    computes               reduction  activation operand     weight operand
    fprop   y  = x · Wᵀ            K          x: 1×B along K         W: B×B blocks      (``fp8_gemm``)
    dgrad   dx = dy · W            N          dy: 1×B along N        W: B×B, transposed (``fp8_dgrad``)
    wgrad   dW = dyᵀ · x           M          dy, x: B×1 along M     —                  (``fp8_wgrad``)

Every GEMM promotes its partial sums to float32 once per B of its reduction, as ``fp8_gemm`` does
(module ``moela.reference.fp8``: the quantization rules, special values and the promotion).

- ``quant_act_t(x)``: the B×1 quantization along the rows (tokens) of x (M, K), written
  transposed, ``(q_t (K, M), s_t (K, ⌈M⌉))``: bit for bit ``quant_act(xᵀ)``. The wgrad's
  operands have their reduction (M) contiguous, the layout FP8 tensor cores take.
- ``quant_act_dual(x)``: both quantizations of one activation, ``quant_act(x)`` (for fprop or
  dgrad) and ``quant_act_t(x)`` (for wgrad); the kernel reads x once.
- ``fp8_dgrad(dy, dy_s, w, w_s)``: dx = dy · W with W's 128×128 blocks used transposed (the
  same e4m3 weight and scales as the forward): ``fp8_gemm(dy, dy_s, wᵀ, w_sᵀ)``.
- ``fp8_grouped_dgrad``: the same per expert on rows grouped by expert (``fp8_grouped_gemm``'s
  row rules: offsets clamped and made non-decreasing, rows past ``offsets[E-1]`` zero).
- ``fp8_wgrad(dy_t, dy_t_s, x_t, x_t_s)``: dW (N, K) = Σ over B-blocks mb of tokens of
  ``promote(dy_t[:, mb] · x_t[:, mb]ᵀ) · dy_t_s[:, mb] · x_t_s[:, mb]ᵀ``, both operands from
  ``quant_act_t``; float32 out by default (a weight gradient).
- ``fp8_grouped_wgrad(..., offsets)``: the k-grouped wgrad (DeepGEMM's
  ``k_grouped_fp8_gemm_tn_contiguous``): ``dW[e]`` reduces over the tokens (columns of ``dy_t``
  and ``x_t``) of group e only. The scale blocks are those of ``quant_act_t`` on all M rows: a
  block that two groups share gives each the part of its sum over that group's own tokens, under
  the block's one scale. With group starts at multiples of B (``make_routing(..., align=B)``) no
  block is shared: DeepGEMM's layout.

Partial blocks (any M, N, K) are allowed, as in ``quant_act``. Each op's contract
(``check_<op>``) is shared with the Triton kernels.
"""

from __future__ import annotations

import torch

from ._checks import (
    INT_DTYPES,
    TensorSpec,
    check_bool,
    check_dtype_arg,
    check_has_values,
    check_positive_int,
    check_same_device,
    check_tensor,
)
from .fp8 import FP8_DTYPE, OUT_DTYPES, check_quant_act, fp8_gemm, fp8_grouped_gemm, quant_act
from .grouped_gemm import check_offsets, group_ends

__all__ = [
    "quant_act_t", "quant_act_dual", "fp8_dgrad", "fp8_grouped_dgrad", "fp8_wgrad", "fp8_grouped_wgrad",
    "check_quant_act_t", "check_quant_act_dual", "check_fp8_dgrad", "check_fp8_grouped_dgrad", "check_fp8_wgrad",
    "check_fp8_grouped_wgrad",
]


def _kb(n: int, block: int) -> int:
    return -(-n // block)


# ---------------------------------------------------------------------------- contracts
def check_quant_act_t(x: object, block: object = 128, scale_fmt: object = None) -> tuple[TensorSpec, TensorSpec]:
    """The contract of ``quant_act_t``: x (M, K) float -> (e4m3 (K, M), float32 (K, ⌈M/block⌉))."""
    check_tensor("x", x, ndim=2)
    check_quant_act(x, block, scale_fmt)
    M, K = x.shape
    return TensorSpec((K, M), FP8_DTYPE), TensorSpec((K, _kb(M, block)), torch.float32)


def check_quant_act_dual(x: object, block: object = 128,
                         scale_fmt: object = None) -> tuple[TensorSpec, TensorSpec, TensorSpec, TensorSpec]:
    """The contract of ``quant_act_dual``: x (M, K) float -> ``quant_act``'s two specs, then
    ``quant_act_t``'s."""
    return (*check_quant_act(x, block, scale_fmt), *check_quant_act_t(x, block, scale_fmt))


def _check_dgrad_operands(dy: object, dy_s: object, w: object, w_s: object, out_dtype: object,
                          block: object) -> tuple[int, int, int]:
    """dy (M, N) e4m3 with (M, ⌈N⌉) scales; w (..., N, K) e4m3 with (..., ⌈N⌉, ⌈K⌉) scales."""
    check_tensor("dy", dy, ndim=2, dtypes=(FP8_DTYPE,))
    check_positive_int("block", block)
    check_dtype_arg("out_dtype", out_dtype, OUT_DTYPES)
    M, N = dy.shape
    if w.shape[-2] != N:
        raise ValueError(f"w: expected N={N} rows per weight to match dy {tuple(dy.shape)} (w is the forward's "
                         f"(N, K) weight), got shape {tuple(w.shape)}")
    K = w.shape[-1]
    check_tensor("dy_s", dy_s, dtypes=(torch.float32,), shape=(M, _kb(N, block)))
    check_tensor("w_s", w_s, dtypes=(torch.float32,), shape=(*w.shape[:-2], _kb(N, block), _kb(K, block)))
    return M, N, K


def check_fp8_dgrad(dy: object, dy_s: object, w: object, w_s: object, out_dtype: object = torch.bfloat16,
                    block: object = 128) -> TensorSpec:
    """The contract of ``fp8_dgrad``: dy (M, N) e4m3 with (M, ⌈N⌉) scales, w (N, K) e4m3 with its
    (⌈N⌉, ⌈K⌉) block scales -> dx (M, K) in out_dtype."""
    check_tensor("w", w, ndim=2, dtypes=(FP8_DTYPE,))
    M, _, K = _check_dgrad_operands(dy, dy_s, w, w_s, out_dtype, block)
    check_same_device(dy=dy, dy_s=dy_s, w=w, w_s=w_s)
    return TensorSpec((M, K), out_dtype)


def check_fp8_grouped_dgrad(dy: object, dy_s: object, w: object, w_s: object, offsets: object,
                            out_dtype: object = torch.bfloat16, block: object = 128, *,
                            validate: object = False) -> TensorSpec:
    """The contract of ``fp8_grouped_dgrad``: dy (M, N) e4m3 with (M, ⌈N⌉) scales, w (E, N, K) e4m3
    with (E, ⌈N⌉, ⌈K⌉) scales, offsets (E,) int32/int64 -> dx (M, K) in out_dtype."""
    check_tensor("w", w, ndim=3, dtypes=(FP8_DTYPE,))
    M, _, K = _check_dgrad_operands(dy, dy_s, w, w_s, out_dtype, block)
    check_tensor("offsets", offsets, dtypes=INT_DTYPES, shape=(w.shape[0],))
    check_same_device(dy=dy, dy_s=dy_s, w=w, w_s=w_s, offsets=offsets)
    check_bool("validate", validate)
    return TensorSpec((M, K), out_dtype)


def _check_wgrad_operands(dy_t: object, dy_t_s: object, x_t: object, x_t_s: object, out_dtype: object,
                          block: object) -> tuple[int, int, int]:
    """dy_t (N, M) and x_t (K, M) e4m3 with (N, ⌈M⌉) and (K, ⌈M⌉) scales; returns (N, M, K)."""
    check_tensor("dy_t", dy_t, ndim=2, dtypes=(FP8_DTYPE,))
    check_tensor("x_t", x_t, ndim=2, dtypes=(FP8_DTYPE,))
    check_positive_int("block", block)
    check_dtype_arg("out_dtype", out_dtype, OUT_DTYPES)
    N, M = dy_t.shape
    K = x_t.shape[0]
    if x_t.shape[1] != M:
        raise ValueError(f"x_t: expected M={M} columns (tokens) to match dy_t {tuple(dy_t.shape)}, "
                         f"got shape {tuple(x_t.shape)}")
    check_tensor("dy_t_s", dy_t_s, dtypes=(torch.float32,), shape=(N, _kb(M, block)))
    check_tensor("x_t_s", x_t_s, dtypes=(torch.float32,), shape=(K, _kb(M, block)))
    return N, M, K


def check_fp8_wgrad(dy_t: object, dy_t_s: object, x_t: object, x_t_s: object, out_dtype: object = torch.float32,
                    block: object = 128) -> TensorSpec:
    """The contract of ``fp8_wgrad``: dy_t (N, M), x_t (K, M) e4m3 with (N, ⌈M⌉) and (K, ⌈M⌉)
    float32 scales (``quant_act_t`` of dy and x) -> dw (N, K) in out_dtype."""
    N, _, K = _check_wgrad_operands(dy_t, dy_t_s, x_t, x_t_s, out_dtype, block)
    check_same_device(dy_t=dy_t, dy_t_s=dy_t_s, x_t=x_t, x_t_s=x_t_s)
    return TensorSpec((N, K), out_dtype)


def check_fp8_grouped_wgrad(dy_t: object, dy_t_s: object, x_t: object, x_t_s: object, offsets: object,
                            out_dtype: object = torch.float32, block: object = 128, *,
                            validate: object = False) -> TensorSpec:
    """The contract of ``fp8_grouped_wgrad``: ``fp8_wgrad``'s operands and offsets (E,) int32/int64
    (cumulative token ends) -> dw (E, N, K) in out_dtype."""
    N, _, K = _check_wgrad_operands(dy_t, dy_t_s, x_t, x_t_s, out_dtype, block)
    check_tensor("offsets", offsets, ndim=1, dtypes=INT_DTYPES)
    check_same_device(dy_t=dy_t, dy_t_s=dy_t_s, x_t=x_t, x_t_s=x_t_s, offsets=offsets)
    check_bool("validate", validate)
    return TensorSpec((offsets.shape[0], N, K), out_dtype)


# ---------------------------------------------------------------------------- quantization
def quant_act_t(x: torch.Tensor, block: int = 128, scale_fmt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """B×1 quantization along the rows (tokens), written transposed: ``quant_act(xᵀ)``.

    Args:
        x: (M, K) float (the activation or output gradient of M tokens).
    Returns:
        ``(q_t (K, M) e4m3, s_t (K, ⌈M/B⌉) float32)``, contiguous: ``x[m, k] ≈ q_t[k, m] · s_t[k, m // B]``.
    """
    check_quant_act_t(x, block, scale_fmt)
    q, s = quant_act(x.t(), block, scale_fmt)
    return q.contiguous(), s.contiguous()


def quant_act_dual(
    x: torch.Tensor, block: int = 128, scale_fmt: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both FP8 quantizations of one activation: ``(*quant_act(x), *quant_act_t(x))``.

    Args:
        x: (M, K) float.
    Returns:
        ``(q (M, K) e4m3, s (M, ⌈K/B⌉), q_t (K, M) e4m3, s_t (K, ⌈M/B⌉))``: the 1×B operand of
        fprop/dgrad and the B×1 operand of wgrad.
    """
    check_quant_act_dual(x, block, scale_fmt)
    return (*quant_act(x, block, scale_fmt), *quant_act_t(x, block, scale_fmt))


# ---------------------------------------------------------------------------- GEMMs
def fp8_dgrad(
    dy: torch.Tensor,
    dy_s: torch.Tensor,
    w: torch.Tensor,
    w_s: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    block: int = 128,
) -> torch.Tensor:
    """The input gradient ``dx = dy · W`` in FP8, W's 128×128 blocks used transposed.

    Args:
        dy: (M, N) e4m3, dy_s: (M, ⌈N/B⌉) float32 (``quant_act`` of the output gradient).
        w: (N, K) e4m3, w_s: (⌈N/B⌉, ⌈K/B⌉) float32: the forward's weight and scales, as they are.
    Returns:
        (M, K) in out_dtype: per B-block nb of N, ``promote(dy[:, nb] · w[nb, :]) · dy_s[:, nb] ·
        w_s[nb, k // B]`` summed in float32, i.e. ``fp8_gemm(dy, dy_s, wᵀ, w_sᵀ)``.
    """
    check_fp8_dgrad(dy, dy_s, w, w_s, out_dtype, block)
    return fp8_gemm(dy, dy_s, w.t(), w_s.t(), out_dtype, block)


def fp8_grouped_dgrad(
    dy: torch.Tensor,
    dy_s: torch.Tensor,
    w: torch.Tensor,
    w_s: torch.Tensor,
    offsets: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    block: int = 128,
    *,
    validate: bool = False,
) -> torch.Tensor:
    """The grouped input gradient: rows ``offsets[e-1]:offsets[e]`` compute ``dy · w[e]`` (``fp8_dgrad``).

    Args:
        dy: (M, N) e4m3 rows grouped by expert, dy_s: (M, ⌈N/B⌉) float32.
        w: (E, N, K) e4m3, w_s: (E, ⌈N/B⌉, ⌈K/B⌉) float32: the forward's expert weights.
        offsets: (E,) int32/int64 cumulative row ends (malformed: ``grouped_gemm``'s clamping rule).
        validate: raise ValueError on malformed offsets instead.
    Returns:
        (M, K) in out_dtype; rows at or past offsets[E-1] are zero.
    """
    check_fp8_grouped_dgrad(dy, dy_s, w, w_s, offsets, out_dtype, block, validate=validate)
    return fp8_grouped_gemm(dy, dy_s, w.transpose(1, 2), w_s.transpose(1, 2), offsets, out_dtype, block,
                            validate=validate)


def _wgrad_rows(dy_t: torch.Tensor, dy_t_s: torch.Tensor, x_t: torch.Tensor, x_t_s: torch.Tensor, start: int,
                end: int, block: int) -> torch.Tensor:
    """float32 Σ over the B-blocks mb that meet tokens [start, end) of
    ``promote(dy_t[:, mb ∩ [start, end)] · x_t[:, ...]ᵀ) · dy_t_s[:, mb] · x_t_s[:, mb]ᵀ``."""
    acc = torch.zeros(dy_t.shape[0], x_t.shape[0], dtype=torch.float32, device=dy_t.device)
    for mb in range(start // block, -(-end // block)):
        m0, m1 = max(start, mb * block), min(end, (mb + 1) * block)
        partial = dy_t[:, m0:m1].float() @ x_t[:, m0:m1].float().T  # exact float32 products of one block
        acc += partial * dy_t_s[:, mb, None] * x_t_s[None, :, mb]
    return acc


def fp8_wgrad(
    dy_t: torch.Tensor,
    dy_t_s: torch.Tensor,
    x_t: torch.Tensor,
    x_t_s: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
    block: int = 128,
) -> torch.Tensor:
    """The weight gradient ``dW = dyᵀ · x`` in FP8 from both operands' B×1 (token) quantizations.

    Args:
        dy_t: (N, M) e4m3, dy_t_s: (N, ⌈M/B⌉) float32: ``quant_act_t`` of the output gradient (M, N).
        x_t: (K, M) e4m3, x_t_s: (K, ⌈M/B⌉) float32: ``quant_act_t`` of the input (M, K).
        out_dtype: float32 (default), bfloat16 or float16 (the master weight's dtype).
    Returns:
        (N, K): per B-block mb of tokens, ``promote(dy_t[:, mb] · x_t[:, mb]ᵀ) · dy_t_s[:, mb] ·
        x_t_s[:, mb]ᵀ`` summed in float32.

    Example::

        dy_t, dy_t_s = quant_act_t(dy)          # dy (M, N)
        x_t, x_t_s = quant_act_t(x)             # x (M, K)
        dw = fp8_wgrad(dy_t, dy_t_s, x_t, x_t_s)  # (N, K) float32
    """
    check_fp8_wgrad(dy_t, dy_t_s, x_t, x_t_s, out_dtype, block)
    return _wgrad_rows(dy_t, dy_t_s, x_t, x_t_s, 0, dy_t.shape[1], block).to(out_dtype)


def fp8_grouped_wgrad(
    dy_t: torch.Tensor,
    dy_t_s: torch.Tensor,
    x_t: torch.Tensor,
    x_t_s: torch.Tensor,
    offsets: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
    block: int = 128,
    *,
    validate: bool = False,
) -> torch.Tensor:
    """The k-grouped weight gradient: ``dW[e] = dy[tokens of e]ᵀ · x[tokens of e]`` in FP8.

    Args:
        dy_t: (N, M), x_t: (K, M) e4m3 with (N, ⌈M/B⌉), (K, ⌈M/B⌉) float32 scales: ``quant_act_t``
            of the expert rows' output gradient and input (M rows grouped by expert).
        offsets: (E,) int32/int64 cumulative token ends (malformed: ``grouped_gemm``'s clamping
            rule; tokens past offsets[E-1] belong to no expert).
        validate: raise ValueError on malformed offsets instead.
    Returns:
        (E, N, K) in out_dtype; experts without tokens get zeros. A scale block shared by two
        experts counts for each only its own tokens (module docstring).
    """
    E, N, K = check_fp8_grouped_wgrad(dy_t, dy_t_s, x_t, x_t_s, offsets, out_dtype, block, validate=validate).shape
    M = dy_t.shape[1]
    if validate:
        check_offsets(offsets, M)
    check_has_values("offsets", offsets, "moela.reference.fp8_grouped_wgrad")
    dw = torch.zeros(E, N, K, dtype=out_dtype, device=dy_t.device)
    start = 0
    for e, end in enumerate(group_ends(offsets, M)):
        if end > start:
            dw[e] = _wgrad_rows(dy_t, dy_t_s, x_t, x_t_s, start, end, block).to(out_dtype)
        start = end
    return dw
