"""Baselines from outside torch: the anchors a claim to beat must be measured against on the same
machine. Each runs where its package is installed and this GPU supports it, and is skipped with
the reason otherwise (the package is not installed, its import failed, no CUDA GPU, its call
raised on these shapes).

    DeepGEMM (deep_gemm)   fp8_gemm, fp8_grouped_gemm, grouped_gemm (bf16)
    vLLM (vllm)            fused_experts: moe_layer (bf16), moe_layer_fp8 (block FP8)
    FlashMLA (flash_mla)   mla_decode
    sgl_kernel             route (moe_fused_gate), fp8_gemm (fp8_blockwise_scaled_mm)
    transformers           grouped_mm experts (ExpertsInterface): moe_layer

Every builder takes a :class:`~moela.profiling.registry.Case` and returns the zero-argument
callable that is timed (layouts prepared outside it), like every other implementation. The
layer baselines route with ``moela.reference.gate`` (plain torch, the layer's routing) and add
the layer's shared experts, so that they compute the whole layer.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from ..registry import Case, Impl, Unavailable
from ._common import BLOCK, need_cuda, probed

__all__ = ["PACKAGES", "outside_module", "deepgemm_impls", "sgl_kernel_impls", "flash_mla_impl", "layer_impls"]

#: The outside packages, and what installs them.
PACKAGES = {
    "deep_gemm": "DeepGEMM is built from DeepSeek's DeepGEMM repository",
    "vllm": "pip install vllm",
    "flash_mla": "FlashMLA is built from DeepSeek's FlashMLA repository",
    "sgl_kernel": "pip install sgl-kernel",
    "transformers": "pip install 'transformers>=5'",
}


def _unshadow_kernels() -> None:
    """Run from a checkout of moela, the repository root is on ``sys.path`` and its ``kernels/``
    folder answers to the bare name ``kernels``, the name of Hugging Face's package that
    transformers imports: import the real one (if installed) with the root left out of the path."""
    if "kernels" in sys.modules:
        return
    root = Path(importlib.import_module("moela").__file__).resolve().parent
    spec = importlib.util.find_spec("kernels")
    if spec is None or not spec.origin or Path(spec.origin).resolve().parent != root / "kernels":
        return
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if _resolved(p) != root]
    try:
        importlib.import_module("kernels")
    except ImportError:
        pass  # not installed: transformers goes on without it
    finally:
        sys.path[:] = saved


def _resolved(entry: str) -> Path | None:
    try:
        return Path(entry or ".").resolve()
    except OSError:
        return None


def outside_module(module: str, what: str) -> ModuleType:
    """Import ``module`` of an outside package, or raise :class:`Unavailable` saying why not."""
    package = module.split(".")[0]
    if importlib.util.find_spec(package) is None:
        raise Unavailable(f"{what}: {package} is not installed ({PACKAGES.get(package, package)})")
    if package == "transformers":
        _unshadow_kernels()
    try:
        return importlib.import_module(module)
    except Exception as e:  # installed, but built for another torch/CUDA, or missing a part
        first = (str(e).strip().splitlines() or [""])[0]
        raise Unavailable(f"{what}: importing {module} failed: {type(e).__name__}: {first}"[:400]) from e


def _first(mod: ModuleType, names: Sequence[str], what: str) -> Callable[..., Any]:
    for n in names:
        fn = getattr(mod, n, None)
        if fn is not None:
            return fn
    raise Unavailable(f"{what}: this {mod.__name__} has none of {', '.join(names)}")


# ------------------------------------------------------------------ DeepGEMM
def _deepgemm(case_tensor: torch.Tensor, what: str) -> ModuleType:
    dg = outside_module("deep_gemm", what)
    need_cuda(case_tensor.device, at_least=(9, 0), what=what)
    return dg


def _contiguous_layout(sizes: Sequence[int], align: int, device: torch.device):
    """DeepGEMM's contiguous layout: each group's rows padded to ``align``. Returns
    ``(gather, m_indices, keep)``: padded row -> source row (-1: padding), the group of each
    padded row (-1: padding) and the padded rows that hold real rows, in order (None if no
    group needs padding)."""
    gather, groups, keep, start, at = [], [], [], 0, 0
    for e, n in enumerate(sizes):
        padded = -(-n // align) * align
        gather += list(range(start, start + n)) + [-1] * (padded - n)
        groups += [e] * n + [-1] * (padded - n)
        keep += list(range(at, at + n))
        start, at = start + n, at + padded
    as_t = lambda v: torch.tensor(v, dtype=torch.int32, device=device)  # noqa: E731
    needs = any(n % align for n in sizes)
    return as_t(gather), as_t(groups), (as_t(keep).long() if needs else None)


def _pad_rows(x: torch.Tensor, gather: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` at ``gather`` (zeros where -1), through a byte view for fp8."""
    raw = x.view(torch.uint8) if x.element_size() == 1 else x
    out = torch.zeros((gather.numel(), *raw.shape[1:]), dtype=raw.dtype, device=raw.device)
    real = gather >= 0
    out[real] = raw[gather[real].long()]
    return out.view(x.dtype)


