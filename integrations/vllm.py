"""``fused_experts`` with the conventions of vLLM's Triton MoE, over moela's ops (vLLM not needed).

Legend: T tokens, K hidden size, N expert intermediate size, E local experts, k experts per
token, G experts in the global (all-ranks) numbering.

Code written against ``vllm.model_executor.layers.fused_moe.fused_experts`` switches with one
import::

    from moela.integrations.vllm import fused_experts
    y = fused_experts(x, w1, w2, topk_weights, topk_ids)                        # bf16
    y = fused_experts(x, w1_q, w2_q, topk_weights, topk_ids, use_fp8_w8a8=True,
                      w1_scale=s1, w2_scale=s2, block_shape=[128, 128])          # block FP8
    y = fused_experts(x, w1, w2, topk_weights, topk_ids, expert_map=emap,
                      global_num_experts=G)                                     # expert parallel

vLLM's layouts: ``w1`` (E, 2N, K) is each expert's gate projection (rows ``[0, N)``, SiLU'd)
over its up projection, ``w2`` (E, K, N) the down projection; block FP8 weights are e4m3 with
float32 scales ``w1_scale`` (E, ⌈2N/128⌉, ⌈K/128⌉), ``w2_scale`` (E, ⌈K/128⌉, ⌈N/128⌉), and
the activations are quantized on the fly per token and 128 columns (moela floors a block's
amax at 1e-4 where vLLM adds 1e-10: they differ only for blocks of near-zero activations).
``expert_map`` (G,) sends a global expert id to this rank's local id, or to -1 for experts on
other ranks; moela's ``make_routing`` skips those slots, so they add nothing (as in vLLM).
Out-of-range ids are skipped the same way, never read out of bounds. The routed weights
multiply each expert's output (``apply_router_weight_on_input=True``: its input, top-1 only,
as vLLM) and the k products are added in float32.

Rejected with an error naming the argument: activations other than "silu", int8/int4
weights, per-channel or per-tensor FP8, static activation scales, zero points, and vLLM's
newer ``quant_config`` object (pass its scales and block shape as the keywords here).
``backend`` is moela's: "auto" (Triton kernels on CUDA, references elsewhere), "triton",
"reference".
"""

from __future__ import annotations

from typing import NoReturn

import torch

from moela.model.backend import BACKENDS, ops_for
from moela.model.moe import routed_experts
from moela.reference._checks import INT_DTYPES, check_tensor
from moela.reference.fp8 import FP8_DTYPE

__all__ = ["fused_experts"]

_ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _reject(name: str, value: object, why: str) -> NoReturn:
    raise ValueError(f"{name}: {why}, got {value!r}")


