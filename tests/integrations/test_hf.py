"""moela.integrations.hf: a patched transformers 5 DeepSeek model against the same model unpatched.

Tiny random DeepseekV3ForCausalLM models (q-LoRA on and off, YaRN and plain RoPE, attention
biases, a correction bias, group-limited routing) and DeepseekV2 ones (softmax routing,
group-limited or V2-Lite's plain top-k; complex rotary embedding). Logits and gradients must lie
within twice the error transformers itself makes at the same precision against its own float64 run (the derived bound
of tests/moela_testing.py); greedy ``generate()`` must give the same tokens, with a left-padded
batch and a StaticCache too; ``unpatch`` restores the model exactly. The references run here
(``backend="reference"``); one small case runs moela's Triton kernels through the interpreter,
the decode kernel included. The bf16 models send every token to every expert: a near tie
between two experts' scores, which bf16's rounding may resolve either way, would otherwise
decide the comparison (float32 models keep DeepSeek's top-k and group limits).
"""

import copy

import pytest
import torch
from hf_testing import import_transformers
from moela_testing import assert_close_derived

transformers = import_transformers()

from transformers.integrations.finegrained_fp8 import ALL_FP8_EXPERTS_FUNCTIONS, FP8Experts  # noqa: E402
from transformers.integrations.moe import use_experts_implementation  # noqa: E402

from moela.integrations import hf  # noqa: E402
from moela.reference import calc_diff, dequant, quant_weight  # noqa: E402

V, PROMPT = 96, 9
DIMS = dict(vocab_size=V, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
            first_k_dense_replace=1, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
            max_position_embeddings=64, pad_token_id=0, eos_token_id=None)
YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16, beta_fast=32,
            beta_slow=1, mscale=0.707, mscale_all_dim=0.707)
CONFIGS = {
    "v3-qlora-yarn-bias": lambda: transformers.DeepseekV3Config(
        **DIMS, q_lora_rank=24, n_group=4, topk_group=2, attention_bias=True, rope_parameters=YARN),
    "v3-no-qlora-rope": lambda: transformers.DeepseekV3Config(
        **DIMS, q_lora_rank=None, n_group=1, topk_group=1, rope_parameters={"rope_type": "default",
                                                                           "rope_theta": 500.0}),
    "v2-group-limited": lambda: transformers.DeepseekV2Config(
        **DIMS, q_lora_rank=None, topk_method="group_limited_greedy", n_group=4, topk_group=2),
    "v2-lite-greedy": lambda: transformers.DeepseekV2Config(  # V2-Lite's router: softmax, plain top-k
        **DIMS, q_lora_rank=None, topk_method="greedy", n_group=1, topk_group=1),
}
LOGIT_CASES = ["v3-qlora-yarn-bias", "v3-no-qlora-rope", "v2-group-limited"]


def tiny_model(name: str, every_expert: bool = False) -> torch.nn.Module:
    """A random float32 model whose weights make every layer matter (transformers' 0.02 init does not).

    every_expert: each token goes to all experts (one group), so no expert choice hangs on a near
    tie that a low precision's rounding may flip (bf16: a 1 % score gap flips in the tests' models).
    """
    config = CONFIGS[name]()
    if every_expert:
        config.num_experts_per_tok, config.n_group, config.topk_group = config.n_routed_experts, 1, 1
    cls = transformers.DeepseekV2ForCausalLM if name.startswith("v2") else transformers.DeepseekV3ForCausalLM
    model = cls(config)
    model.set_experts_implementation("eager")  # transformers' grouped_mm takes no float64
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.normal_(1.0, 0.2) if "norm" in pname else p.normal_(0.0, p.shape[-1] ** -0.5)
        for bname, b in model.named_buffers():
            if bname.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.1)
    return model.eval()


def _prefill_and_decode(model, tokens):
    """Logits of a prefill of all but the last token, then of a one-token decode step over its cache."""
    with torch.no_grad():
        first = model(tokens[:, :-1], use_cache=True)
        step = model(tokens[:, -1:], cache=first.cache, use_cache=True)
    return first.logits, step.logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", LOGIT_CASES)