def _grouped(case: Case, fp8: bool):
    i = case.inputs
    what = "DeepGEMM " + ("m_grouped_fp8_gemm_nt_contiguous" if fp8 else "m_grouped_bf16_gemm_nt_contiguous")
    dg = _deepgemm(i["xs"], what)
    align_fn = _first(dg, ("get_mk_alignment_for_contiguous_layout", "get_m_alignment_for_contiguous_layout"), what)
    gather, m_indices, keep = _contiguous_layout(i["sizes"], int(align_fn()), i["xs"].device)
    xs = _pad_rows(i["xs"], gather)
    N = i["w"].shape[1]
    out = torch.empty(xs.shape[0], N, dtype=torch.bfloat16, device=xs.device)
    if fp8:
        call = _first(dg, ("m_grouped_fp8_gemm_nt_contiguous", "m_grouped_gemm_fp8_fp8_bf16_nt_contiguous"), what)
        xs_s = _pad_rows(i["xs_s"], gather)
        kw = {"disable_ue8m0_cast": True} if "disable_ue8m0_cast" in _params(call) else {}
        run = lambda: call((xs, xs_s), (i["w"], i["w_s"]), out, m_indices, **kw)  # noqa: E731
    else:
        call = _first(dg, ("m_grouped_bf16_gemm_nt_contiguous",), what)
        run = lambda: call(xs, i["w"], out, m_indices)  # noqa: E731

    def timed() -> torch.Tensor:
        run()
        return out if keep is None else out.index_select(0, keep)  # un-padding, where groups were padded

    return probed(timed, what)


def _dense_fp8(case: Case):
    i = case.inputs
    what = "DeepGEMM fp8_gemm_nt"
    dg = _deepgemm(i["a"], what)
    call = _first(dg, ("fp8_gemm_nt", "gemm_fp8_fp8_bf16_nt"), what)
    out = torch.empty(i["a"].shape[0], i["b"].shape[0], dtype=torch.bfloat16, device=i["a"].device)
    kw = {"disable_ue8m0_cast": True} if "disable_ue8m0_cast" in _params(call) else {}

    def timed() -> torch.Tensor:
        call((i["a"], i["a_s"]), (i["b"], i["b_s"]), out, **kw)
        return out

    return probed(timed, what)


def _params(fn: Callable[..., Any]) -> set[str]:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # a C++ binding without a signature
        return set()


def deepgemm_impls(op: str) -> tuple[Impl, ...]:
    """DeepGEMM's baseline of ``fp8_gemm``, ``fp8_grouped_gemm`` or ``grouped_gemm``."""
    if op == "fp8_gemm":
        return (Impl("deepgemm", _dense_fp8, kind="outside", note="DeepGEMM fp8_gemm_nt (1x128 x 128x128 scales)"),)
    note = "DeepGEMM contiguous layout: groups padded to its alignment, un-padding included"
    if op == "fp8_grouped_gemm":
        return (Impl("deepgemm", lambda c: _grouped(c, fp8=True), kind="outside", note=note),)
    if op == "grouped_gemm":
        return (Impl("deepgemm bf16", lambda c: _grouped(c, fp8=False), kind="outside", note=note),)
    raise ValueError(f"no DeepGEMM baseline for op {op!r}")


