"""DeepSeek-V3's FP8 training recipe as autograd functions: a linear layer and the routed experts.

Legend: M rows (tokens, or expert rows grouped by expert), K input features, N output features,
D model dim, I expert hidden dim, E experts, B = 128 the FP8 block.

Every GEMM of forward and backward runs in e4m3 with float32 promotion every B of its reduction
(``moela.reference.fp8_train``): fprop ``fp8_gemm`` / ``fp8_grouped_gemm`` (1×B activations,
B×B weights), dgrad ``fp8_dgrad`` / ``fp8_grouped_dgrad`` (1×B output gradients, the same B×B
weight blocks used transposed) and wgrad ``fp8_wgrad`` / ``fp8_grouped_wgrad`` (B×1 token blocks
of both operands). The functions take the op namespace (``moela.kernels`` or ``moela.reference``,
``model.backend.ops_for``): both backends run the same steps on the same quantized operands.

Master weights stay in their floating dtype (bf16 or float32) and receive the gradients, in that
dtype. Their e4m3 copies come from :class:`FP8WeightCache`: quantized once per optimizer step
(the cache is keyed on the parameters' version counters, which every in-place update bumps) and
shared by every forward and backward until the weights change; the dgrad reads a second copy
of the same e4m3 values with the reduction contiguous (DeepSeek-V3 keeps its FP8 weights in both
layouts).

Activation memory: a linear saves the B×1 quantization of its input (``quant_act_dual`` gives it
with the 1×B one from one read: e4m3 plus a float32 scale per B values, ~0.52 of the bf16 input)
instead of the input; the experts save the B×1 quantization of their input rows and the first
GEMM's output h (the SwiGLU input), and recompute the SwiGLU output in backward instead of
saving it (DeepSeek-V3 report §3.3.3). Neither saves more than the bf16 path.
"""

from __future__ import annotations

import torch

from moela.reference._checks import check_tensor

__all__ = ["FP8WeightCache", "fp8_linear_train", "fp8_experts_train", "MASTER_DTYPES"]