def test_patched_logits_within_the_derived_bound(name, dtype):
    model = tiny_model(name, every_expert=dtype != torch.float32)
    hi = copy.deepcopy(model).double()
    lo = model.to(dtype)
    tokens = torch.randint(1, V, (2, PROMPT + 1))
    want, low = _prefill_and_decode(hi, tokens), _prefill_and_decode(lo, tokens)
    hf.patch(lo, backend="reference")
    got = _prefill_and_decode(lo, tokens)
    for what, g, w, lw in zip(("prefill", "decode"), got, want, low, strict=True):
        assert g.dtype == dtype
        assert_close_derived(g, w, lw, name=f"{name} {dtype} {what}")


def test_kernels(monkeypatch, device):
    """moela's Triton kernels (the interpreter on CPU): float32 prefill and decode, both steps of at
    most 16 tokens on moela.kernels.mla_decode, and a bf16 forward without a cache (SDPA over the
    expanded latent)."""
    import moela.kernels

    decode_calls = []
    mla_decode = moela.kernels.mla_decode
    monkeypatch.setattr(moela.kernels, "mla_decode", lambda *a, **k: decode_calls.append(1) or mla_decode(*a, **k))
    model = tiny_model("v3-qlora-yarn-bias")
    hi = copy.deepcopy(model).double()
    tokens = torch.randint(1, V, (1, 6))
    want = _prefill_and_decode(hi, tokens)
    model.to(device)
    low = _prefill_and_decode(model, tokens.to(device))
    hf.patch(model, backend="triton")  # route, make_routing, permute, grouped_gemm, swiglu, unpermute, mla_decode
    got = _prefill_and_decode(model, tokens.to(device))
    for what, g, w, lw in zip(("prefill", "decode"), got, want, low, strict=True):
        assert_close_derived(g, w, lw, name=f"triton {what}")
    assert len(decode_calls) == 4  # two layers × (the 5-token prefill, the decode step)

    model = tiny_model("v2-group-limited", every_expert=True)
    hi = copy.deepcopy(model).double()
    lo = model.to(device, torch.bfloat16)
    with torch.no_grad():
        want, low = hi(tokens, use_cache=False).logits, lo(tokens.to(device), use_cache=False).logits
        hf.patch(lo, backend="triton")
        assert_close_derived(lo(tokens.to(device), use_cache=False).logits, want, low, name="triton bf16 sdpa")


def _generate(model, tokens, mask=None, **kwargs):
    with torch.no_grad():
        return model.generate(tokens, attention_mask=mask, max_new_tokens=5, do_sample=False, **kwargs)


@pytest.mark.parametrize("name", ["v3-qlora-yarn-bias", "v2-lite-greedy"])
def test_greedy_generate_gives_the_same_tokens(name):
    model = tiny_model(name)
    tokens = torch.randint(1, V, (3, PROMPT))
    mask = torch.ones_like(tokens)
    mask[0, :4] = 0  # left padding: the first row's prompt is 5 tokens long
    mask[1, :1] = 0
    tokens = tokens.masked_fill(mask == 0, 0)
    cases = {"batch": dict(mask=torch.ones_like(mask)), "left-padded": dict(mask=mask),
             "static-cache": dict(mask=mask, cache_implementation="static")}
    want = {case: _generate(model, tokens, **kw) for case, kw in cases.items()}
    hf.patch(model, backend="reference")
    for case, kw in cases.items():
        got = _generate(model, tokens, **kw)
        assert torch.equal(got, want[case]), f"{case}: {got[:, PROMPT:]} != {want[case][:, PROMPT:]}"


def test_eager_attention_masks():
    """attn_implementation="eager" hands the layers additive float masks instead of bool ones."""
    model = tiny_model("v3-qlora-yarn-bias")
    model.set_attn_implementation("eager")
    tokens = torch.randint(1, V, (2, PROMPT))
    mask = torch.ones_like(tokens)
    mask[0, :3] = 0
    want = _generate(model, tokens, mask)
    hf.patch(model, backend="reference")
    assert torch.equal(_generate(model, tokens, mask), want)


def test_training_step_gradients_within_the_derived_bound():
    model = tiny_model("v3-qlora-yarn-bias").train()
    hi = copy.deepcopy(model).double()
    patched = copy.deepcopy(model)
    hf.patch(patched, backend="reference")
    tokens = torch.randint(1, V, (2, PROMPT))
    grads = []
    for m in (hi, model, patched):
        out = m(tokens, labels=tokens, output_router_logits=True)
        out.loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    hi_g, lo_g, got_g = grads
    routers = [n for n in got_g if n.endswith("mlp.gate.weight")]
    assert routers and all(got_g[n] is not None and got_g[n].abs().sum() > 0 for n in routers)
    for n, g in got_g.items():
        assert g is not None, f"{n} got no gradient"
        assert_close_derived(g, hi_g[n], lo_g[n], name=n)


