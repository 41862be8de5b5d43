"""ModelArgs: presets, DeepSeek's and Hugging Face's (transformers 4 and 5) config files, clear errors."""

import json
import math
import re

import pytest

from moela.reference import PRESETS, ModelArgs, load_config
from moela.reference.config import HF_IGNORED_FIELDS

# DeepSeek-V3 inference/configs/config_671B.json and config_16B.json, verbatim.
CONFIG_671B = {
    "vocab_size": 129280, "dim": 7168, "inter_dim": 18432, "moe_inter_dim": 2048, "n_layers": 61,
    "n_dense_layers": 3, "n_heads": 128, "n_routed_experts": 256, "n_shared_experts": 1,
    "n_activated_experts": 8, "n_expert_groups": 8, "n_limited_groups": 4, "route_scale": 2.5,
    "score_func": "sigmoid", "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "dtype": "fp8",
}
CONFIG_16B = {
    "vocab_size": 102400, "dim": 2048, "inter_dim": 10944, "moe_inter_dim": 1408, "n_layers": 27,
    "n_dense_layers": 1, "n_heads": 16, "n_routed_experts": 64, "n_shared_experts": 2,
    "n_activated_experts": 6, "route_scale": 1.0, "q_lora_rank": 0, "kv_lora_rank": 512,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "mscale": 0.707,
}

# deepseek-ai/DeepSeek-V3 config.json on the Hub (written for transformers 4 and DeepSeek's remote code).
HF_V3_V4 = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                 "AutoModel": "modeling_deepseek.DeepseekV3Model",
                 "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"},
    "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3,
    "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256,
    "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "pretraining_tp": 1,
    "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
}


def _resaved_by_v5(v4):
    """What transformers 5's save_pretrained writes for a v4 file: rope_theta and rope_scaling move into
    rope_parameters (keeping "type"), torch_dtype becomes dtype, and derived fields are written out."""
    out = {k: v for k, v in v4.items() if k not in ("rope_scaling", "rope_theta", "torch_dtype")}
    out.update(dtype="bfloat16", head_dim=v4["qk_rope_head_dim"],
               qk_head_dim=v4["qk_nope_head_dim"] + v4["qk_rope_head_dim"], output_router_logits=False,
               pad_token_id=None, transformers_version="5.25.0",
               rope_parameters={**v4["rope_scaling"], "rope_theta": v4["rope_theta"], "rope_type": "yarn"})
    if v4["model_type"] == "deepseek_v3":
        out["rope_interleave"] = True
    else:
        out["mlp_bias"] = False
    return out


HF_V3_V5 = _resaved_by_v5(HF_V3_V4)
# transformers 5's own DeepseekV3Config writes neither scoring_func nor topk_method (its router is fixed)
HF_V3_V5_NATIVE = {k: v for k, v in HF_V3_V5.items()
                   if k not in ("scoring_func", "topk_method", "auto_map", "aux_loss_alpha", "seq_aux", "ep_size",
                                "moe_layer_freq")}
HF_V3_V5_NULL_SCALING = {**HF_V3_V5, "rope_scaling": None}

# deepseek-ai/DeepSeek-V2-Lite config.json on the Hub.
HF_V2_LITE_V4 = {
    "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001, "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 10944,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v2",
    "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64,
    "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 16, "num_experts_per_tok": 6,
    "num_hidden_layers": 27, "num_key_value_heads": 16, "pretraining_tp": 1, "q_lora_rank": None,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16",
    "transformers_version": "4.39.3", "use_cache": True, "v_head_dim": 128, "vocab_size": 102400,
}
HF_V2_LITE_V5 = _resaved_by_v5(HF_V2_LITE_V4)

SAME_MODEL = {
    "deepseek-v3": [("deepseek", CONFIG_671B), ("hf-v4", HF_V3_V4), ("hf-v5", HF_V3_V5),
                    ("hf-v5-native", HF_V3_V5_NATIVE), ("hf-v5-null-rope_scaling", HF_V3_V5_NULL_SCALING)],
    "deepseek-v2-lite": [("deepseek", CONFIG_16B), ("hf-v4", HF_V2_LITE_V4), ("hf-v5", HF_V2_LITE_V5)],
}
SAME_MODEL_CASES = [(name, fmt, raw) for name, files in SAME_MODEL.items() for fmt, raw in files]


