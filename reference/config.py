"""Model configuration with DeepSeek-V3's ``ModelArgs`` field names, read from three JSON layouts.

``ModelArgs`` keeps the field names (and defaults) of DeepSeek-V3's ``inference/model.py``, so
DeepSeek's own config files (``configs/config_671B.json``, ``config_16B.json``...) load as they
are with :meth:`ModelArgs.from_json`. Hugging Face ``config.json`` files of DeepSeek-V2/V3 are
translated, in the layout of transformers 4 (``rope_theta`` and ``rope_scaling`` at the top) and
of transformers 5 (both inside ``rope_parameters``), with transformers' own semantics: the
deepseek_v3 router is always sigmoid with a correction bias, YaRN is on when the rope type says
so, and ``mscale``/``mscale_all_dim`` split into a softmax factor and a cos/sin magnitude. A
field that would change the math and cannot be expressed raises; the bookkeeping fields that
never enter the layers are listed in ``HF_IGNORED_FIELDS``.

moela's own fields: ``gate_bias`` (DeepSeek decides it from ``dim == 7168``), ``scale_fmt``
(DeepSeek-V3.1's activation scale format), ``backend`` (the implementation ``moela.model``
runs), ``yarn`` (YaRN on/off whatever the lengths), ``rope_attention_factor`` (HF's YaRN
``attention_factor``) and ``train_fp8`` (DeepSeek-V3's FP8 training: floating-point master
weights, every projection and expert GEMM of forward and backward in e4m3). ``dtype`` ("bf16" or
"fp8") is the weights' precision: "fp8" holds e4m3 weights (inference), which ``train_fp8`` does
not (it re-quantizes its master weights at every step).

Example::

    args = ModelArgs.from_name("deepseek-v3")
    args = ModelArgs.from_json("config_671B.json")         # DeepSeek's file
    args = ModelArgs.from_json("DeepSeek-V3/config.json")  # Hugging Face's, v4 or v5 layout
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

__all__ = ["ModelArgs", "PRESETS", "HF_IGNORED_FIELDS", "load_config"]


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
    mscale: float = 1.0  # softmax scale × (0.1·mscale·ln(rope_factor) + 1)² under YaRN; 0: unscaled
    # moela's own
    scale_fmt: str | None = None
    gate_bias: bool | None = None  # None: DeepSeek's rule, a bias iff dim == 7168
    backend: str = "auto"  # moela.model: "auto" (Triton on CUDA, reference elsewhere), "triton", "reference"
    yarn: bool | None = None  # None: DeepSeek's rule, YaRN iff max_seq_len > original_seq_len
    rope_attention_factor: float = 1.0  # under YaRN, the magnitude of the rotary cos/sin (HF's attention_factor)
    train_fp8: bool = False  # FP8 training GEMMs (fprop, dgrad, wgrad in e4m3) from floating-point master weights

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
        return self.max_seq_len > self.original_seq_len if self.yarn is None else self.yarn

    @property
    def softmax_scale(self) -> float:
        """Attention scale: qk_head_dim**-0.5, times (0.1·mscale·ln(rope_factor) + 1)² under YaRN."""
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
        if not isinstance(name, str) or name not in PRESETS:
            raise ValueError(f"unknown config name {name!r}; expected one of {sorted(PRESETS)}")
        return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], **overrides: Any) -> ModelArgs:
        """From DeepSeek's ``ModelArgs`` keys, or from a Hugging Face DeepSeek-V2/V3 config dict.

        A dict with ``model_type`` or ``hidden_size`` is read as Hugging Face's; any other as
        DeepSeek's, whose implicit switches (YaRN iff max_seq_len > original_seq_len, a gate
        bias iff dim == 7168) are decided once here from the dict's own values unless it sets
        ``yarn``/``gate_bias``. ``overrides`` are ModelArgs fields applied last.
        """
        if not isinstance(d, Mapping):
            raise TypeError(f"config: expected a mapping, got {type(d).__name__}")
        bad_keys = sorted(repr(k) for k in d if not isinstance(k, str))
        if bad_keys:
            raise ValueError(f"config: field names must be strings, got {bad_keys}")
        if "model_type" in d or "hidden_size" in d:
            d = _from_hf(d)
        else:
            d = dict(d)
            _check_known(d, "config")
            _resolve_deepseek_rules(d)
        _check_known(overrides, "overrides")
        d.update(overrides)
        return cls(**d)

    @classmethod
    def from_json(cls, path: str | os.PathLike, **overrides: Any) -> ModelArgs:
        """Load a DeepSeek config file as it is, or a Hugging Face ``config.json``.

        Every error names the file: unreadable or invalid JSON (empty, truncated, a key given
        twice), a top level that is not an object, and each field :meth:`from_dict` refuses.
        """
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path: expected a str or os.PathLike, got {type(path).__name__}")
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not a UTF-8 JSON file ({e})") from None
        try:
            d = json.loads(text, object_pairs_hook=_no_duplicate_keys)
        except json.JSONDecodeError as e:
            what = "the file is empty" if not text.strip() else str(e)
            raise ValueError(f"{path}: not valid JSON: {what}") from None
        except ValueError as e:  # a duplicate key
            raise ValueError(f"{path}: {e}") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a JSON object at the top level, got {type(d).__name__}")
        try:
            return cls.from_dict(d, **overrides)
        except (ValueError, TypeError) as e:
            raise (TypeError if isinstance(e, TypeError) else ValueError)(f"{path}: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(name_or_path: str | os.PathLike, **overrides: Any) -> ModelArgs:
    """A preset name (``"deepseek-v3"``, ``"deepseek-v2-lite"``, ``"tiny"``) or a JSON path."""
    if isinstance(name_or_path, str) and name_or_path in PRESETS:
        return ModelArgs.from_name(name_or_path, **overrides)
    return ModelArgs.from_json(name_or_path, **overrides)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"field {k!r} appears twice")
        out[k] = v
    return out


def _resolve_deepseek_rules(d: dict[str, Any]) -> None:
    """Decide DeepSeek's two implicit switches once, from the file's own values: YaRN iff
    max_seq_len > original_seq_len, a gate bias iff dim == 7168 (unless the file sets them)."""
    defaults = {f.name: f.default for f in fields(ModelArgs)}
    longest, original, dim = (d.get(k, defaults[k]) for k in ("max_seq_len", "original_seq_len", "dim"))
    if "yarn" not in d and _is_int(longest) and _is_int(original):
        d["yarn"] = longest > original
    if "gate_bias" not in d and _is_int(dim):
        d["gate_bias"] = dim == 7168


# --------------------------------------------------------------------------- validation
_FIELD_NAMES = {f.name for f in fields(ModelArgs)}
_POSITIVE_INTS = (
    "max_batch_size", "max_seq_len", "vocab_size", "dim", "inter_dim", "moe_inter_dim",
    "n_layers", "n_heads", "n_routed_experts", "n_activated_experts", "n_expert_groups",
    "n_limited_groups", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
    "original_seq_len",
)
_NON_NEGATIVE_INTS = ("n_dense_layers", "n_shared_experts", "q_lora_rank")
_POSITIVE_FLOATS = ("route_scale", "rope_theta", "rope_factor", "beta_fast", "beta_slow", "rope_attention_factor")
_NON_NEGATIVE_FLOATS = ("mscale",)
_CHOICES = {
    "dtype": ("bf16", "fp8"),
    "score_func": ("softmax", "sigmoid"),
    "scale_fmt": (None, "ue8m0"),
    "backend": ("auto", "triton", "reference"),
    "gate_bias": (None, True, False),
    "yarn": (None, True, False),
    "train_fp8": (True, False),
}


def _check_known(d: Mapping[str, Any], where: str) -> None:
    unknown = sorted(set(d) - _FIELD_NAMES)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; ModelArgs has {sorted(_FIELD_NAMES)}")


def _fail(field: str, msg: str) -> None:
    raise ValueError(f"ModelArgs.{field}: {msg}")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    """A finite int or float (not a bool)."""
    return _is_int(v) or (isinstance(v, float) and math.isfinite(v))


def _validate(a: ModelArgs) -> None:
    for name in _POSITIVE_INTS + _NON_NEGATIVE_INTS:
        v = getattr(a, name)
        if not _is_int(v):
            _fail(name, f"expected an int, got {v!r} ({type(v).__name__})")
        if v < 0 or (v == 0 and name in _POSITIVE_INTS):
            _fail(name, f"expected {'> 0' if name in _POSITIVE_INTS else '>= 0'}, got {v}")
    for name in _POSITIVE_FLOATS + _NON_NEGATIVE_FLOATS:
        v, positive = getattr(a, name), name in _POSITIVE_FLOATS
        if not _is_number(v) or v < 0 or (positive and v == 0):
            _fail(name, f"expected a finite number {'> 0' if positive else '>= 0'}, got {v!r}")
    for name, choices in _CHOICES.items():
        v = getattr(a, name)
        # identity for None/bools (1 == True), equality for strings
        if not any(v is c if c is None or isinstance(c, bool) else (isinstance(v, str) and v == c) for c in choices):
            _fail(name, f"expected one of {choices}, got {v!r} ({type(v).__name__})")
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
    if a.train_fp8 and a.dtype == "fp8":
        _fail("train_fp8", "trains from floating-point master weights (re-quantized to e4m3 at every step); "
              "dtype='fp8' holds e4m3 weights, which cannot train: use dtype='bf16' with train_fp8=True")
    if a.qk_rope_head_dim % 2:
        _fail("qk_rope_head_dim", f"RoPE rotates pairs, so it must be even, got {a.qk_rope_head_dim}")


# --------------------------------------------------------------------------- Hugging Face configs
#: Fields of Hugging Face DeepSeek configs that never enter the layers' math, ignored on reading:
#: file and tokenizer bookkeeping, transformers 4's generation defaults, training-only losses,
#: DeepSeek's remote-code parallelism, the multi-token-prediction module (an extra checkpoint
#: layer moela does not model), and MLA's unused ``num_key_value_heads``/``pretraining_tp``.
HF_IGNORED_FIELDS = frozenset({
    # files, dtypes and ids
    "architectures", "auto_map", "_name_or_path", "_commit_hash", "_attn_implementation",
    "_attn_implementation_autoset", "_experts_implementation", "transformers_version", "torch_dtype", "dtype",
    "use_bfloat16", "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
    "tokenizer_class", "prefix", "task_specific_params", "finetuning_task", "id2label", "label2id", "problem_type",
    # outputs and caching
    "use_cache", "output_router_logits", "output_hidden_states", "output_attentions", "return_dict", "torchscript",
    # transformers' generic model flags (no DeepSeek model reads them)
    "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "add_cross_attention",
    "cross_attention_hidden_size", "tie_encoder_decoder", "pruned_heads", "tf_legacy_loss",
    # transformers 4's generation defaults
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
    "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
    # initialisation, training losses, parallelism, MTP
    "initializer_range", "aux_loss_alpha", "seq_aux", "router_aux_loss_coef", "ep_size",
    "num_nextn_predict_layers", "num_mtp_layers",
    # MLA expands keys and values per head; DeepSeek's modeling never reads pretraining_tp
    "num_key_value_heads", "pretraining_tp",
})

_HF_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")
# HF name -> ModelArgs field, for the ints every HF DeepSeek config states
_HF_INTS = {
    "vocab_size": "vocab_size", "hidden_size": "dim", "intermediate_size": "inter_dim",
    "moe_intermediate_size": "moe_inter_dim", "num_hidden_layers": "n_layers",
    "first_k_dense_replace": "n_dense_layers", "num_attention_heads": "n_heads",
    "n_routed_experts": "n_routed_experts", "num_experts_per_tok": "n_activated_experts",
    "kv_lora_rank": "kv_lora_rank", "qk_nope_head_dim": "qk_nope_head_dim",
    "qk_rope_head_dim": "qk_rope_head_dim", "v_head_dim": "v_head_dim",
}
_HF_NULL_IS_ZERO = {"q_lora_rank": "q_lora_rank", "n_shared_experts": "n_shared_experts"}  # null: none
_HF_REQUIRED = (*_HF_INTS, *_HF_NULL_IS_ZERO, "routed_scaling_factor", "max_position_embeddings")
# fields whose only values moela computes (absent: transformers' default, the first value)
_HF_FIXED: dict[str, tuple[tuple[Any, ...], str]] = {
    "hidden_act": (("silu", "swish"), "moela's experts are SwiGLU (silu)"),
    "rms_norm_eps": ((1e-6,), "moela's RMSNorm uses eps=1e-6"),
    "attention_bias": ((False,), "moela's attention projections have no bias"),
    "mlp_bias": ((False,), "moela's MLPs have no bias"),
    "tie_word_embeddings": ((False,), "moela's output head is not tied to the embedding"),
    "moe_layer_freq": ((1,), "moela makes every layer after first_k_dense_replace an MoE"),
    "attention_dropout": ((0,), "moela's attention has no dropout"),
    "partial_rotary_factor": ((1,), "moela rotates all qk_rope_head_dim dims"),
    "rope_interleave": ((True,), "moela's RoPE rotates interleaved pairs (x[2j], x[2j+1]); a "
                        "rope_interleave=false checkpoint rotates halves (x[j], x[j+R/2]) and would need its "
                        "rotary rows of q_proj/q_b_proj and kv_a_proj_with_mqa permuted, which moela does not do"),
}
_HF_HANDLED = frozenset({
    *_HF_REQUIRED, *_HF_FIXED, "model_type", "n_group", "topk_group", "scoring_func", "topk_method",
    "norm_topk_prob", "rope_theta", "rope_scaling", "rope_parameters", "quantization_config", "head_dim",
    "qk_head_dim",
})
_ROPE_KEYS = {
    "default": frozenset({"rope_type", "type", "rope_theta", "partial_rotary_factor"}),
    "yarn": frozenset({"rope_type", "type", "rope_theta", "partial_rotary_factor", "factor",
                       "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
                       "attention_factor", "truncate"}),
}
_QUANT_KEYS = frozenset({"quant_method", "fmt", "activation_scheme", "weight_block_size", "scale_fmt", "dequantize",
                         "modules_to_not_convert", "modules_to_convert", "expert_dtype"})


def _same(v: object, allowed: tuple[Any, ...]) -> bool:
    """``v`` equals one of ``allowed``, a bool only a bool and a number only a number."""
    for a in allowed:
        if isinstance(a, bool) or a is None:
            if v is a:
                return True
        elif isinstance(a, str):
            if isinstance(v, str) and v == a:
                return True
        elif _is_number(v) and v == a:
            return True
    return False


def _hf_int(key: str, v: object) -> int:
    if not _is_int(v):
        raise ValueError(f"config: {key}: expected an int, got {v!r} ({type(v).__name__})")
    return v


def _hf_number(key: str, v: object) -> float:
    if not _is_number(v):
        raise ValueError(f"config: {key}: expected a finite number, got {v!r} ({type(v).__name__})")
    return v


def _hf_optional_number(key: str, v: object) -> float | None:
    return None if v is None else _hf_number(key, v)


def _hf_mapping(key: str, v: object) -> Mapping[str, Any] | None:
    if v is not None and not isinstance(v, Mapping):
        raise ValueError(f"config: {key}: expected an object or null, got {v!r} ({type(v).__name__})")
    return v


def _from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    """Translate a Hugging Face DeepSeek-V2/V3 ``config.json`` dict (transformers 4 or 5) into ModelArgs fields."""
    model_type = hf.get("model_type")
    if not _same(model_type, _HF_MODEL_TYPES):
        raise ValueError(f"config: model_type: expected one of {_HF_MODEL_TYPES} (a Hugging Face DeepSeek-V2/V3 "
                         f"config), got {model_type!r}")
    unknown = sorted(set(hf) - _HF_HANDLED - HF_IGNORED_FIELDS)
    if unknown:
        raise ValueError(f"config: unknown Hugging Face field(s) {unknown}: moela cannot tell whether they change "
                         f"the model (ignored bookkeeping fields: moela.reference.config.HF_IGNORED_FIELDS)")
    missing = [k for k in _HF_REQUIRED if k not in hf]
    if missing:
        raise ValueError(f"config: {model_type} field(s) {missing} missing (transformers' DeepSeek configs "
                         "always state them)")
    for key, (allowed, why) in _HF_FIXED.items():
        if key in hf and not _same(hf[key], allowed):
            raise ValueError(f"config: {key}={hf[key]!r} is not supported: {why}")

    d: dict[str, Any] = {ours: _hf_int(theirs, hf[theirs]) for theirs, ours in _HF_INTS.items()}
    for theirs, ours in _HF_NULL_IS_ZERO.items():
        d[ours] = 0 if hf[theirs] is None else _hf_int(theirs, hf[theirs])
    d["route_scale"] = _hf_number("routed_scaling_factor", hf["routed_scaling_factor"])
    max_pos = _hf_int("max_position_embeddings", hf["max_position_embeddings"])
    derived = {"head_dim": d["qk_rope_head_dim"], "qk_head_dim": d["qk_nope_head_dim"] + d["qk_rope_head_dim"]}
    for key, want in derived.items():  # transformers recomputes both; a different value means another model
        if hf.get(key) is not None and not _same(hf[key], (want,)):
            raise ValueError(f"config: {key}={hf[key]!r} disagrees with the head dims (expected {want})")
    d.update(_hf_router(hf, model_type))
    d.update(_hf_rope(hf, max_pos))
    d.update(_hf_quant(_hf_mapping("quantization_config", hf.get("quantization_config"))))
    return d


def _hf_router(hf: Mapping[str, Any], model_type: str) -> dict[str, Any]:
    """The gate of transformers' DeepseekV3TopkRouter / DeepseekV2TopkRouter in ModelArgs terms."""
    scoring, method, norm = hf.get("scoring_func"), hf.get("topk_method"), hf.get("norm_topk_prob")
    for key, v in (("scoring_func", scoring), ("topk_method", method)):
        if v is not None and not isinstance(v, str):
            raise ValueError(f"config: {key}: expected a string, got {v!r} ({type(v).__name__})")
    if norm is not None and not isinstance(norm, bool):
        raise ValueError(f"config: norm_topk_prob: expected true or false, got {norm!r} ({type(norm).__name__})")
    out: dict[str, Any] = {}
    if model_type == "deepseek_v3":
        # always sigmoid scores, e_score_correction_bias for selection, groups scored by their top-2
        if scoring not in (None, "sigmoid"):
            raise ValueError(f"config: scoring_func={scoring!r}: transformers' deepseek_v3 router is always sigmoid")
        if method not in (None, "noaux_tc"):
            raise ValueError(f"config: topk_method={method!r}: transformers' deepseek_v3 router is always "
                             "'noaux_tc' (sigmoid with a correction bias)")
        if norm is not True and "norm_topk_prob" in hf:
            raise ValueError(f"config: norm_topk_prob={norm!r} is not supported: moela's sigmoid gate always "
                             "normalises the top-k weights to sum 1 (DeepSeek's gate)")
        out.update(score_func="sigmoid", gate_bias=True)
        grouped = True
    else:
        # softmax scores, no bias; "greedy" ignores the groups, "group_limited_greedy" keeps the best groups by max
        method = "greedy" if method is None else method
        if scoring not in (None, "softmax"):
            raise ValueError(f"config: scoring_func={scoring!r}: a deepseek_v2 router is softmax")
        if method not in ("greedy", "group_limited_greedy"):
            raise ValueError(f"config: topk_method={method!r}: a deepseek_v2 router is 'greedy' or "
                             "'group_limited_greedy'")
        if norm:
            raise ValueError("config: norm_topk_prob=true is not supported for deepseek_v2: transformers 5 ignores "
                             "it while DeepSeek's own code normalises, and moela's softmax gate does not")
        out.update(score_func="softmax", gate_bias=False)
        grouped = method == "group_limited_greedy"
    for key in ("n_group", "topk_group"):
        if hf.get(key) is not None:
            _hf_int(key, hf[key])
    out["n_expert_groups"] = out["n_limited_groups"] = 1
    if grouped:
        for key, ours in (("n_group", "n_expert_groups"), ("topk_group", "n_limited_groups")):
            if key not in hf:
                raise ValueError(f"config: {key} missing (the {model_type} router's groups)")
            out[ours] = 1 if hf[key] is None else hf[key]
    return out