def test_router_logits_and_outputs_are_kept():
    model = tiny_model("v3-qlora-yarn-bias")
    tokens = torch.randint(1, V, (2, PROMPT))
    with torch.no_grad():
        want = model(tokens, output_router_logits=True, output_hidden_states=True)
        hf.patch(model, backend="reference", attention=False)  # the first MoE layer sees the same inputs
        got = model(tokens, output_router_logits=True, output_hidden_states=True)
    assert len(got.router_logits) == len(want.router_logits) == 1
    assert torch.equal(got.router_logits[0], want.router_logits[0])
    assert len(got.hidden_states) == len(want.hidden_states)


def test_unpatch_restores_the_original():
    model = tiny_model("v3-qlora-yarn-bias")
    tokens = torch.randint(1, V, (2, PROMPT))
    before_impl = model.get_experts_implementation()
    params = {n: (p.data_ptr(), p.dtype, p.shape) for n, p in model.state_dict().items()}
    with torch.no_grad():
        want = model(tokens).logits
    hf.patch(model, backend="reference")
    assert hf.is_patched(model)
    assert model.get_experts_implementation() == {"": hf.EXPERTS_IMPLEMENTATION}
    attn = model.model.layers[0].self_attn
    assert attn.forward.__func__ is hf.mla_forward
    assert {n: (p.data_ptr(), p.dtype, p.shape) for n, p in model.state_dict().items()} == params  # no copies
    hf.patch(model, backend="reference")  # patching again replaces the earlier patch
    hf.unpatch(model)
    assert not hf.is_patched(model)
    assert model.get_experts_implementation() == before_impl
    for m in model.modules():
        assert "forward" not in m.__dict__ and not hasattr(m, "_moela") and not hasattr(m, "_moela_backend")
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, want)
    with pytest.raises(ValueError, match="not patched"):
        hf.unpatch(model)


def test_fp8_experts_registered_and_close_to_the_dequantized_experts():
    config = CONFIGS["v3-no-qlora-rope"]()
    config.hidden_size, config.moe_intermediate_size = 128, 128
    fp8_cls = use_experts_implementation(experts_class=FP8Experts, experts_interface=ALL_FP8_EXPERTS_FUNCTIONS)
    experts = fp8_cls(config, block_size=(128, 128))
    bf16 = transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3Experts(config)
    w13 = torch.randn(8, 256, 128) * 128**-0.5
    w2 = torch.randn(8, 128, 128) * 128**-0.5
    with torch.no_grad():
        (experts.gate_up_proj.data, experts.gate_up_proj_scale_inv.data) = quant_weight(w13)
        (experts.down_proj.data, experts.down_proj_scale_inv.data) = quant_weight(w2)
        bf16.gate_up_proj.copy_(dequant(experts.gate_up_proj, experts.gate_up_proj_scale_inv))
        bf16.down_proj.copy_(dequant(experts.down_proj, experts.down_proj_scale_inv))
    config._experts_implementation_internal = hf.EXPERTS_IMPLEMENTATION  # dispatch through the FP8 interface
    x = torch.randn(5, 128, dtype=torch.bfloat16)
    ids = torch.stack([torch.randperm(8)[:2] for _ in range(5)])
    weights = torch.rand(5, 2)
    with torch.no_grad():
        got = experts(x, ids, weights)
        want = bf16.double()(x.double(), ids, weights.double())  # transformers' eager loop, float64
    assert got.dtype == torch.bfloat16
    assert calc_diff(got.double(), want) < 2e-3


def test_bad_models_and_arguments_are_rejected():
    model = tiny_model("v3-no-qlora-rope")
    with pytest.raises(ValueError, match="backend"):
        hf.patch(model, backend="cuda")
    with pytest.raises(TypeError, match="model"):
        hf.patch(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="found no DeepseekV3/DeepseekV2"):
        hf.patch(model, attention=False, moe=False)
    model.config._attn_implementation_internal = "flex_attention"
    with pytest.raises(ValueError, match="attn_implementation"):
        hf.patch(model)
    assert not hf.is_patched(model)