def _write(tmp_path, raw, name="config.json"):
    path = tmp_path / name
    path.write_text(json.dumps(raw) if not isinstance(raw, str) else raw)
    return path


def _rope(base=HF_V3_V5, **changes):
    """HF_V3_V5 with its rope_parameters changed (None removes a field)."""
    rope = {**base["rope_parameters"], **changes}
    return {**base, "rope_parameters": {k: v for k, v in rope.items() if v is not None}}


# --------------------------------------------------------------------------- same model, every layout
@pytest.mark.parametrize("name,fmt,raw", SAME_MODEL_CASES, ids=[f"{n}-{f}" for n, f, _ in SAME_MODEL_CASES])
def test_every_layout_of_a_model_gives_the_same_args(tmp_path, name, fmt, raw):
    args = ModelArgs.from_json(_write(tmp_path, raw))
    assert args == PRESETS[name]
    assert args.uses_yarn and args.rope_attention_factor == 1.0
    assert load_config(str(tmp_path / "config.json")) == args
    assert ModelArgs.from_dict(args.to_dict()) == args  # moela's own layout round-trips


@pytest.mark.parametrize("name,raw", [("deepseek-v3", CONFIG_671B), ("deepseek-v2-lite", CONFIG_16B)])
def test_deepseek_json_loads_as_is(tmp_path, name, raw):
    args = ModelArgs.from_json(_write(tmp_path, raw))
    for key, value in raw.items():
        assert getattr(args, key) == value, key
    assert load_config(name) == args


def test_v3_dims_and_derived_values():
    v3 = ModelArgs.from_name("deepseek-v3")
    assert (v3.dim, v3.moe_inter_dim, v3.n_routed_experts, v3.n_activated_experts) == (7168, 2048, 256, 8)
    assert (v3.n_expert_groups, v3.n_limited_groups, v3.score_func, v3.route_scale) == (8, 4, "sigmoid", 2.5)
    assert v3.has_gate_bias and v3.experts_per_group == 32 and v3.qk_head_dim == 192
    lite = ModelArgs.from_name("deepseek-v2-lite")
    assert not lite.has_gate_bias and lite.score_func == "softmax" and lite.n_expert_groups == 1
    m = 0.1 * 0.707 * math.log(40) + 1  # DeepSeek's softmax scale under YaRN: × mscale²
    assert lite.softmax_scale == pytest.approx(192**-0.5 * m * m, rel=1e-15)


def test_yarn_is_a_property_of_the_model_not_of_the_cache_length(tmp_path):
    # a loaded model keeps YaRN (and its gate bias) when a shorter cache is asked for
    lite = ModelArgs.from_json(_write(tmp_path, CONFIG_16B), max_seq_len=4096)
    assert lite.max_seq_len == 4096 and lite.uses_yarn
    assert ModelArgs.from_name("deepseek-v3", max_seq_len=2048, dim=1024).has_gate_bias
    # DeepSeek's rule decides from the file's own lengths, and "yarn" can say it outright
    assert not ModelArgs.from_dict({**CONFIG_16B, "max_seq_len": 4096}).uses_yarn
    assert ModelArgs.from_dict({**CONFIG_16B, "max_seq_len": 4096, "yarn": True}).uses_yarn
    assert not ModelArgs.from_dict({**CONFIG_16B, "yarn": False}).uses_yarn
    # yarn=None keeps DeepSeek's length rule at every replace (the tiny preset's)
    tiny = ModelArgs.from_name("tiny")
    assert tiny.yarn is None and tiny.uses_yarn and not tiny.replace(max_seq_len=32).uses_yarn
    assert tiny.replace(max_seq_len=32).softmax_scale == pytest.approx(tiny.qk_head_dim**-0.5, rel=1e-15)