def _hf_rope(hf: Mapping[str, Any], max_pos: int) -> dict[str, Any]:
    """RoPE and YaRN fields from transformers 4's ``rope_scaling`` + ``rope_theta`` or 5's ``rope_parameters``.

    Reproduces transformers' ``_compute_yarn_parameters`` and ``yarn_apply_mscale``: the softmax
    scale gets ``mscale_all_dim``'s factor (none without it), the cos/sin are multiplied by
    ``attention_factor`` (given, or ``m(mscale)/m(mscale_all_dim)`` when both are set, else
    ``m(1)``, with ``m(x) = 0.1·x·ln(factor) + 1`` and 1 for factor <= 1).
    """
    scaling = _hf_mapping("rope_scaling", hf.get("rope_scaling"))
    params = _hf_mapping("rope_parameters", hf.get("rope_parameters"))
    if scaling and params:
        clash = sorted(k for k in set(scaling) & set(params) if scaling[k] != params[k])
        if clash:
            raise ValueError(f"config: rope_scaling and rope_parameters disagree on {clash}")
    where = "rope_scaling" if scaling else "rope_parameters"
    rope = dict(scaling or params or {})  # transformers' precedence: rope_scaling, then rope_parameters
    if "rope_type" in rope and "type" in rope and rope["rope_type"] != rope["type"]:
        raise ValueError(f"config: {where}: rope_type={rope['rope_type']!r} and type={rope['type']!r} disagree")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if not _same(kind, tuple(_ROPE_KEYS)):
        raise ValueError(f"config: {where}.rope_type: expected 'default' or 'yarn' (DeepSeek's RoPE), got {kind!r}")
    extra = sorted(set(rope) - _ROPE_KEYS[kind])
    if extra:
        raise ValueError(f"config: {where}: field(s) {extra} are not understood with rope_type {kind!r}")
    if "rope_theta" in rope and "rope_theta" in hf and rope["rope_theta"] != hf["rope_theta"]:
        raise ValueError(f"config: rope_theta={hf['rope_theta']!r} and {where}.rope_theta={rope['rope_theta']!r} "
                         "disagree")
    if "partial_rotary_factor" in rope and not _same(rope["partial_rotary_factor"], (1,)):
        raise ValueError(f"config: {where}.partial_rotary_factor={rope['partial_rotary_factor']!r} is not "
                         "supported: moela rotates all qk_rope_head_dim dims")
    theta = _hf_number(f"{where}.rope_theta", rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    cap = min(ModelArgs.max_seq_len, max_pos)  # DeepSeek's default length, or the model's if shorter
    if kind == "default":
        return {"rope_theta": theta, "yarn": False, "original_seq_len": max_pos, "max_seq_len": cap}

    if "factor" not in rope:
        raise ValueError(f"config: {where}.factor missing (YaRN's scaling factor)")
    factor = _hf_number(f"{where}.factor", rope["factor"])
    if factor <= 0:
        raise ValueError(f"config: {where}.factor: expected > 0, got {factor}")
    original = _hf_int(f"{where}.original_max_position_embeddings",
                       rope.get("original_max_position_embeddings", max_pos))
    if "truncate" in rope and rope["truncate"] is not True:
        raise ValueError(f"config: {where}.truncate={rope['truncate']!r} is not supported: moela's YaRN rounds "
                         "the correction range outwards (truncate=true)")
    beta_fast = _hf_optional_number(f"{where}.beta_fast", rope.get("beta_fast")) or 32
    beta_slow = _hf_optional_number(f"{where}.beta_slow", rope.get("beta_slow")) or 1
    mscale = _hf_optional_number(f"{where}.mscale", rope.get("mscale"))
    mscale_all_dim = _hf_optional_number(f"{where}.mscale_all_dim", rope.get("mscale_all_dim"))
    attention_factor = _hf_optional_number(f"{where}.attention_factor", rope.get("attention_factor"))

    def m(x: float) -> float:
        return 1.0 if factor <= 1 else 0.1 * x * math.log(factor) + 1.0

    if attention_factor is None:
        attention_factor = m(mscale) / m(mscale_all_dim) if mscale and mscale_all_dim else m(1.0)
    return {
        "rope_theta": theta, "yarn": True, "rope_factor": factor, "original_seq_len": original,
        "max_seq_len": cap, "beta_fast": beta_fast, "beta_slow": beta_slow,
        "mscale": mscale_all_dim if mscale_all_dim and factor > 1 else 0.0,
        "rope_attention_factor": float(attention_factor),
    }


def _hf_quant(q: Mapping[str, Any] | None) -> dict[str, Any]:
    """``quantization_config``: DeepSeek's FP8 (e4m3 weights, 128×128 blocks, dynamic activations) or none."""
    if q is None:
        return {}
    method = q.get("quant_method")
    if not _same(method, ("fp8",)):
        raise ValueError(f"config: quantization_config.quant_method={method!r}: only 'fp8' (DeepSeek's 128×128 "
                         "block FP8) is supported")
    extra = sorted(set(q) - _QUANT_KEYS)
    if extra:
        raise ValueError(f"config: quantization_config: unknown field(s) {extra}")
    block = q.get("weight_block_size", [128, 128])
    checks = (
        ("fmt", q.get("fmt", "e4m3"), ("e4m3",)),
        ("activation_scheme", q.get("activation_scheme", "dynamic"), ("dynamic",)),
        ("dequantize", q.get("dequantize", False), (False,)),
        ("expert_dtype", q.get("expert_dtype", "fp8"), ("fp8",)),
        ("scale_fmt", q.get("scale_fmt"), (None, "float", "ue8m0")),
    )
    for key, v, allowed in checks:
        if not _same(v, allowed):
            raise ValueError(f"config: quantization_config.{key}={v!r}: expected one of {allowed}")
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(_same(b, (128,)) for b in block)):
        raise ValueError(f"config: quantization_config.weight_block_size={block!r}: expected [128, 128]")
    for key in ("modules_to_not_convert", "modules_to_convert"):
        if q.get(key):
            raise ValueError(f"config: quantization_config.{key}={q[key]!r}: moela quantizes every projection and "
                             "expert, and nothing else (the embedding, norms, gate and head stay in bf16)")
    return {"dtype": "fp8", "scale_fmt": "ue8m0" if q.get("scale_fmt") == "ue8m0" else None}


