"""Model configuration with DeepSeek-V3's ``ModelArgs`` field names.

``ModelArgs`` keeps the field names (and defaults) of DeepSeek-V3's ``inference/model.py``
so that DeepSeek's own config JSON files (``configs/config_671B.json``,
``config_16B.json``, ...) load unchanged with :meth:`ModelArgs.from_json`. Hugging Face
``config.json`` files of DeepSeek-V2/V3 (``hidden_size``, ``n_group``, ``rope_scaling``...)
are recognised and translated too.

Three fields are moela's own: ``gate_bias`` (DeepSeek decides it from ``dim == 7168``),
``scale_fmt`` (DeepSeek-V3.1's FP8 scale format, ``None`` or ``"ue8m0"``) and ``backend``
(which implementation ``moela.model`` runs). ``dtype`` ("bf16" or "fp8") is the weights' precision.

Example::

    args = ModelArgs.from_name("deepseek-v3")
    args = ModelArgs.from_json("config_671B.json")
    tiny = ModelArgs.from_name("tiny", n_routed_experts=8, n_expert_groups=2)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

__all__ = ["ModelArgs", "PRESETS", "load_config"]


@dataclass(frozen=True)
class ModelArgs:
    """Hyper-parameters of a DeepSeek-V3-style transformer (defaults: DeepSeek-V2-Lite)."""

    max_batch_size: int = 8
    max_seq_len: int = 4096 * 4
    dtype: Literal["bf16", "fp8"] = "bf16"
    vocab_size: int = 102400
    dim: int = 2048
    inter_dim: int = 10944
    moe_inter_dim: int = 1408
    n_layers: int = 27
    n_dense_layers: int = 1
    n_heads: int = 16
    # moe
    n_routed_experts: int = 64
    n_shared_experts: int = 2
    n_activated_experts: int = 6
    n_expert_groups: int = 1
    n_limited_groups: int = 1
    score_func: Literal["softmax", "sigmoid"] = "softmax"
    route_scale: float = 1.0
    # mla
    q_lora_rank: int = 0
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # yarn
    original_seq_len: int = 4096
    rope_theta: float = 10000.0
    rope_factor: float = 40
    beta_fast: int = 32
    beta_slow: int = 1
    mscale: float = 1.0
    # moela's own
    scale_fmt: str | None = None
    gate_bias: bool | None = None  # None: DeepSeek's rule, a bias iff dim == 7168
    backend: str = "auto"  # moela.model: "auto" (Triton on CUDA, reference elsewhere), "triton", "reference"

    def __post_init__(self) -> None:
        _validate(self)

    # ----------------------------------------------------------------- derived values
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def experts_per_group(self) -> int:
        return self.n_routed_experts // self.n_expert_groups

    @property
    def has_gate_bias(self) -> bool:
        return self.dim == 7168 if self.gate_bias is None else self.gate_bias

    @property
    def uses_yarn(self) -> bool:
        return self.max_seq_len > self.original_seq_len

    @property
    def softmax_scale(self) -> float:
        """Attention scale: qk_head_dim**-0.5, times mscale² under YaRN (as DeepSeek)."""
        scale = self.qk_head_dim**-0.5
        if self.uses_yarn:
            m = 0.1 * self.mscale * math.log(self.rope_factor) + 1.0
            scale *= m * m
        return scale

    # ----------------------------------------------------------------- constructors
    def replace(self, **changes: Any) -> ModelArgs:
        """A copy with some fields changed (validated again)."""
        _check_known(changes, "ModelArgs.replace")
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> ModelArgs:
        """A preset by name (see ``PRESETS``), optionally with fields overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown config name {name!r}; expected one of {sorted(PRESETS)}")
        return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], **overrides: Any) -> ModelArgs:
        """From DeepSeek's ``ModelArgs`` keys, or from a Hugging Face DeepSeek config dict."""
        if not isinstance(d, Mapping):
            raise TypeError(f"config: expected a mapping, got {type(d).__name__}")
        d = _from_hf(d) if "hidden_size" in d else dict(d)
        d.update(overrides)
        _check_known(d, "config")
        return cls(**d)

    @classmethod
    def from_json(cls, path: str | os.PathLike, **overrides: Any) -> ModelArgs:
        """Load one of DeepSeek's config JSON files as it is (or an HF ``config.json``)."""
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f), **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(name_or_path: str | os.PathLike, **overrides: Any) -> ModelArgs:
    """A preset name (``"deepseek-v3"``, ``"deepseek-v2-lite"``, ``"tiny"``) or a JSON path."""
    if isinstance(name_or_path, str) and name_or_path in PRESETS:
        return ModelArgs.from_name(name_or_path, **overrides)
    return ModelArgs.from_json(name_or_path, **overrides)