# ------------------------------------------------------------------ sgl_kernel
def _sgl_route(case: Case):
    i = case.inputs
    what = "sgl_kernel.moe_fused_gate"
    sgl = outside_module("sgl_kernel", what)
    need_cuda(i["logits"].device, what=what)
    a = i["args"]
    if a.score_func != "sigmoid" or i["bias"] is None:
        raise Unavailable(f"{what}: DeepSeek-V3 routing only (sigmoid scores with a bias), this config has "
                          f"score_func={a.score_func!r} and {'a' if i['bias'] is not None else 'no'} bias")
    call = _first(sgl, ("moe_fused_gate",), what)
    return probed(lambda: call(i["logits"], i["bias"], a.n_expert_groups, a.n_limited_groups, a.n_activated_experts,
                               0, a.route_scale, True), what)


def _sgl_fp8_gemm(case: Case):
    i = case.inputs
    what = "sgl_kernel.fp8_blockwise_scaled_mm"
    sgl = outside_module("sgl_kernel", what)
    need_cuda(i["a"].device, at_least=(9, 0), what=what)
    call = _first(sgl, ("fp8_blockwise_scaled_mm",), what)
    a_s = i["a_s"].t().contiguous().t()  # (M, K/128), M-major
    b, b_s = i["b"].t(), i["b_s"].t()  # (K, N) and (K/128, N/128), column-major views
    return probed(lambda: call(i["a"], b, a_s, b_s, torch.bfloat16), what)


def sgl_kernel_impls(op: str) -> tuple[Impl, ...]:
    """sgl_kernel's baseline of ``route`` or ``fp8_gemm``."""
    if op == "route":
        return (Impl("sgl_kernel moe_fused_gate", _sgl_route, kind="outside", same_function=False,
                     note="SGLang's fused DeepSeek gate (its own order of the k ids: speed only)"),)
    if op == "fp8_gemm":
        return (Impl("sgl_kernel blockwise", _sgl_fp8_gemm, kind="outside", note="sgl_kernel fp8_blockwise_scaled_mm"),)
    raise ValueError(f"no sgl_kernel baseline for op {op!r}")


