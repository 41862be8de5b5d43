"""moela in a Hugging Face transformers (>= 5) DeepSeek-V2/V3 model: ``patch(model)`` / ``unpatch(model)``.

Example::

    model = AutoModelForCausalLM.from_pretrained("deepseek-ai/DeepSeek-V2-Lite", dtype=torch.bfloat16)
    moela.integrations.hf.patch(model)      # moela's routing, experts and MLA; unpatch(model) undoes it

What :func:`patch` changes, over the model's own parameters (nothing is copied):

- **experts**: ``"moela"`` is registered with transformers' experts interface (the one
  ``@use_experts_implementation`` classes such as ``DeepseekV3Experts`` dispatch through, and its
  FP8 twin for checkpoints loaded with ``*_scale_inv`` blocks), and picked with
  ``model.set_experts_implementation("moela")``: :func:`experts_forward` runs
  :func:`moela.model.routed_experts` on the stacked ``gate_up_proj`` (E, 2I, D) and
  ``down_proj`` (E, D, I), bf16/fp16/fp32 or e4m3 with 128×128 scales. Importing this module
  registers the name, so ``from_pretrained(..., experts_implementation="moela")`` works too.
- **router**: each ``DeepseekV3TopkRouter``/``DeepseekV2TopkRouter`` selects its experts with
  ``route`` (the router's sigmoid + correction bias, groups, or V2's softmax greedy or
  group-limited greedy) and still returns ``(router_logits, topk_weights, topk_ids)``, so
  ``output_router_logits`` keeps working; the weights are recomputed from the logits with
  torch where gradients flow (training) or where ``norm_topk_prob`` is false.
- **attention**: each ``DeepseekV3Attention``/``DeepseekV2Attention`` is rebound, in place, to
  moela's absorbed MLA (:mod:`moela.integrations.hf_mla`) over a latent cache kept in HF's
  own ``Cache``; ``attention_mask`` (padding), positions and ``StaticCache`` are honoured.

``backend`` picks moela's implementation as :func:`moela.model.ops_for` does: ``"auto"`` runs
the Triton kernels on CUDA and the PyTorch references elsewhere, ``"triton"`` the kernels
everywhere (the Triton interpreter on CPU), ``"reference"`` the references. ``generate()``,
training and ``output_router_logits`` work as before; attention weights are not returned
(``output_attentions`` gives None, as with "sdpa"). The model must use ``attn_implementation``
"sdpa" or "eager" (their 4-D masks). Covered: ``DeepseekV3*`` and ``DeepseekV2*`` models of
transformers 5 (DeepSeek-V2, V2-Lite, V3, R1 and V3-architecture checkpoints).
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

try:
    from transformers.integrations.finegrained_fp8 import FP8ExpertsInterface
    from transformers.integrations.moe import ExpertsInterface
    from transformers.models.deepseek_v2 import modeling_deepseek_v2 as _v2
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as _v3
except ImportError as e:  # not installed, or transformers 4 (no experts interface)
    raise ImportError(f"moela.integrations.hf needs transformers >= 5 (pip install 'moela[hf]'): {e}") from e

from moela.model.backend import BACKENDS, ops_for
from moela.model.moe import routed_experts
from moela.reference.fp8 import FP8_DTYPE

from .hf_mla import mla_forward, rope_for

__all__ = ["patch", "unpatch", "is_patched", "experts_forward", "router_forward", "EXPERTS_IMPLEMENTATION"]

#: The name moela's experts function has in transformers' experts interfaces.
EXPERTS_IMPLEMENTATION = "moela"

_ATTENTION_CLASSES = (_v3.DeepseekV3Attention, _v2.DeepseekV2Attention)
_ROUTER_CLASSES = (_v3.DeepseekV3TopkRouter, _v2.DeepseekV2TopkRouter)
_EXPERT_BLOCK = 128
_ABSENT = object()


# --------------------------------------------------------------------------- experts
def _fp8_scales(self: nn.Module) -> tuple[torch.Tensor, torch.Tensor, str | None]:
    """The FP8 experts' float32 block scales and the activations' scale format."""
    block = tuple(getattr(self, "block_size", None) or ())
    if block != (_EXPERT_BLOCK, _EXPERT_BLOCK):
        raise ValueError(f"experts.block_size: moela's FP8 experts take 128×128 weight blocks, got {block or None}")
    if getattr(self, "activation_scheme", "dynamic") != "dynamic":
        raise ValueError(f"experts.activation_scheme: moela quantizes activations dynamically (1×128 blocks), "
                         f"got {self.activation_scheme!r}")
    if self.hidden_dim % _EXPERT_BLOCK or self.intermediate_dim % _EXPERT_BLOCK:
        raise ValueError(f"experts: moela's FP8 experts need hidden and intermediate sizes that are multiples of "
                         f"{_EXPERT_BLOCK}, got {self.hidden_dim} and {self.intermediate_dim}")
    s13, s2 = self.gate_up_proj_scale_inv, self.down_proj_scale_inv
    ue8m0 = s13.dtype != torch.float32  # transformers' "ue8m0" scale format stores the scales as float8_e8m0fnu
    return s13.float(), s2.float(), "ue8m0" if ue8m0 else None


def _check_experts(self: nn.Module) -> None:
    unsupported = {"has_gate": (True, getattr(self, "has_gate", True)),
                   "has_bias": (False, getattr(self, "has_bias", False)),
                   "is_transposed": (False, getattr(self, "is_transposed", False)),
                   "is_concatenated": (True, getattr(self, "is_concatenated", True)),
                   "has_post_expert_norm": (False, getattr(self, "has_post_expert_norm", False))}
    for name, (want, got) in unsupported.items():
        if got != want:
            raise ValueError(f"experts.{name}: moela's experts take gate_up_proj (E, 2I, D) and down_proj (E, D, I) "
                             f"without bias or post-norm (expected {name}={want}), got {got}")
    act = getattr(self.config, "hidden_act", "silu")
    extras = [n for n in ("limit", "swiglu_alpha", "gate_softcap") if getattr(self, n, None) is not None]
    if act != "silu" or extras:
        raise ValueError(f"experts: moela's experts compute silu(gate) · up, got hidden_act={act!r}"
                         + (f" with {', '.join(extras)}" if extras else ""))


def experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' experts signature: hidden_states (T, D), top_k_index (T, k) ids (ids outside
    [0, E), such as expert parallelism's sentinels, are skipped), top_k_weights (T, k) -> (T, D).

    ``self`` is a ``DeepseekV3Experts``-style module (``gate_up_proj`` (E, 2I, D), ``down_proj``
    (E, D, I)) or transformers' ``FP8Experts`` (e4m3 weights with ``*_scale_inv`` 128×128 blocks).
    """
    _check_experts(self)
    ops = ops_for(getattr(self, "_moela_backend", "auto"), hidden_states.device)
    plan = ops.make_routing(top_k_index, self.num_experts)
    if self.gate_up_proj.dtype == FP8_DTYPE:
        s13, s2, scale_fmt = _fp8_scales(self)
        y = routed_experts(ops, hidden_states, plan, top_k_weights, self.gate_up_proj, self.down_proj,
                           w13_scale_inv=s13, w2_scale_inv=s2, scale_fmt=scale_fmt)
    else:
        y = routed_experts(ops, hidden_states, plan, top_k_weights, self.gate_up_proj.to(hidden_states.dtype),
                           self.down_proj.to(hidden_states.dtype))
    return y.to(hidden_states.dtype)


