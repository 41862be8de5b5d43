"""DeepSeek routing in one Triton kernel: scores, bias, group-limited selection, top-k, weights.

Legend: T tokens, E routed experts, G expert groups (``n_groups``) of EG = E/G experts,
``topk_groups`` kept groups, k experts per token (``topk``).

``route(logits, bias, ...)`` is ``moela.reference.route`` in one launch (grid over blocks of
``BLOCK_T`` tokens, each program holding its tokens' E scores in registers as a
``(BLOCK_T, G, EG)`` tile):

1. ``scores = softmax(logits)`` or ``sigmoid(logits)`` in float32 (float64 for float64 logits);
2. ``select = scores + bias`` (selection only);
3. with G > 1: group score = max of the group (no bias) or the sum of its top-2 (bias); a
   group is kept when fewer than ``topk_groups`` groups beat it (higher score, or equal score
   and lower index); the experts of the other groups select as -inf;
4. k rounds of arg-max, each taking the lowest expert index among equal values (a stable
   descending sort's order), recording the *unbiased* score;
5. sigmoid weights divided by their sum (summed in slot order), times ``route_scale``.

``gate(x, weight, bias, args)`` computes the logits as the reference does (``F.linear`` of the
inputs upcast to float32: cuBLAS on a GPU) and calls ``route``.

Same ids as the reference, bit for bit. Ties in the selection values go to the lower index
exactly as in the reference; beyond that, ids can only differ where two scores lie within
rounding of each other, so the scores are computed the way torch computes them on CUDA:
``exp`` is libdevice's (what ``std::exp`` calls in torch's kernels; launched without
Triton's flush-to-zero libdevice variant, as torch is built), divisions are IEEE
(``div_rn``; Triton's ``/`` is approximate on a GPU), the sigmoid is ``1 / (1 + exp(-x))``
(torch's CUDA formula) and the softmax denominator is summed in the order of torch's CUDA
warp softmax (``softmax_warp_forward``, E <= 1024: lane l sums elements ``l, l + W, ...``
in order, then a butterfly over the W lanes). Under the interpreter ``exp`` is taken in
float64 and rounded (numpy's float32 exp is off by an ulp for ~40% of inputs; torch's CPU
kernels use their own vectorised exp and softmax order, so on a CPU the scores can still differ
from the reference's in the last bit: equal only where no two scores are that close). The
weights agree with the reference's within float32 rounding (the sigmoid sum's order differs).

The kernel is latency-bound: T·E float32 logits are read once (twice for the softmax
denominator, from L1/L2) and k rounds of two row reductions run on registers. BLOCK_T and the
warps are autotuned per (E, k, groups, token class): decode (T <= 256) wants many small
programs, prefill fewer, fatter ones. The kernel takes at most ``MAX_EXPERTS`` experts.
"""

from __future__ import annotations

import functools
import struct

import torch
import triton
import triton.language as tl
from torch import Tensor

from moela import knobs
from moela.reference._checks import accumulate_dtype
from moela.reference.config import ModelArgs
from moela.reference.moe import check_route, gate_with

from ._common import autotune, cdiv, next_power_of_2
from .factory import kernel_op
from .tl_helpers import div, exp

__all__ = ["route", "gate", "MAX_EXPERTS"]

#: libdevice's exp on a GPU; under the interpreter (decided when the kernels were decorated, at
#: import, as Triton decides it) exp in float64 rounded (numpy's float32 exp is off by an ulp).
_PRECISE = not knobs.interpret()

#: Largest E the kernel takes (torch's warp softmax, whose order the kernel follows, stops here).
MAX_EXPERTS = 1024


# ----------------------------------------------------------------------------------------
# Configs: keyed on E, k and the groups, plus a coarse token class.
# ----------------------------------------------------------------------------------------


