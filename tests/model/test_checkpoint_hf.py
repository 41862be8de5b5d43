"""A transformers 5 DeepSeek model, saved by transformers, loads into moela and gives transformers' logits.

Skipped without transformers >= 5 (an optional extra). Tiny random DeepseekV3/V2ForCausalLM
models (YaRN with transformers' mscale-only attention factor, plain RoPE, q_lora_rank on and
off, sigmoid-with-bias and softmax routers) are saved with ``save_pretrained``; moela reads the
folder's config.json and safetensors, and its logits must be within twice transformers' own
float32 error of transformers' float64 logits. The in-memory state dict (fused experts) loads
the same weights, and ``prefix=`` loads one MoE layer that reproduces transformers' layer.
"""

import copy

import pytest
import torch
from hf_testing import import_transformers
from moela_testing import assert_close_derived

transformers = import_transformers()

from moela.model import MoE  # noqa: E402
from moela.model.checkpoint import load_checkpoint  # noqa: E402
from moela.model.transformer import Transformer  # noqa: E402
from moela.reference import ModelArgs  # noqa: E402

DIMS = dict(vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=4, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
            first_k_dense_replace=1, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
            max_position_embeddings=128)
YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=32, beta_fast=32,
            beta_slow=1)
MODELS = {
    "v3-yarn-mscale-only": lambda: transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(
        **DIMS, q_lora_rank=24, n_group=4, topk_group=2, rope_parameters=dict(YARN, mscale=1.0))),
    "v3-plain-rope-no-q-lora": lambda: transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(
        **DIMS, q_lora_rank=None, n_group=1, topk_group=1, rope_parameters={"rope_type": "default",
                                                                           "rope_theta": 500.0})),
    "v2-yarn-group-limited": lambda: transformers.DeepseekV2ForCausalLM(transformers.DeepseekV2Config(
        **DIMS, q_lora_rank=None, topk_method="group_limited_greedy", n_group=4, topk_group=2,
        rope_parameters=dict(YARN, mscale=0.707, mscale_all_dim=0.707))),
}


def _random_hf_model(name):
    model = MODELS[name]()
    model.set_experts_implementation("eager")  # the per-expert loop: torch's grouped_mm takes no float64
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.normal_(1.0, 0.2) if "norm" in pname else p.normal_(0.0, p.shape[-1] ** -0.5)
        for bname, b in model.named_buffers():
            if bname.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.1)
    return model.double().eval()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_saved_hf_model_loads_and_gives_its_logits(tmp_path, name):
    hf64 = _random_hf_model(name)
    hf64.save_pretrained(tmp_path)
    hf32 = copy.deepcopy(hf64).float()
    args = ModelArgs.from_json(tmp_path / "config.json", backend="reference")
    assert args.uses_yarn == ("yarn" in name)
    ours64 = Transformer(args).double().eval()
    load_checkpoint(ours64, tmp_path)
    ours32 = Transformer(args).float().eval()
    load_checkpoint(ours32, tmp_path)  # float64 file into float32 parameters: a precision change, allowed

    tokens = torch.randint(0, DIMS["vocab_size"], (2, 12))
    with torch.no_grad():
        want, lo = hf64(tokens).logits, hf32(tokens).logits
        assert_close_derived(ours64(tokens), want, lo, name=f"{name} float64")
        assert_close_derived(ours32(tokens), want, lo, name=f"{name} float32")

    in_memory = Transformer(args).double()  # transformers' own state dict: fused experts
    state = hf64.state_dict()
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    load_checkpoint(in_memory, state)
    for k, v in ours64.state_dict().items():
        assert torch.equal(in_memory.state_dict()[k], v), k


def test_prefix_loads_one_hf_moe_layer(tmp_path):
    hf64 = _random_hf_model("v3-yarn-mscale-only")
    hf64.save_pretrained(tmp_path)
    args = ModelArgs.from_json(tmp_path / "config.json", backend="reference")
    moe = MoE(args).double().eval()
    load_checkpoint(moe, tmp_path, prefix="model.layers.1.mlp.")
    layer = hf64.model.layers[1].mlp
    x = torch.randn(16, DIMS["hidden_size"], dtype=torch.float64)
    with torch.no_grad():
        assert_close_derived(moe(x), layer(x), copy.deepcopy(layer).float()(x.float()), name="moe")