# --------------------------------------------------------------------------- validation
_FIELD_NAMES = {f.name for f in fields(ModelArgs)}
_POSITIVE_INTS = (
    "max_batch_size", "max_seq_len", "vocab_size", "dim", "inter_dim", "moe_inter_dim",
    "n_layers", "n_heads", "n_routed_experts", "n_activated_experts", "n_expert_groups",
    "n_limited_groups", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
    "original_seq_len",
)
_NON_NEGATIVE_INTS = ("n_dense_layers", "n_shared_experts", "q_lora_rank")
_POSITIVE_FLOATS = ("route_scale", "rope_theta", "rope_factor", "beta_fast", "beta_slow", "mscale")


def _check_known(d: Mapping[str, Any], where: str) -> None:
    unknown = sorted(set(d) - _FIELD_NAMES)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; ModelArgs has {sorted(_FIELD_NAMES)}")


def _fail(field: str, msg: str) -> None:
    raise ValueError(f"ModelArgs.{field}: {msg}")


def _validate(a: ModelArgs) -> None:
    for name in _POSITIVE_INTS + _NON_NEGATIVE_INTS:
        v = getattr(a, name)
        if not isinstance(v, int) or isinstance(v, bool):
            _fail(name, f"expected an int, got {v!r} ({type(v).__name__})")
        if v < 0 or (v == 0 and name in _POSITIVE_INTS):
            _fail(name, f"expected {'> 0' if name in _POSITIVE_INTS else '>= 0'}, got {v}")
    for name in _POSITIVE_FLOATS:
        v = getattr(a, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            _fail(name, f"expected a finite number > 0, got {v!r}")
    if a.dtype not in ("bf16", "fp8"):
        _fail("dtype", f"expected 'bf16' or 'fp8', got {a.dtype!r}")
    if a.score_func not in ("softmax", "sigmoid"):
        _fail("score_func", f"expected 'softmax' or 'sigmoid', got {a.score_func!r}")
    if a.scale_fmt not in (None, "ue8m0"):
        _fail("scale_fmt", f"expected None or 'ue8m0', got {a.scale_fmt!r}")
    if a.backend not in ("auto", "triton", "reference"):
        _fail("backend", f"expected 'auto', 'triton' or 'reference', got {a.backend!r}")
    if a.gate_bias not in (None, True, False):
        _fail("gate_bias", f"expected None, True or False, got {a.gate_bias!r}")
    if a.n_dense_layers > a.n_layers:
        _fail("n_dense_layers", f"{a.n_dense_layers} dense layers but only n_layers={a.n_layers}")
    if a.n_routed_experts % a.n_expert_groups:
        _fail("n_expert_groups", f"n_routed_experts={a.n_routed_experts} experts cannot be split "
              f"into n_expert_groups={a.n_expert_groups} equal groups")
    if a.n_limited_groups > a.n_expert_groups:
        _fail("n_limited_groups", f"n_limited_groups={a.n_limited_groups} > "
              f"n_expert_groups={a.n_expert_groups}")
    reachable = a.n_limited_groups * (a.n_routed_experts // a.n_expert_groups)
    if a.n_activated_experts > reachable:
        _fail("n_activated_experts", f"top-k={a.n_activated_experts} is larger than the "
              f"{reachable} experts in the n_limited_groups={a.n_limited_groups} kept groups")
    if a.n_expert_groups > 1 and a.has_gate_bias and a.n_routed_experts // a.n_expert_groups < 2:
        _fail("n_expert_groups", "with a gate bias the group score is the sum of the top-2 "
              "experts of a group, so every group needs at least 2 experts")
    if a.qk_rope_head_dim % 2:
        _fail("qk_rope_head_dim", f"RoPE rotates pairs, so it must be even, got {a.qk_rope_head_dim}")


# --------------------------------------------------------------------------- HF translation
_HF_KEYS = {
    "vocab_size": "vocab_size", "hidden_size": "dim", "intermediate_size": "inter_dim",
    "moe_intermediate_size": "moe_inter_dim", "num_hidden_layers": "n_layers",
    "first_k_dense_replace": "n_dense_layers", "num_attention_heads": "n_heads",
    "n_routed_experts": "n_routed_experts", "n_shared_experts": "n_shared_experts",
    "num_experts_per_tok": "n_activated_experts", "n_group": "n_expert_groups",
    "topk_group": "n_limited_groups", "scoring_func": "score_func",
    "routed_scaling_factor": "route_scale", "q_lora_rank": "q_lora_rank",
    "kv_lora_rank": "kv_lora_rank", "qk_nope_head_dim": "qk_nope_head_dim",
    "qk_rope_head_dim": "qk_rope_head_dim", "v_head_dim": "v_head_dim", "rope_theta": "rope_theta",
}
_HF_ROPE_KEYS = {
    "factor": "rope_factor", "original_max_position_embeddings": "original_seq_len",
    "beta_fast": "beta_fast", "beta_slow": "beta_slow", "mscale": "mscale",
}


def _from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    """Translate a Hugging Face DeepSeek-V2/V3 ``config.json`` dict into ModelArgs fields."""
    d = {ours: hf[theirs] for theirs, ours in _HF_KEYS.items() if hf.get(theirs) is not None}
    d.setdefault("q_lora_rank", 0)  # HF writes null for "no q compression"
    rope = hf.get("rope_scaling") or {}
    kind = rope.get("type", rope.get("rope_type", "yarn"))
    if rope and kind != "yarn":
        raise ValueError(f"rope_scaling: only YaRN is supported (DeepSeek's), got type {kind!r}")
    # HF scales cos/sin by mscale/mscale_all_dim and the softmax by mscale_all_dim²; DeepSeek's
    # ModelArgs has one mscale, which is right only when the two are equal (V2-Lite, V3).
    if rope.get("mscale_all_dim") is not None and rope.get("mscale", rope["mscale_all_dim"]) != rope["mscale_all_dim"]:
        raise ValueError(f"rope_scaling: mscale={rope['mscale']} != mscale_all_dim={rope['mscale_all_dim']} "
                         "cannot be expressed with ModelArgs.mscale")
    d.update({ours: rope[theirs] for theirs, ours in _HF_ROPE_KEYS.items() if rope.get(theirs) is not None})
    if not rope:  # no YaRN: make max_seq_len <= original_seq_len
        d["original_seq_len"] = d["max_seq_len"] = hf.get("max_position_embeddings", 4096)
    if "topk_method" in hf:
        d["gate_bias"] = hf["topk_method"] == "noaux_tc"
    quant = hf.get("quantization_config") or {}
    if quant.get("quant_method") == "fp8":
        d["dtype"] = "fp8"
        if quant.get("scale_fmt") is not None:
            d["scale_fmt"] = quant["scale_fmt"]
    return d


# --------------------------------------------------------------------------- presets
PRESETS: dict[str, ModelArgs] = {
    # DeepSeek-V3 / R1, 671B (configs/config_671B.json)
    "deepseek-v3": ModelArgs(
        vocab_size=129280, dim=7168, inter_dim=18432, moe_inter_dim=2048, n_layers=61,
        n_dense_layers=3, n_heads=128, n_routed_experts=256, n_shared_experts=1,
        n_activated_experts=8, n_expert_groups=8, n_limited_groups=4, route_scale=2.5,
        score_func="sigmoid", q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, dtype="fp8",
    ),
    # DeepSeek-V2-Lite, 16B (configs/config_16B.json)
    "deepseek-v2-lite": ModelArgs(
        vocab_size=102400, dim=2048, inter_dim=10944, moe_inter_dim=1408, n_layers=27,
        n_dense_layers=1, n_heads=16, n_routed_experts=64, n_shared_experts=2,
        n_activated_experts=6, route_scale=1.0, q_lora_rank=0, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, mscale=0.707,
    ),
    # Small enough for CPU tests; every feature on: groups, bias, sigmoid, q LoRA, YaRN.
    "tiny": ModelArgs(
        max_batch_size=4, max_seq_len=64, vocab_size=256, dim=64, inter_dim=128,
        moe_inter_dim=32, n_layers=2, n_dense_layers=1, n_heads=4, n_routed_experts=16,
        n_shared_experts=1, n_activated_experts=4, n_expert_groups=4, n_limited_groups=2,
        score_func="sigmoid", route_scale=2.5, q_lora_rank=32, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, original_seq_len=32,
        rope_factor=4.0, gate_bias=True,
    ),
}
