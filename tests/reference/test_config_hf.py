"""ModelArgs against transformers' own DeepSeek-V2/V3 configs: every field read, the same numbers.

Skipped without transformers 5 (an optional extra). Checks that a config written by
transformers (``to_dict()`` and ``save_pretrained``) loads, and that the RoPE frequencies,
their cos/sin magnitude, the softmax scale and the router's choices equal transformers'.
"""

import math

import pytest
import torch
from hf_testing import import_transformers

transformers = import_transformers()

from transformers.models.deepseek_v2 import modeling_deepseek_v2 as hf_v2  # noqa: E402
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_v3  # noqa: E402

from moela.reference import ModelArgs, gate, precompute_freqs_cis  # noqa: E402
from moela.reference.config import _HF_HANDLED, HF_IGNORED_FIELDS  # noqa: E402

F32_EPS = torch.finfo(torch.float32).eps
DIMS = dict(vocab_size=64, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=4, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
            first_k_dense_replace=1, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
            max_position_embeddings=256)
YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=8.0, original_max_position_embeddings=32, beta_fast=32,
            beta_slow=1)
ROPES = {
    "default": dict(rope_type="default", rope_theta=50000.0),
    "yarn-equal-mscales": dict(YARN, mscale=0.707, mscale_all_dim=0.707),
    "yarn-mscale-only": dict(YARN, mscale=1.0),
    "yarn-mscale_all_dim-only": dict(YARN, mscale_all_dim=0.8),
    "yarn-different-mscales": dict(YARN, mscale=1.0, mscale_all_dim=0.5),
    "yarn-attention_factor": dict(YARN, mscale=1.0, mscale_all_dim=1.0, attention_factor=1.3),
    "yarn-long-original": dict(YARN, original_max_position_embeddings=32768, factor=4.0, mscale_all_dim=1.0),
}


def _v3(rope, **kw):
    return transformers.DeepseekV3Config(**{**DIMS, "q_lora_rank": 32, "n_group": 4, "topk_group": 2, **kw},
                                         rope_parameters=dict(rope))


def _v2(rope, **kw):
    return transformers.DeepseekV2Config(**{**DIMS, "q_lora_rank": None, **kw}, rope_parameters=dict(rope))


MAKERS = {"v3": (_v3, hf_v3.DeepseekV3RotaryEmbedding, hf_v3.DeepseekV3Attention),
          "v2": (_v2, hf_v2.DeepseekV2RotaryEmbedding, hf_v2.DeepseekV2Attention)}


@pytest.mark.parametrize("version", sorted(MAKERS))
@pytest.mark.parametrize("rope", sorted(ROPES))
def test_rope_and_softmax_scale_equal_transformers(tmp_path, version, rope):
    make, rotary_cls, attention_cls = MAKERS[version]
    config = make(ROPES[rope])
    args = ModelArgs.from_dict(config.to_dict())
    config.save_pretrained(tmp_path)
    assert ModelArgs.from_json(tmp_path / "config.json") == args

    assert args.uses_yarn == (rope != "default")
    assert args.softmax_scale == pytest.approx(attention_cls(config, 0).scaling, rel=1e-15)
    rotary = rotary_cls(config)
    table = precompute_freqs_cis(args, 2, dtype=torch.float64)[1]  # position 1: angle θ_j, magnitude
    torch.testing.assert_close(table.angle(), rotary.inv_freq.double(), rtol=4 * F32_EPS, atol=0)
    torch.testing.assert_close(table.abs(), torch.full_like(table.abs(), rotary.attention_scaling),
                               rtol=1e-14, atol=0)
    if rope == "yarn-mscale-only":  # the case moela used to get wrong: softmax unscaled, cos/sin × m(1)
        assert args.softmax_scale == pytest.approx(args.qk_head_dim**-0.5, rel=1e-15)
        assert rotary.attention_scaling == pytest.approx(0.1 * math.log(8.0) + 1, rel=1e-15)


@pytest.mark.parametrize("version", sorted(MAKERS))
def test_every_field_transformers_writes_is_read_or_listed_as_bookkeeping(version):
    config = MAKERS[version][0](ROPES["yarn-equal-mscales"])
    assert not set(config.to_dict()) - _HF_HANDLED - HF_IGNORED_FIELDS


def test_transformers_configs_moela_cannot_compute_are_refused():
    with pytest.raises(ValueError, match="rope_interleave=False"):
        ModelArgs.from_dict(_v3(ROPES["default"], rope_interleave=False).to_dict())
    with pytest.raises(ValueError, match="norm_topk_prob=False"):
        ModelArgs.from_dict(_v3(ROPES["default"], norm_topk_prob=False).to_dict())
    with pytest.raises(ValueError, match="rope_type: expected 'default' or 'yarn'"):
        ModelArgs.from_dict(_v3({"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}).to_dict())


def _same_choice(hf_weights, hf_ids, weights, ids):
    """transformers' top-k is unsorted: compare (id, weight) pairs sorted by id."""
    hf_ids, order = hf_ids.sort(dim=-1)
    ids, mine = ids.long().sort(dim=-1)
    assert torch.equal(ids, hf_ids)
    torch.testing.assert_close(weights.gather(1, mine), hf_weights.gather(1, order), rtol=4 * F32_EPS, atol=0)


@pytest.mark.parametrize("n_group,topk_group", [(1, 1), (4, 2)])
def test_v3_router_equals_transformers(n_group, topk_group):
    config = _v3(ROPES["default"], n_group=n_group, topk_group=topk_group)
    args = ModelArgs.from_dict(config.to_dict())
    router = hf_v3.DeepseekV3TopkRouter(config)
    with torch.no_grad():
        router.weight.normal_()
        router.e_score_correction_bias.normal_(0, 0.1)
    x = torch.randn(64, DIMS["hidden_size"])
    with torch.no_grad():
        _, hf_weights, hf_ids = router(x)
    _same_choice(hf_weights, hf_ids, *gate(x, router.weight, router.e_score_correction_bias, args))


@pytest.mark.parametrize("topk_method", ["greedy", "group_limited_greedy"])
def test_v2_router_equals_transformers(topk_method):
    config = _v2(ROPES["default"], topk_method=topk_method, n_group=4, topk_group=2)
    args = ModelArgs.from_dict(config.to_dict())
    assert args.n_expert_groups == (4 if topk_method == "group_limited_greedy" else 1)
    router = hf_v2.DeepseekV2TopkRouter(config)
    with torch.no_grad():
        router.weight.normal_()
    x = torch.randn(64, DIMS["hidden_size"])
    with torch.no_grad():
        _, hf_weights, hf_ids = router(x)
    _same_choice(hf_weights, hf_ids, *gate(x, router.weight, None, args))