def test_hf_yarn_is_decided_by_the_rope_type_not_by_lengths():
    """A YaRN model whose original length is >= DeepSeek's default max_seq_len (16384) keeps YaRN."""
    long = ModelArgs.from_dict(_rope(original_max_position_embeddings=32768, factor=4))
    assert long.uses_yarn and long.original_seq_len == 32768 and long.max_seq_len == 16384
    assert long.softmax_scale > long.qk_head_dim**-0.5
    plain = ModelArgs.from_dict({**HF_V3_V5, "rope_parameters": {"rope_type": "default", "rope_theta": 50000.0},
                                 "max_position_embeddings": 65536})
    assert not plain.uses_yarn and plain.rope_theta == 50000.0 and plain.max_seq_len == 16384
    assert plain.softmax_scale == pytest.approx(192**-0.5, rel=1e-15)
    short = ModelArgs.from_dict({**HF_V3_V5, "rope_parameters": {"rope_type": "default"},
                                 "max_position_embeddings": 2048})
    assert short.max_seq_len == 2048 and short.rope_theta == 10000.0  # transformers' default theta


def test_hf_v5_rope_parameters_are_read():
    """The bug this replaced: v5's rope_parameters ignored, YaRN off, theta 10000, softmax scale 0.0722."""
    args = ModelArgs.from_dict(_rope(rope_theta=50000.0))
    assert args.rope_theta == 50000.0 and args.uses_yarn and args.rope_factor == 40
    assert args.softmax_scale == pytest.approx(192**-0.5 * (0.1 * math.log(40) + 1) ** 2, rel=1e-15)
    assert args.softmax_scale == pytest.approx(0.1352, abs=1e-4)


def _m(x, factor=40.0):
    return 0.1 * x * math.log(factor) + 1.0


@pytest.mark.parametrize(
    "rope,softmax_mscale,attention_factor",
    [
        ({"mscale": 1.0, "mscale_all_dim": 1.0}, _m(1.0), 1.0),
        ({"mscale": 0.707, "mscale_all_dim": 0.707}, _m(0.707), 1.0),
        # mscale without mscale_all_dim: transformers leaves the softmax alone and scales cos/sin by m(1)
        ({"mscale": 0.707, "mscale_all_dim": None}, 1.0, _m(1.0)),
        ({"mscale": None, "mscale_all_dim": 0.8}, _m(0.8), _m(1.0)),
        ({"mscale": 1.0, "mscale_all_dim": 0.5}, _m(0.5), _m(1.0) / _m(0.5)),
        ({"mscale": None, "mscale_all_dim": None}, 1.0, _m(1.0)),
        ({"mscale": 0.0, "mscale_all_dim": 0.5}, _m(0.5), _m(1.0)),  # mscale 0 is "unset" to transformers
        ({"mscale": 1.0, "mscale_all_dim": 1.0, "attention_factor": 1.25}, _m(1.0), 1.25),
        ({"mscale": 1.0, "mscale_all_dim": 1.0, "factor": 0.5}, 1.0, 1.0),  # factor <= 1: m = 1
    ],
    ids=["equal", "equal-0.707", "mscale-only", "mscale_all_dim-only", "different", "neither", "mscale-0",
         "attention_factor", "factor<1"],
)
def test_hf_mscale_semantics(rope, softmax_mscale, attention_factor):
    args = ModelArgs.from_dict(_rope(**rope))
    assert args.softmax_scale == pytest.approx(192**-0.5 * softmax_mscale**2, rel=1e-14)
    assert args.rope_attention_factor == pytest.approx(attention_factor, rel=1e-14)


def test_hf_beta_defaults_and_original_length_default():
    args = ModelArgs.from_dict(_rope(beta_fast=0, beta_slow=None, original_max_position_embeddings=None))
    assert (args.beta_fast, args.beta_slow) == (32, 1)  # transformers' `or 32` / `or 1`
    assert args.original_seq_len == HF_V3_V5["max_position_embeddings"]


def test_hf_router_semantics():
    v3 = ModelArgs.from_dict(HF_V3_V5_NATIVE)  # no scoring_func/topk_method: transformers' always-sigmoid router
    assert (v3.score_func, v3.gate_bias, v3.n_expert_groups, v3.n_limited_groups) == ("sigmoid", True, 8, 4)
    small = ModelArgs.from_dict({**HF_V3_V5_NATIVE, "hidden_size": 64, "n_group": None, "topk_group": None})
    assert small.has_gate_bias and small.n_expert_groups == 1  # a bias whatever dim; null groups: none
    greedy = ModelArgs.from_dict({**HF_V2_LITE_V5, "n_group": 8, "topk_group": 3})
    assert (greedy.n_expert_groups, greedy.n_limited_groups, greedy.has_gate_bias) == (1, 1, False)
    limited = ModelArgs.from_dict({**HF_V2_LITE_V5, "n_group": 8, "topk_group": 3,
                                   "topk_method": "group_limited_greedy"})
    assert (limited.n_expert_groups, limited.n_limited_groups, limited.score_func) == (8, 3, "softmax")


