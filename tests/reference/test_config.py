"""ModelArgs: presets, DeepSeek's config JSON files as they are, and clear errors."""

import json

import pytest

from moela.reference import PRESETS, ModelArgs, load_config

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
# The DeepSeek-V3 Hugging Face config.json (the fields that matter).
HF_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "hidden_size": 7168, "intermediate_size": 18432,
    "moe_intermediate_size": 2048, "num_hidden_layers": 61, "first_k_dense_replace": 3,
    "num_attention_heads": 128, "n_routed_experts": 256, "n_shared_experts": 1,
    "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4, "scoring_func": "sigmoid",
    "routed_scaling_factor": 2.5, "topk_method": "noaux_tc", "norm_topk_prob": True,
    "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "rope_theta": 10000, "vocab_size": 129280, "max_position_embeddings": 163840,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                     "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
}


@pytest.mark.parametrize("name,raw", [("deepseek-v3", CONFIG_671B), ("deepseek-v2-lite", CONFIG_16B)])
def test_deepseek_json_loads_as_is(tmp_path, name, raw):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    args = ModelArgs.from_json(path)
    for key, value in raw.items():
        assert getattr(args, key) == value, key
    assert args == PRESETS[name]
    assert load_config(str(path)) == args
    assert load_config(name) == args


def test_v3_dims_and_derived_values():
    v3 = ModelArgs.from_name("deepseek-v3")
    assert (v3.dim, v3.moe_inter_dim, v3.n_routed_experts, v3.n_activated_experts) == (7168, 2048, 256, 8)
    assert (v3.n_expert_groups, v3.n_limited_groups, v3.score_func, v3.route_scale) == (8, 4, "sigmoid", 2.5)
    assert v3.has_gate_bias and v3.experts_per_group == 32 and v3.qk_head_dim == 192
    lite = ModelArgs.from_name("deepseek-v2-lite")
    assert not lite.has_gate_bias and lite.score_func == "softmax" and lite.n_expert_groups == 1
    # YaRN: max_seq_len 16384 > 4096, softmax scale times mscale^2 (DeepSeek's formula)
    m = 0.1 * 0.707 * __import__("math").log(40) + 1
    assert lite.softmax_scale == pytest.approx(192**-0.5 * m * m)
    assert ModelArgs.from_name("deepseek-v2-lite", max_seq_len=4096).softmax_scale == pytest.approx(192**-0.5)


def test_hf_config_translates():
    args = ModelArgs.from_dict(HF_V3)
    v3 = PRESETS["deepseek-v3"]
    same = ("dim", "inter_dim", "moe_inter_dim", "n_layers", "n_dense_layers", "n_heads", "n_routed_experts",
            "n_shared_experts", "n_activated_experts", "n_expert_groups", "n_limited_groups", "score_func",
            "route_scale", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
            "v_head_dim", "original_seq_len", "rope_factor", "beta_fast", "beta_slow", "mscale", "dtype")
    for f in same:
        assert getattr(args, f) == getattr(v3, f), f
    assert args.has_gate_bias


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
        ({"dtype": "fp16"}, "dtype"),
        ({"scale_fmt": "e8m0"}, "scale_fmt"),
        ({"backend": "cuda"}, "backend"),
        ({"n_dense_layers": 3}, "n_dense_layers"),
        ({"q_lora_rank": -1}, "q_lora_rank"),
        ({"n_routed_experts": 4, "n_expert_groups": 4, "n_limited_groups": 4}, "n_expert_groups"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_invalid_combinations_name_the_field(changes, field):
    with pytest.raises(ValueError, match=rf"ModelArgs\.{field}\b"):
        ModelArgs.from_name("tiny", **changes)


def test_unknown_fields_and_names_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="n_experts"):
        ModelArgs.from_dict({**CONFIG_16B, "n_experts": 3})
    with pytest.raises(ValueError, match="unknown config name"):
        ModelArgs.from_name("deepseek-v4")
    with pytest.raises(TypeError, match="mapping"):
        ModelArgs.from_dict([1, 2])


def test_presets_are_frozen_and_replace_revalidates():
    tiny = ModelArgs.from_name("tiny")
    with pytest.raises(Exception):  # noqa: B017 - dataclasses.FrozenInstanceError
        tiny.dim = 3
    assert tiny.replace(n_activated_experts=2).n_activated_experts == 2
    with pytest.raises(ValueError, match="n_activated_experts"):
        tiny.replace(n_activated_experts=100)


def test_hf_rope_scaling_that_modelargs_cannot_express_is_refused():
    linear = {**HF_V3, "rope_scaling": {**HF_V3["rope_scaling"], "type": "linear"}}
    with pytest.raises(ValueError, match="rope_scaling"):
        ModelArgs.from_dict(linear)
    split = {**HF_V3, "rope_scaling": {**HF_V3["rope_scaling"], "mscale": 0.707}}
    with pytest.raises(ValueError, match="mscale_all_dim"):
        ModelArgs.from_dict(split)