#: Master weight dtypes (the wgrad GEMMs write their gradients in these).
MASTER_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class FP8WeightCache:
    """e4m3 copies (B×B block scales) of master weights, re-quantized when a weight changes.

    ``get(ops, w1, w2, ...)`` returns ``((q1, s1, q1_t), (q2, s2, q2_t), ...)``: the quantized
    weight (…, N, K), its scales, and the same e4m3 values stored with N contiguous (``q_t``, the
    (…, N, K) view of a transposed copy: what the dgrad GEMMs read, the reduction contiguous for
    the tensor cores). The copies are remade when any weight's storage, shape or version counter
    differs from the cached one (an optimizer step, ``load_state_dict``, ``.to()``), else reused:
    one quantization per step for every micro-batch's forward and backward. Not part of the
    module's state (two bytes per weight while cached).
    """

    def __init__(self, block: int = 128, scale_fmt: str | None = None):
        self.block, self.scale_fmt = block, scale_fmt
        self._key: tuple | None = None
        self._copies: tuple = ()

    @staticmethod
    def _key_of(ops, weights) -> tuple:
        return (ops.__name__, *((w.data_ptr(), w.shape, w.dtype, w.device, w._version) for w in weights))

    def get(self, ops, *weights: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        key = self._key_of(ops, weights)
        if key != self._key:
            self._copies = ()  # release the old copies before making new ones
            with torch.no_grad():
                self._copies = tuple(self._quantize(ops, w.detach()) for w in weights)
            self._key = key
        return self._copies

    def _quantize(self, ops, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, s = ops.quant_weight(w, self.block, self.scale_fmt)
        return q, s, q.transpose(-1, -2).contiguous().transpose(-1, -2)

    def clear(self) -> None:
        self._key, self._copies = None, ()


def _check_master(name: str, w: torch.Tensor) -> None:
    check_tensor(name, w, dtypes=MASTER_DTYPES)


class _FP8LinearTrain(torch.autograd.Function):
    """y = x · Wᵀ (+ b): fprop, dgrad and wgrad in FP8 (module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, w_q, w_s, w_qt, bias, ops, block, scale_fmt):
        N, K = weight.shape
        x2 = x.reshape(-1, K)
        q, s, q_t, s_t = ops.quant_act_dual(x2, block, scale_fmt)  # fprop and wgrad operands, one read
        y = ops.fp8_gemm(q, s, w_q, w_s, torch.float32, block)
        if bias is not None:
            y = y + bias.float()
        ctx.save_for_backward(q_t, s_t, w_qt, w_s)
        ctx.meta = (ops, block, scale_fmt, x.shape, x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return y.to(x.dtype).reshape(*x.shape[:-1], N)

    @staticmethod
    def backward(ctx, dy):
        q_t, s_t, w_qt, w_s = ctx.saved_tensors
        ops, block, scale_fmt, x_shape, x_dtype, w_dtype, b_dtype = ctx.meta
        N = w_qt.shape[0]
        dy2 = dy.reshape(-1, N)
        dx = dw = db = None
        d_q, d_s, d_qt, d_st = ops.quant_act_dual(dy2, block, scale_fmt)
        if ctx.needs_input_grad[0]:
            dx = ops.fp8_dgrad(d_q, d_s, w_qt, w_s, x_dtype, block).reshape(x_shape)
        if ctx.needs_input_grad[1]:
            dw = ops.fp8_wgrad(d_qt, d_st, q_t, s_t, w_dtype, block)
        if ctx.needs_input_grad[5]:
            db = dy2.float().sum(0).to(b_dtype)
        return dx, dw, None, None, None, db, None, None, None


def fp8_linear_train(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cache: FP8WeightCache,
                     ops) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` trained in FP8: gradients flow to x, the master ``weight`` and ``bias``.

    Args:
        x: (..., K) bf16/fp16/fp32. weight: (N, K) master weight (bf16/fp16/fp32); bias: (N,) or None.
        cache: the layer's :class:`FP8WeightCache` (its block and scale format are used throughout).
        ops: ``moela.kernels`` or ``moela.reference``.
    Returns:
        (..., N) in x's dtype: the FP8 GEMM in float32, + bias, one cast (as ``fp8_linear``).
    """
    _check_master("weight", weight)
    ((w_q, w_s, w_qt),) = cache.get(ops, weight)
    return _FP8LinearTrain.apply(x, weight, w_q, w_s, w_qt, bias, ops, cache.block, cache.scale_fmt)


class _FP8ExpertsTrain(torch.autograd.Function):
    """ys = w2(swiglu(w13 · xs)) per expert on rows grouped by expert, every GEMM in FP8."""

    @staticmethod
    def forward(ctx, xs, w13, w2, w13_q, w13_s, w13_qt, w2_q, w2_s, w2_qt, offsets, ops, block, scale_fmt):
        I = w2.shape[2]
        q, s, q_t, s_t = ops.quant_act_dual(xs, block, scale_fmt)
        h = ops.fp8_grouped_gemm(q, s, w13_q, w13_s, offsets, xs.dtype, block)  # (M, 2I): gate | up
        a_q, a_s = ops.swiglu(h[:, :I], h[:, I:], fp8=True, block=block, scale_fmt=scale_fmt)  # one pass
        ys = ops.fp8_grouped_gemm(a_q, a_s, w2_q, w2_s, offsets, xs.dtype, block)
        ctx.save_for_backward(q_t, s_t, h, w13_qt, w13_s, w2_qt, w2_s, offsets)
        ctx.meta = (ops, block, scale_fmt, xs.dtype, w13.dtype, w2.dtype)
        return ys

    @staticmethod
    def backward(ctx, dys):
        q_t, s_t, h, w13_qt, w13_s, w2_qt, w2_s, offsets = ctx.saved_tensors
        ops, block, scale_fmt, x_dtype, w13_dtype, w2_dtype = ctx.meta
        I = w2_qt.shape[2]
        # down projection: d_act = dys · w2[e] (dgrad), dw2[e] = dys[e]ᵀ · act[e] (wgrad)
        d_q, d_s, d_qt, d_st = ops.quant_act_dual(dys, block, scale_fmt)
        d_act = ops.fp8_grouped_dgrad(d_q, d_s, w2_qt, w2_s, offsets, x_dtype, block)
        with torch.enable_grad():  # the SwiGLU output recomputed from h (not saved), and its backward
            h_ = h.detach().requires_grad_()
            act = ops.swiglu(h_[:, :I], h_[:, I:])
            (dh,) = torch.autograd.grad(act, h_, d_act)
        act = act.detach()
        dw2 = ops.fp8_grouped_wgrad(d_qt, d_st, *ops.quant_act_t(act, block, scale_fmt), offsets, w2_dtype, block)
        # gate/up projection: dxs = dh · w13[e], dw13[e] = dh[e]ᵀ · xs[e]
        dh_q, dh_s, dh_qt, dh_st = ops.quant_act_dual(dh, block, scale_fmt)
        dxs = ops.fp8_grouped_dgrad(dh_q, dh_s, w13_qt, w13_s, offsets, x_dtype, block) \
            if ctx.needs_input_grad[0] else None
        dw13 = ops.fp8_grouped_wgrad(dh_qt, dh_st, q_t, s_t, offsets, w13_dtype, block)
        return dxs, dw13, dw2, None, None, None, None, None, None, None, None, None, None


def fp8_experts_train(xs: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, offsets: torch.Tensor,
                      cache: FP8WeightCache, ops) -> torch.Tensor:
    """The routed experts ``w2(silu(w1 x) · w3 x)`` on rows grouped by expert, trained in FP8.

    Args:
        xs: (M, D) bf16/fp16/fp32 rows grouped by expert (``permute``). w13: (E, 2I, D) master
            weights (w1 over w3), w2: (E, D, I). offsets: (E,) cumulative row ends.
        cache: the layer's :class:`FP8WeightCache`; ops: ``moela.kernels`` or ``moela.reference``.
    Returns:
        (M, D) in xs's dtype; rows past offsets[E-1] are zero. Gradients flow to xs, w13 and w2.
    """
    _check_master("w13", w13)
    _check_master("w2", w2)
    (w13_q, w13_s, w13_qt), (w2_q, w2_s, w2_qt) = cache.get(ops, w13, w2)
    return _FP8ExpertsTrain.apply(xs, w13, w2, w13_q, w13_s, w13_qt, w2_q, w2_s, w2_qt, offsets, ops, cache.block,
                                  cache.scale_fmt)