def _check_fp8(w1, w2, w1_scale, w2_scale, block_shape, per_channel_quant, a1_scale, a2_scale) -> None:
    if per_channel_quant:
        _reject("per_channel_quant", per_channel_quant, "moela's FP8 experts are block-quantized (block_shape "
                "[128, 128]), not per channel")
    if block_shape is None or list(block_shape) != [128, 128]:
        _reject("block_shape", block_shape, "moela's FP8 experts take 128×128 weight blocks ([128, 128]); "
                "per-tensor FP8 is not supported")
    for name, s in (("a1_scale", a1_scale), ("a2_scale", a2_scale)):
        if s is not None:
            _reject(name, type(s).__name__, "moela quantizes activations dynamically (1×128 blocks); static "
                    "activation scales are not supported")
    for name, w, s in (("w1", w1, w1_scale), ("w2", w2, w2_scale)):
        if w.dtype != FP8_DTYPE:
            _reject(name, w.dtype, f"use_fp8_w8a8 takes {FP8_DTYPE} weights")
        check_tensor(f"{name}_scale", s, dtypes=(torch.float32,),
                     shape=(w.shape[0], -(-w.shape[1] // 128), -(-w.shape[2] // 128)))


def _local_ids(topk_ids: torch.Tensor, expert_map: torch.Tensor | None, global_num_experts: int,
               n_local: int) -> torch.Tensor:
    """topk_ids in the local numbering: ``expert_map[id]`` for ids in [0, G), -1 otherwise (no sync)."""
    if expert_map is None:
        if global_num_experts not in (-1, n_local):
            _reject("global_num_experts", global_num_experts, f"without expert_map it must be -1 or E={n_local} "
                    "(w1's experts)")
        return topk_ids
    check_tensor("expert_map", expert_map, ndim=1, dtypes=INT_DTYPES)
    g = expert_map.shape[0]
    if global_num_experts not in (-1, g):
        _reject("global_num_experts", global_num_experts, f"expected -1 or expert_map's length {g}")
    if expert_map.device != topk_ids.device:
        _reject("expert_map", str(expert_map.device), f"expected topk_ids' device {topk_ids.device}")
    inside = (topk_ids >= 0) & (topk_ids < g)
    mapped = expert_map[topk_ids.clamp(0, g - 1).long()]
    return torch.where(inside, mapped.to(topk_ids.dtype), -1)


def fused_experts(
    hidden_states: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    inplace: bool = False,
    activation: str = "silu",
    apply_router_weight_on_input: bool = False,
    use_fp8_w8a8: bool | None = None,
    use_int8_w8a8: bool = False,
    use_int8_w8a16: bool = False,
    use_int4_w4a16: bool = False,
    per_channel_quant: bool = False,
    global_num_experts: int = -1,
    expert_map: torch.Tensor | None = None,
    w1_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    w1_zp: torch.Tensor | None = None,
    w2_zp: torch.Tensor | None = None,
    a1_scale: torch.Tensor | None = None,
    a2_scale: torch.Tensor | None = None,
    block_shape: list[int] | None = None,
    allow_deep_gemm: bool = False,
    *,
    quant_config: object = None,
    backend: str = "auto",
) -> torch.Tensor:
    """The routed experts of vLLM's ``fused_experts`` (see the module docstring).

    hidden_states: (T, K) bf16/fp16/fp32; w1: (E, 2N, K); w2: (E, K, N), x's dtype or e4m3
    (``use_fp8_w8a8``, inferred from the weights when None); topk_weights: (T, k) float;
    topk_ids: (T, k) int32/int64, global ids when ``expert_map`` (G,) is given.
    ``inplace=True`` writes the result into hidden_states and returns it. ``allow_deep_gemm`` is
    a hint for vLLM's own kernels and is ignored. Returns (T, K) in x's dtype.
    """
    if backend not in BACKENDS:
        _reject("backend", backend, f"expected one of {BACKENDS}")
    if quant_config is not None:
        _reject("quant_config", type(quant_config).__name__, "pass w1_scale, w2_scale and block_shape as keywords "
                "instead (vLLM's classic form)")
    if activation != "silu":
        _reject("activation", activation, "moela's experts compute silu(gate) · up ('silu')")
    for name, flag in (("use_int8_w8a8", use_int8_w8a8), ("use_int8_w8a16", use_int8_w8a16),
                       ("use_int4_w4a16", use_int4_w4a16)):
        if flag:
            _reject(name, flag, "moela's experts take bf16/fp16/fp32 or block-FP8 (e4m3) weights")
    for name, zp in (("w1_zp", w1_zp), ("w2_zp", w2_zp)):
        if zp is not None:
            _reject(name, type(zp).__name__, "zero points belong to int8/int4 weights, which moela does not take")
    check_tensor("hidden_states", hidden_states, ndim=2, dtypes=_ACT_DTYPES)
    check_tensor("w1", w1, ndim=3)
    E, two_n, K = w1.shape
    if two_n % 2 or K != hidden_states.shape[1]:
        _reject("w1", tuple(w1.shape), f"expected (E, 2N, K={hidden_states.shape[1]}) with an even 2N")
    check_tensor("w2", w2, shape=(E, K, two_n // 2))
    check_tensor("topk_ids", topk_ids, ndim=2, dtypes=INT_DTYPES)
    check_tensor("topk_weights", topk_weights, shape=tuple(topk_ids.shape))
    if topk_ids.shape[0] != hidden_states.shape[0]:
        _reject("topk_ids", tuple(topk_ids.shape), f"expected ({hidden_states.shape[0]}, k): one row per token")

    fp8 = w1.dtype == FP8_DTYPE if use_fp8_w8a8 is None else bool(use_fp8_w8a8)
    if fp8:
        _check_fp8(w1, w2, w1_scale, w2_scale, block_shape, per_channel_quant, a1_scale, a2_scale)
    else:
        for name, value in (("w1_scale", w1_scale), ("w2_scale", w2_scale), ("a1_scale", a1_scale),
                            ("a2_scale", a2_scale)):
            if value is not None:
                _reject(name, type(value).__name__, "scales are for FP8 weights (use_fp8_w8a8=True)")
        if per_channel_quant:
            _reject("per_channel_quant", per_channel_quant, "per-channel quantization is for quantized weights")
        for name, w in (("w1", w1), ("w2", w2)):
            if w.dtype != hidden_states.dtype:
                _reject(name, w.dtype, f"expected hidden_states' dtype {hidden_states.dtype} (or e4m3 with "
                        "use_fp8_w8a8)")

    x, weights = hidden_states, topk_weights
    if apply_router_weight_on_input:
        if topk_ids.shape[1] != 1:
            _reject("apply_router_weight_on_input", True, f"it scales the input, which is exact for top-1 only "
                    f"(as in vLLM); topk_ids has k={topk_ids.shape[1]}")
        x, weights = x * topk_weights.to(x.dtype), None
    ops = ops_for(backend, hidden_states.device)
    plan = ops.make_routing(_local_ids(topk_ids, expert_map, global_num_experts, E), E)
    if fp8:
        y = routed_experts(ops, x, plan, weights, w1, w2, w13_scale_inv=w1_scale, w2_scale_inv=w2_scale)
    else:
        y = routed_experts(ops, x, plan, weights, w1, w2)
    y = y.to(hidden_states.dtype)
    if inplace:
        return hidden_states.copy_(y)
    return y