def test_hf_quantization_config():
    assert ModelArgs.from_dict(HF_V3_V4).dtype == "fp8"
    no_quant = {k: v for k, v in HF_V3_V4.items() if k != "quantization_config"}
    assert ModelArgs.from_dict(no_quant).dtype == "bf16"
    v31 = {**HF_V3_V4, "quantization_config": {**HF_V3_V4["quantization_config"], "scale_fmt": "ue8m0"}}
    assert ModelArgs.from_dict(v31).scale_fmt == "ue8m0"
    v5_written = {"quant_method": "fp8", "modules_to_not_convert": None, "modules_to_convert": None,
                  "activation_scheme": "dynamic", "weight_block_size": [128, 128], "dequantize": False,
                  "scale_fmt": "float", "expert_dtype": "fp8"}
    args = ModelArgs.from_dict({**HF_V3_V5, "quantization_config": v5_written})
    assert args.dtype == "fp8" and args.scale_fmt is None


def test_overrides_apply_last_and_are_checked(tmp_path):
    args = ModelArgs.from_json(_write(tmp_path, HF_V3_V4), max_seq_len=512, backend="reference", dtype="bf16")
    assert (args.max_seq_len, args.backend, args.dtype) == (512, "reference", "bf16") and args.uses_yarn
    with pytest.raises(ValueError, match=r"config\.json: overrides: unknown field\(s\) \['hidden_size'\]"):
        ModelArgs.from_json(tmp_path / "config.json", hidden_size=3)


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "changes,field",
    [
        ({"n_routed_experts": 10, "n_expert_groups": 4}, "n_expert_groups"),
        ({"n_limited_groups": 5}, "n_limited_groups"),
        ({"n_limited_groups": 1, "n_activated_experts": 5}, "n_activated_experts"),
        ({"qk_rope_head_dim": 7}, "qk_rope_head_dim"),
        ({"score_func": "relu"}, "score_func"),
        ({"dim": 0}, "dim"),
        ({"dim": 64.0}, "dim"),
        ({"n_heads": True}, "n_heads"),
        ({"route_scale": -1.0}, "route_scale"),
        ({"route_scale": float("nan")}, "route_scale"),
        ({"rope_factor": float("inf")}, "rope_factor"),
        ({"rope_theta": "1e4"}, "rope_theta"),
        ({"mscale": -0.1}, "mscale"),
        ({"rope_attention_factor": 0.0}, "rope_attention_factor"),
        ({"dtype": "fp16"}, "dtype"),
        ({"dtype": ["bf16"]}, "dtype"),
        ({"scale_fmt": "e8m0"}, "scale_fmt"),
        ({"backend": "cuda"}, "backend"),
        ({"gate_bias": 1}, "gate_bias"),
        ({"gate_bias": "true"}, "gate_bias"),
        ({"yarn": 0}, "yarn"),
        ({"n_dense_layers": 3}, "n_dense_layers"),
        ({"q_lora_rank": -1}, "q_lora_rank"),
        ({"n_routed_experts": 4, "n_expert_groups": 4, "n_limited_groups": 4}, "n_expert_groups"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_invalid_fields_name_the_field(changes, field):
    with pytest.raises(ValueError, match=rf"ModelArgs\.{field}\b"):
        ModelArgs.from_name("tiny", **changes)


@pytest.mark.parametrize(
    "text,match",
    [
        ("", "not valid JSON: the file is empty"),
        ('{"dim": 64, "n_heads": ', "not valid JSON"),
        ("[1, 2]", "expected a JSON object at the top level, got list"),
        ('{"dim": 64, "dim": 128}', "field 'dim' appears twice"),
        (json.dumps({**CONFIG_16B, "gate_bias": 1}), r"ModelArgs\.gate_bias: .*got 1 \(int\)"),
        (json.dumps({**CONFIG_16B, "n_experts": 3}), r"unknown field\(s\) \['n_experts'\]"),
        (json.dumps({**HF_V3_V4, "rope_scaling": "yarn"}), r"rope_scaling: expected an object or null, got 'yarn'"),
        (json.dumps({**HF_V3_V5, "rope_parameters": 10000}), r"rope_parameters: expected an object or null"),
        (json.dumps({**HF_V3_V4, "hidden_size": "7168"}), r"hidden_size: expected an int, got '7168'"),
        (json.dumps({**HF_V3_V4, "n_group": "8"}), r"n_group: expected an int, got '8'"),
        (json.dumps({**HF_V3_V4, "routed_scaling_factor": None}), r"routed_scaling_factor: expected a finite"),
        (json.dumps({**HF_V3_V4, "quantization_config": "fp8"}), r"quantization_config: expected an object"),
    ],
    ids=["empty", "truncated", "list", "duplicate-key", "gate_bias-1", "unknown-field", "rope_scaling-str",
         "rope_parameters-number", "hidden_size-str", "n_group-str", "route_scale-null", "quant-str"],
)
def test_bad_files_raise_value_errors_naming_the_path(tmp_path, text, match):
    path = _write(tmp_path, text, "broken.json")
    with pytest.raises(ValueError, match=match) as info:
        ModelArgs.from_json(path)
    assert str(path) in str(info.value)


def test_non_utf8_and_missing_files(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes(b'{"dim": "\xe9"}')
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: not a UTF-8 JSON file"):
        ModelArgs.from_json(path)
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        ModelArgs.from_json(tmp_path / "nothing.json")


V3_REFUSED = [
    ({"rope_interleave": False}, r"rope_interleave=False is not supported: .*rotates halves"),
    ({"rope_interleave": None}, r"rope_interleave=None"),
    ({"norm_topk_prob": False}, r"norm_topk_prob=False is not supported"),
    ({"scoring_func": "softmax"}, r"scoring_func='softmax'.*always sigmoid"),
    ({"topk_method": "greedy"}, r"topk_method='greedy'"),
    ({"hidden_act": "gelu"}, r"hidden_act='gelu'"),
    ({"rms_norm_eps": 1e-5}, r"rms_norm_eps=1e-05"),
    ({"tie_word_embeddings": True}, r"tie_word_embeddings=True"),
    ({"attention_bias": True}, r"attention_bias=True"),
    ({"attention_dropout": 0.1}, r"attention_dropout=0.1"),
    ({"moe_layer_freq": 2}, r"moe_layer_freq=2"),
    ({"partial_rotary_factor": 0.5}, r"partial_rotary_factor=0.5"),
    ({"head_dim": 128}, r"head_dim=128 disagrees"),
    ({"index_topk": 2048}, r"unknown Hugging Face field\(s\) \['index_topk'\]"),
    ({"model_type": "deepseek_v32"}, r"model_type: expected one of \('deepseek_v2', 'deepseek_v3'\)"),
    ({"model_type": None}, r"model_type: expected one of"),
    ({"n_group": None, "topk_group": None, "kv_lora_rank": None}, r"kv_lora_rank: expected an int"),
    ({"quantization_config": {"quant_method": "awq"}}, r"quant_method='awq'"),
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [64, 64]}}, r"weight_block_size"),
    ({"quantization_config": {"quant_method": "fp8", "activation_scheme": "static"}}, r"activation_scheme"),
    ({"quantization_config": {"quant_method": "fp8", "modules_to_not_convert": ["model.layers.0.mlp"]}},
     r"modules_to_not_convert"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0}}, r"rope_type: expected 'default' or 'yarn'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, r"rope_parameters\.factor missing"),
    ({"rope_parameters": {**HF_V3_V5["rope_parameters"], "truncate": False}}, r"truncate=False"),
    ({"rope_parameters": {**HF_V3_V5["rope_parameters"], "type": "linear"}}, r"disagree"),
    ({"rope_parameters": {**HF_V3_V5["rope_parameters"], "long_factor": [1.0]}}, r"\['long_factor'\]"),
    ({"rope_parameters": {"rope_type": "default", "factor": 4.0}}, r"\['factor'\] are not understood"),
    ({"rope_parameters": {**HF_V3_V5["rope_parameters"], "partial_rotary_factor": 0.5}}, r"partial_rotary_factor"),
    ({"rope_parameters": {**HF_V3_V5["rope_parameters"], "mscale": "1"}}, r"rope_parameters\.mscale: expected"),
    ({"rope_parameters": {**HF_V3_V5["rope_parameters"], "factor": -2}}, r"rope_parameters\.factor: expected > 0"),
    ({"rope_scaling": {**HF_V3_V5["rope_parameters"], "factor": 4}}, r"rope_scaling and rope_parameters disagree"),
    ({"rope_theta": 50000.0}, r"rope_theta=50000.0 and rope_parameters\.rope_theta=10000 disagree"),
]