ExpertsInterface.register(EXPERTS_IMPLEMENTATION, experts_forward)
FP8ExpertsInterface.register(EXPERTS_IMPLEMENTATION, experts_forward)


# --------------------------------------------------------------------------- router
@dataclass(frozen=True)
class _RouterState:
    backend: str
    score_func: str
    n_groups: int
    topk_groups: int
    normalise: bool  # sigmoid weights divided by their sum (V3's norm_topk_prob)


def _router_state(router: nn.Module, backend: str) -> _RouterState:
    if isinstance(router, _v3.DeepseekV3TopkRouter):
        return _RouterState(backend, "sigmoid", router.num_group, router.topk_group, bool(router.norm_topk_prob))
    if router.topk_method == "greedy":
        return _RouterState(backend, "softmax", 1, 1, False)
    if router.topk_method == "group_limited_greedy":
        return _RouterState(backend, "softmax", router.num_group, router.topk_group, False)
    raise ValueError(f"topk_method: DeepseekV2TopkRouter takes 'greedy' or 'group_limited_greedy', "
                     f"got {router.topk_method!r}")


def router_forward(self: nn.Module, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The patched forward of a DeepseekV3/V2 router (bound per instance): hidden_states (..., D) ->
    (router_logits (T, E) float32, topk_weights (T, k) float32, topk_ids (T, k) int64)."""
    state: _RouterState = self._moela
    x = hidden_states.view(-1, self.hidden_dim)
    logits = F.linear(x.float(), self.weight.float())  # (T, E), as transformers computes them
    bias = getattr(self, "e_score_correction_bias", None)
    grad = torch.is_grad_enabled() and logits.requires_grad
    ops = ops_for(state.backend, logits.device)
    weights, ids = ops.route(logits.detach() if grad else logits, bias, topk=self.top_k, n_groups=state.n_groups,
                             topk_groups=state.topk_groups, score_func=state.score_func,
                             route_scale=self.routed_scaling_factor)
    if grad or (state.score_func == "sigmoid" and not state.normalise):  # torch's weights of the chosen ids
        scores = logits.sigmoid() if state.score_func == "sigmoid" else logits.softmax(dim=-1)
        weights = scores.gather(1, ids.long())
        if state.normalise:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights * self.routed_scaling_factor
    return logits, weights, ids.long()


# --------------------------------------------------------------------------- patch / unpatch
@dataclass(frozen=True)
class _AttentionState:
    backend: str
    rope: Any


@dataclass
class _Patch:
    experts_implementation: dict | None
    rebound: list[tuple[nn.Module, str, object]] = field(default_factory=list)  # module, attribute, saved value
    experts: list[nn.Module] = field(default_factory=list)


def _rebind(module: nn.Module, fn, state: object, record: _Patch) -> None:
    """Bind ``fn`` as ``module``'s forward on the instance; under accelerate's hooks (``_hf_hook``),
    as the ``_old_forward`` those hooks call."""
    attr = "_old_forward" if hasattr(module, "_hf_hook") else "forward"
    record.rebound.append((module, attr, module.__dict__.get(attr, _ABSENT)))
    module._moela = state
    setattr(module, attr, types.MethodType(fn, module))


def is_patched(model: nn.Module) -> bool:
    """Whether :func:`patch` has changed ``model`` (and :func:`unpatch` has not undone it)."""
    return isinstance(getattr(model, "_moela_patch", None), _Patch)


def patch(model: nn.Module, *, backend: str = "auto", attention: bool = True, moe: bool = True) -> nn.Module:
    """Put moela's routing, experts (``moe``) and absorbed MLA (``attention``) into a transformers 5
    DeepSeek-V2/V3 model, in place; returns the model. Patching a patched model first undoes the
    earlier patch. See the module docstring for what changes."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a transformers PreTrainedModel, got {type(model).__name__}")
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_experts_implementation"):
        raise TypeError(f"model: expected a transformers (>= 5) PreTrainedModel, got {type(model).__name__}")
    attn_modules = [m for m in model.modules() if isinstance(m, _ATTENTION_CLASSES)] if attention else []
    routers = [m for m in model.modules() if isinstance(m, _ROUTER_CLASSES)] if moe else []
    if not attn_modules and not routers:
        raise ValueError(f"model: found no DeepseekV3/DeepseekV2 attention or router modules to patch in "
                         f"{type(model).__name__} (attention={attention}, moe={moe})")
    impl = getattr(config, "_attn_implementation", None)
    if attn_modules and impl not in ("sdpa", "eager"):
        raise ValueError(f"attn_implementation: moela's MLA takes the masks of 'sdpa' or 'eager', got {impl!r}; "
                         "call model.set_attn_implementation('sdpa') first")
    router_states = [_router_state(r, backend) for r in routers]  # raises before anything changes
    if is_patched(model):
        unpatch(model)

    record = _Patch(model.get_experts_implementation() if routers else None)
    for module in attn_modules:
        _rebind(module, mla_forward, _AttentionState(backend, rope_for(module)), record)
    for router, state in zip(routers, router_states, strict=True):
        _rebind(router, router_forward, state, record)
    if routers:
        for module in model.modules():
            if getattr(module, "gate_up_proj", None) is not None and hasattr(module, "_apply_gate"):
                module._moela_backend = backend
                record.experts.append(module)
        model.set_experts_implementation(EXPERTS_IMPLEMENTATION)
    model._moela_patch = record
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`: the original forwards and experts implementation come back; returns the model."""
    record = getattr(model, "_moela_patch", None)
    if not isinstance(record, _Patch):
        raise ValueError(f"model: this {type(model).__name__} is not patched by moela.integrations.hf")
    for module, attr, saved in reversed(record.rebound):
        if saved is _ABSENT:
            delattr(module, attr)
        else:
            setattr(module, attr, saved)
        del module._moela
    for module in record.experts:
        del module._moela_backend
    if record.experts_implementation is not None:
        model.set_experts_implementation(record.experts_implementation)
    del model._moela_patch
    return model