def _route_configs() -> list[triton.Config]:
    """Checked against sm_90 ptxas for E = 256 (V3): none of these spills (BLOCK_T = 8 with 8
    warps: 105 registers; 1 token per warp: 72, all reductions in-warp)."""
    return [
        triton.Config({"BLOCK_T": 8}, num_warps=8),
        triton.Config({"BLOCK_T": 1}, num_warps=1),
        triton.Config({"BLOCK_T": 2}, num_warps=1),
        triton.Config({"BLOCK_T": 4}, num_warps=4),
        triton.Config({"BLOCK_T": 32}, num_warps=16),
        triton.Config({"BLOCK_T": 16}, num_warps=8),
    ]


def _token_class(T: int) -> int:
    """0: decode-like (T <= 256), 1: mid, 2: prefill-like (T > 4096): one autotune entry each."""
    return 0 if T <= 256 else 1 if T <= 4096 else 2


# ----------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["route_scale_bits"])
def _route_fwd_kernel(
    logits_ptr, bias_ptr, weights_ptr, ids_ptr,
    T, E, N_GROUPS, EG, TOPK_GROUPS, stride_t, route_scale_bits, T_CLASS,
    TOPK: tl.constexpr, K_P: tl.constexpr, GP: tl.constexpr, EGP: tl.constexpr,
    WS: tl.constexpr, ITERS: tl.constexpr, LOG_WS: tl.constexpr,
    SOFTMAX: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GROUPS: tl.constexpr, IS_F64: tl.constexpr,
    PRECISE: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Route BLOCK_T tokens. grid: (cdiv(T, BLOCK_T),).

    Scores live in a (BLOCK_T, GP, EGP) tile (expert ``g·EG + i`` at [g, i]); the softmax
    denominator is summed separately in torch's warp order over WS lanes × ITERS elements.
    """
    acc_ty: tl.constexpr = tl.float64 if IS_F64 else tl.float32
    NEG_INF: tl.constexpr = float("-inf")
    pid = tl.program_id(0)
    t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < T
    row = logits_ptr + t.to(tl.int64) * stride_t  # (BLOCK_T,)

    g = tl.arange(0, GP)[None, :, None]
    i = tl.arange(0, EGP)[None, None, :]
    expert = g * EG + i  # (1, GP, EGP)
    emask = (g < N_GROUPS) & (i < EG)
    x = tl.load(row[:, None, None] + expert, mask=tmask[:, None, None] & emask, other=NEG_INF).to(acc_ty)

    if SOFTMAX:
        m = tl.max(tl.max(x, 2), 1)
        m = tl.where(tmask, m, 0)
        lane = tl.arange(0, WS)
        part = tl.zeros([BLOCK_T, WS], acc_ty)
        for it in tl.static_range(ITERS):  # lane l: elements l, l + WS, ... in order
            col = it * WS + lane
            xi = tl.load(row[:, None] + col[None, :], mask=tmask[:, None] & (col < E)[None, :], other=NEG_INF)
            part = part + exp(xi.to(acc_ty) - m[:, None], PRECISE)
        for step in tl.static_range(LOG_WS):  # butterfly: lanes l and l + half
            part = tl.sum(tl.reshape(part, (BLOCK_T, 2, WS >> (step + 1))), axis=1)
        denom = tl.where(tmask, tl.reshape(part, (BLOCK_T,)), 1)
        score = div(exp(x - m[:, None, None], PRECISE), denom[:, None, None], IS_F64)
    else:
        score = div(tl.full(x.shape, 1, acc_ty), 1 + exp(-x, PRECISE), IS_F64)

    sel = score
    if HAS_BIAS:
        sel = sel + tl.load(bias_ptr + expert, mask=emask, other=0).to(acc_ty)
    sel = tl.where(sel != sel, float("inf"), sel)  # NaN sorts first in torch's descending sort

    if HAS_GROUPS:
        gsel = tl.where(emask, sel, NEG_INF)
        top1 = tl.max(gsel, 2)  # (BLOCK_T, GP)
        if HAS_BIAS:  # sum of the top-2 (a tie at the top counts twice, as in a sort)
            first = tl.min(tl.where(gsel == top1[:, :, None], i, EGP), 2)
            top2 = tl.max(tl.where(i == first[:, :, None], NEG_INF, gsel), 2)
            gscore = top1 + top2
        else:
            gscore = top1
        gi = tl.arange(0, GP)
        gvalid = gi < N_GROUPS
        gscore = tl.where(gvalid[None, :], gscore, NEG_INF)
        a = gscore[:, :, None]  # the group ranked
        b = gscore[:, None, :]  # the groups that may beat it
        beats = (b > a) | ((b == a) & (gi[None, None, :] < gi[None, :, None]))
        rank = tl.sum((beats & gvalid[None, None, :]).to(tl.int32), 2)
        keep = (rank < TOPK_GROUPS) & gvalid[None, :]
        sel = tl.where(keep[:, :, None], sel, NEG_INF)

    EPAD: tl.constexpr = GP * EGP
    sel2 = tl.reshape(sel, (BLOCK_T, EPAD))
    score2 = tl.reshape(score, (BLOCK_T, EPAD))
    expert2 = tl.reshape(tl.broadcast_to(expert, (BLOCK_T, GP, EGP)), (BLOCK_T, EPAD))
    avail = tl.reshape(tl.broadcast_to(emask, (BLOCK_T, GP, EGP)), (BLOCK_T, EPAD))

    kk = tl.arange(0, K_P)[None, :]
    out_w = tl.zeros([BLOCK_T, K_P], acc_ty)
    out_i = tl.zeros([BLOCK_T, K_P], tl.int32)
    wsum = tl.zeros([BLOCK_T], acc_ty)
    for r in tl.static_range(TOPK):  # arg-max, lowest index among equals
        best = tl.max(tl.where(avail, sel2, NEG_INF), 1)
        idx = tl.min(tl.where(avail & (sel2 == best[:, None]), expert2, 2**30), 1)
        hit = expert2 == idx[:, None]
        w = tl.sum(tl.where(hit, score2, 0), 1)
        avail = avail & ~hit
        out_w = tl.where(kk == r, w[:, None], out_w)
        out_i = tl.where(kk == r, idx[:, None], out_i)
        wsum = wsum + w
    if not SOFTMAX:
        out_w = div(out_w, tl.where(tmask, wsum, 1)[:, None], IS_F64)
    rs = route_scale_bits.to(tl.int64).to(tl.float64, bitcast=True).to(acc_ty)  # the double's bits (i32 if small)
    out_w = out_w * rs

    o = t.to(tl.int64)[:, None] * TOPK + kk
    m2 = tmask[:, None] & (kk < TOPK)
    tl.store(weights_ptr + o, out_w, mask=m2)
    tl.store(ids_ptr + o, out_i, mask=m2)


_route_tuned = autotune("route", _route_configs(), key=["E", "TOPK", "N_GROUPS", "TOPK_GROUPS", "T_CLASS"])(
    _route_fwd_kernel)


# ----------------------------------------------------------------------------------------
# The ops
# ----------------------------------------------------------------------------------------


def _double_bits(v: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(v)))[0]


def _domain(logits, bias, *, topk, n_groups=1, topk_groups=1, score_func="softmax", route_scale=1.0) -> None:
    if logits.shape[1] > MAX_EXPERTS:
        raise ValueError(f"logits: the Triton route kernel takes at most {MAX_EXPERTS} experts (torch's warp "
                         f"softmax order), got shape {tuple(logits.shape)} (moela.reference.route takes any)")


def _route_setup(ctx, inputs, output) -> None:
    logits, _, _, _, _, score_func, route_scale = inputs
    ctx.score_func, ctx.route_scale = score_func, route_scale
    ctx.save_for_backward(logits, output[1])


def _route_backward(ctx, d_weights: torch.Tensor, _d_ids):
    """Gradient of the weights with respect to the logits (the selection is piecewise constant).

    softmax: ``w_j = c·s[id_j]``; sigmoid: ``w_j = c·s[id_j] / Σ_i s[id_i]``; ``c = route_scale``.
    """
    logits, ids = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return (None,) * 7
    acc = accumulate_dtype(logits.dtype)
    lg = logits.to(acc)
    idx = ids.long()
    g = d_weights.to(acc) * ctx.route_scale  # d/d(unscaled weights)
    if ctx.score_func == "softmax":
        s = lg.softmax(-1)
        ds = torch.zeros_like(s).scatter_add_(1, idx, g)
        dl = s * (ds - (ds * s).sum(-1, keepdim=True))
    else:
        s = lg.sigmoid()
        chosen = s.gather(1, idx)
        total = chosen.sum(-1, keepdim=True)
        g = g / total - (g * chosen).sum(-1, keepdim=True) / total**2  # through the normalisation
        dl = torch.zeros_like(s).scatter_add_(1, idx, g) * s * (1 - s)
    return dl.to(logits.dtype), None, None, None, None, None, None


@kernel_op("route", contract=check_route, domain=_domain, backward=_route_backward, setup_context=_route_setup)
def route(out, logits: Tensor, bias: Tensor | None, *, topk: int, n_groups: int = 1, topk_groups: int = 1,
          score_func: str = "softmax", route_scale: float = 1.0, config=None) -> tuple[Tensor, Tensor]:
    """DeepSeek routing from router logits in one Triton kernel (``moela.reference.route``'s contract).

    Args:
        logits: (T, E) router logits ``x·Wᵀ``, any float dtype, E <= ``MAX_EXPERTS``, on CUDA
            (or CPU under the interpreter).
        bias: (E,) selection bias (aux-loss-free balancing) or None.
        topk: k experts per token; n_groups / topk_groups: group-limited selection;
        score_func: "softmax" or "sigmoid"; route_scale: factor on the weights.
    Returns:
        topk_weights: (T, k) float32 (float64 for float64 logits), the unbiased scores of the
            chosen experts (normalised to sum 1 for sigmoid) times route_scale; differentiable
            with respect to the logits.
        topk_ids: (T, k) int32, by descending selection value, ties to the lower index.

    Example::

        w, ids = route(logits, bias, topk=8, n_groups=8, topk_groups=4, score_func="sigmoid", route_scale=2.5)
    """
    weights, ids = out
    if not weights.is_contiguous() or not ids.is_contiguous():
        raise ValueError("out: expected contiguous (weights, ids) buffers")
    T, E = logits.shape
    if T == 0:
        return
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    bias = None if bias is None else bias.contiguous()
    kernel = _route_tuned if config is None else _route_fwd_kernel
    kernel[lambda meta: (cdiv(T, meta["BLOCK_T"]),)](
        logits, logits if bias is None else bias, weights, ids,
        T, E, n_groups, E // n_groups, topk_groups, logits.stride(0), _double_bits(route_scale), _token_class(T),
        **_route_consts(E, topk, n_groups, score_func == "softmax", bias is not None, weights.dtype == torch.float64),
        **({} if config is None else config.all_kwargs()),
    )


@functools.cache
def _route_consts(E: int, topk: int, n_groups: int, softmax: bool, has_bias: bool, is_f64: bool) -> dict:
    """The route kernel's constexprs and compile options (the same dict every call of a shape)."""
    E_P = next_power_of_2(E)
    WS = min(E_P, 32)  # torch's warp softmax: lanes per row, elements per lane
    return dict(
        TOPK=topk, K_P=next_power_of_2(topk), GP=next_power_of_2(n_groups), EGP=next_power_of_2(E // n_groups),
        WS=WS, ITERS=E_P // WS, LOG_WS=WS.bit_length() - 1, SOFTMAX=softmax, HAS_BIAS=has_bias,
        HAS_GROUPS=n_groups > 1, IS_F64=is_f64, PRECISE=_PRECISE, enable_fp_fusion=False, enable_reflect_ftz=False,
    )


def gate(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, args: ModelArgs
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek gate: ``route(x·Wᵀ)`` with the config's routing fields (``moela.reference.gate``'s contract).

    The logits are ``F.linear`` of x and weight upcast to float32 (float64 for float64 input),
    exactly as the reference computes them (cuBLAS on a GPU), so the ids match the reference's.

    Args:
        x: (T, D); weight: (E, D) with E = ``args.n_routed_experts``; bias: (E,) or None.
    Returns:
        (topk_weights (T, k), topk_ids (T, k) int32), k = ``args.n_activated_experts``.
    """
    return gate_with(route, x, weight, bias, args)