@pytest.mark.parametrize("changes,match", V3_REFUSED, ids=[m for _, m in V3_REFUSED])
def test_hf_fields_that_change_the_math_are_refused(changes, match):
    with pytest.raises(ValueError, match=match):
        ModelArgs.from_dict({**HF_V3_V5, **changes})


def test_hf_missing_fields_and_v2_router_refusals():
    missing = {k: v for k, v in HF_V3_V5.items() if k not in ("q_lora_rank", "n_group")}
    with pytest.raises(ValueError, match=r"\['q_lora_rank'\] missing"):
        ModelArgs.from_dict(missing)
    with pytest.raises(ValueError, match=r"n_group missing"):
        ModelArgs.from_dict({**missing, "q_lora_rank": None})
    no_type = {k: v for k, v in HF_V3_V4.items() if k != "model_type"}
    with pytest.raises(ValueError, match="model_type"):
        ModelArgs.from_dict(no_type)
    for changes, match in [({"norm_topk_prob": True}, "norm_topk_prob=true"),
                           ({"scoring_func": "sigmoid"}, "scoring_func='sigmoid'"),
                           ({"topk_method": "noaux_tc"}, "topk_method='noaux_tc'"),
                           ({"mlp_bias": True}, "mlp_bias=True"),
                           ({"topk_method": "group_limited_greedy", "topk_group": "3"}, "topk_group: expected")]:
        with pytest.raises(ValueError, match=match):
            ModelArgs.from_dict({**HF_V2_LITE_V5, **changes})