# --------------------------------------------------------------------------- presets
PRESETS: dict[str, ModelArgs] = {
    # DeepSeek-V3 / R1, 671B (configs/config_671B.json)
    "deepseek-v3": ModelArgs(
        vocab_size=129280, dim=7168, inter_dim=18432, moe_inter_dim=2048, n_layers=61,
        n_dense_layers=3, n_heads=128, n_routed_experts=256, n_shared_experts=1,
        n_activated_experts=8, n_expert_groups=8, n_limited_groups=4, route_scale=2.5,
        score_func="sigmoid", q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, dtype="fp8", yarn=True, gate_bias=True,
    ),
    # DeepSeek-V2-Lite, 16B (configs/config_16B.json)
    "deepseek-v2-lite": ModelArgs(
        vocab_size=102400, dim=2048, inter_dim=10944, moe_inter_dim=1408, n_layers=27,
        n_dense_layers=1, n_heads=16, n_routed_experts=64, n_shared_experts=2,
        n_activated_experts=6, route_scale=1.0, q_lora_rank=0, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, mscale=0.707, yarn=True, gate_bias=False,
    ),
    # Small enough for CPU tests; every feature on: groups, bias, sigmoid, q LoRA, YaRN (by
    # DeepSeek's length rule, so that a test turns it off with max_seq_len <= original_seq_len).
    "tiny": ModelArgs(
        max_batch_size=4, max_seq_len=64, vocab_size=256, dim=64, inter_dim=128,
        moe_inter_dim=32, n_layers=2, n_dense_layers=1, n_heads=4, n_routed_experts=16,
        n_shared_experts=1, n_activated_experts=4, n_expert_groups=4, n_limited_groups=2,
        score_func="sigmoid", route_scale=2.5, q_lora_rank=32, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, original_seq_len=32,
        rope_factor=4.0, gate_bias=True,
    ),
}