# ------------------------------------------------------------------ FlashMLA
def _flash_mla(case: Case, v_dim: int):
    """FlashMLA on the problem's own cache: 64-token pages (``block_table``) as they are, a dense
    ``(B, L, 576)`` cache viewed as pages in order; FlashMLA's FP8 rows with ``is_fp8_kvcache``."""
    i = case.inputs
    what = "flash_mla.flash_mla_with_kvcache"
    fm = outside_module("flash_mla", what)
    q, kv = i["q"], i["kv"]
    need_cuda(q.device, at_least=(9, 0), what=what)
    B, S, H, _ = q.shape
    page = 64
    table = i.get("block_table")
    if table is None:  # a dense cache: sequence b's pages are b·L/64 ... in order
        L = kv.shape[1]
        if L % page:
            raise Unavailable(f"{what}: the cache length {L} is not a multiple of its {page}-token pages")
        kv = kv.reshape(B * (L // page), page, kv.shape[-1])
        table = torch.arange(B * (L // page), dtype=torch.int32, device=q.device).view(B, L // page)
    elif kv.shape[1] != page:
        raise Unavailable(f"{what}: pages of {kv.shape[1]} tokens (FlashMLA's are {page})")
    seqlens = i.get("cache_seqlens")
    if seqlens is None:
        seqlens = torch.full((B,), table.shape[1] * page, dtype=torch.int32, device=q.device)
    blocks = kv.unsqueeze(2)  # (pages, 64, one KV head, row)
    metadata, splits = _first(fm, ("get_mla_metadata",), what)(seqlens, S * H, 1)
    call = _first(fm, ("flash_mla_with_kvcache",), what)
    kw = {"is_fp8_kvcache": True} if kv.dtype != q.dtype else {}
    return probed(lambda: call(q, blocks, table, seqlens, v_dim, metadata, splits,
                               softmax_scale=i["softmax_scale"], causal=True, **kw)[0], what)


def flash_mla_impl(v_dim: int) -> Impl:
    """FlashMLA's decode of ``mla_decode`` (values: the first ``v_dim`` columns of the cache)."""
    return Impl("flashmla", lambda c: _flash_mla(c, v_dim), kind="outside",
                note="FlashMLA on the problem's cache (dense: as 64-token pages in order)")


# ------------------------------------------------------------------ whole MoE layers
def _routing(case: Case, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from moela.reference import gate as ref_gate

    layer, a = case.inputs["layer"], case.inputs["args"]
    return ref_gate(x, layer.gate.weight, layer.gate.bias, a)


def _with_shared(case: Case, experts: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]):
    """The layer around an experts function: routing, the routed experts, the shared experts."""
    from .moe_layer import layer_runner

    layer = case.inputs["layer"]

    def forward(x: torch.Tensor) -> torch.Tensor:
        weights, ids = _routing(case, x)
        y = experts(x, weights, ids)
        return y + layer.shared_experts(x) if layer.shared_experts is not None else y

    return layer_runner(forward, case.inputs, layer)


def _vllm(case: Case):
    i = case.inputs
    what = "vllm fused_experts"
    mod = outside_module("vllm.model_executor.layers.fused_moe", what)
    need_cuda(i["x"].device, what=what)
    call = _first(mod, ("fused_experts",), what)
    layer = i["layer"]
    kw: dict[str, Any] = {}
    if layer.fp8:
        if "quant_config" in _params(call):
            config = outside_module("vllm.model_executor.layers.fused_moe.config", what)
            make = _first(config, ("fp8_w8a8_moe_quant_config",), what)
            kw["quant_config"] = make(w1_scale=layer.w13_scale_inv, w2_scale=layer.w2_scale_inv, a1_scale=None,
                                      a2_scale=None, block_shape=[BLOCK, BLOCK])
        else:
            kw.update(use_fp8_w8a8=True, w1_scale=layer.w13_scale_inv, w2_scale=layer.w2_scale_inv,
                      block_shape=[BLOCK, BLOCK])

    def experts(x, weights, ids):
        return call(x, layer.w13, layer.w2, weights, ids.to(torch.int32), **kw)

    return probed(_with_shared(case, experts), what)


def _transformers(case: Case):
    """transformers 5's ``DeepseekV3Experts`` with ``experts_implementation="grouped_mm"``, holding the
    layer's own expert parameters (built on the meta device, so no weights are allocated twice)."""
    i = case.inputs
    what = "transformers grouped_mm experts"
    mod = outside_module("transformers.models.deepseek_v3.modeling_deepseek_v3", what)
    layer, a = i["layer"], i["args"]
    if layer.fp8:
        raise Unavailable(f"{what}: bf16 experts only")
    config = _first(mod, ("DeepseekV3Config",), what)(
        hidden_size=a.dim, moe_intermediate_size=a.moe_inter_dim, n_routed_experts=a.n_routed_experts,
        num_experts_per_tok=a.n_activated_experts, hidden_act="silu")
    config._experts_implementation = "grouped_mm"
    with torch.device("meta"):
        experts_module = _first(mod, ("DeepseekV3Experts",), what)(config)
    experts_module.gate_up_proj, experts_module.down_proj = layer.w13, layer.w2  # (E, 2I, D), (E, D, I)

    def experts(x, weights, ids):
        return experts_module(x, ids.long(), weights.to(x.dtype))

    return probed(_with_shared(case, experts), what)


def layer_impls(fp8: bool, backward: bool = False) -> tuple[Impl, ...]:
    """The outside baselines of the MoE layer ops (routing in plain torch, shared experts added);
    with the backward only those that have one (vLLM's fused_experts is inference only)."""
    vllm = Impl("vllm fused_experts", _vllm, kind="outside",
                note="vLLM's Triton fused MoE" + (" (block FP8)" if fp8 else "") + " + torch routing + shared experts")
    hf = Impl("transformers grouped_mm", _transformers, kind="outside",
              note="transformers' grouped_mm experts + torch routing + shared experts")
    if fp8:
        return (vllm,)
    return (hf,) if backward else (vllm, hf)