def test_ignored_fields_are_bookkeeping_only():
    """The ignore list never holds a field that reaches the translation (a silently dropped field)."""
    from moela.reference.config import _HF_HANDLED

    assert not HF_IGNORED_FIELDS & _HF_HANDLED
    assert {"architectures", "torch_dtype", "dtype", "transformers_version", "bos_token_id", "eos_token_id",
            "num_nextn_predict_layers", "num_key_value_heads"} <= HF_IGNORED_FIELDS
    for math_field in ("rope_scaling", "rope_parameters", "norm_topk_prob", "rope_interleave", "scoring_func",
                       "rms_norm_eps", "hidden_act", "tie_word_embeddings", "quantization_config"):
        assert math_field not in HF_IGNORED_FIELDS


def test_unknown_fields_and_names_are_rejected():
    with pytest.raises(ValueError, match="n_experts"):
        ModelArgs.from_dict({**CONFIG_16B, "n_experts": 3})
    with pytest.raises(ValueError, match="unknown config name"):
        ModelArgs.from_name("deepseek-v4")
    with pytest.raises(TypeError, match="mapping"):
        ModelArgs.from_dict([1, 2])
    with pytest.raises(ValueError, match="field names must be strings"):
        ModelArgs.from_dict({1: 2})


def test_presets_are_frozen_and_replace_revalidates():
    tiny = ModelArgs.from_name("tiny")
    with pytest.raises(Exception):  # noqa: B017 - dataclasses.FrozenInstanceError
        tiny.dim = 3
    assert tiny.replace(n_activated_experts=2).n_activated_experts == 2
    with pytest.raises(ValueError, match="n_activated_experts"):
        tiny.replace(n_activated_experts=100)
    with pytest.raises(ValueError, match=r"ModelArgs\.replace: unknown field"):
        tiny.replace(hidden_size=3)
