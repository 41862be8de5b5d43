"""Checkpoints: naming (DeepSeek <-> Hugging Face, fused experts), shard folders, prefix loading, refusals."""

import json

import pytest
import torch
from safetensors.torch import save_file

from moela.model import MoE as FastMoE
from moela.model.checkpoint import (
    CheckpointError,
    CheckpointKeyError,
    hf_to_moela,
    is_hf_naming,
    load_checkpoint,
    moela_to_hf,
    read_safetensors,
    save_checkpoint,
    to_moela_names,
)
from moela.model.linear import FP8Linear
from moela.model.transformer import Transformer
from moela.reference import FP8_DTYPE, MLA, ModelArgs, MoE, quant_weight

# (Hugging Face DeepSeek-V3 name, DeepSeek inference name) — from the two published formats
PAIRS = [
    ("model.embed_tokens.weight", "embed.weight"),
    ("model.layers.0.input_layernorm.weight", "layers.0.attn_norm.weight"),
    ("model.layers.0.post_attention_layernorm.weight", "layers.0.ffn_norm.weight"),
    ("model.layers.0.self_attn.q_a_proj.weight", "layers.0.attn.wq_a.weight"),
    ("model.layers.0.self_attn.q_a_layernorm.weight", "layers.0.attn.q_norm.weight"),
    ("model.layers.0.self_attn.q_b_proj.weight", "layers.0.attn.wq_b.weight"),
    ("model.layers.0.self_attn.q_proj.weight", "layers.0.attn.wq.weight"),
    ("model.layers.0.self_attn.kv_a_proj_with_mqa.weight", "layers.0.attn.wkv_a.weight"),
    ("model.layers.0.self_attn.kv_a_layernorm.weight", "layers.0.attn.kv_norm.weight"),
    ("model.layers.0.self_attn.kv_b_proj.weight", "layers.0.attn.wkv_b.weight"),
    ("model.layers.0.self_attn.o_proj.weight_scale_inv", "layers.0.attn.wo.weight_scale_inv"),
    ("model.layers.0.mlp.gate_proj.weight", "layers.0.ffn.w1.weight"),
    ("model.layers.3.mlp.gate.weight", "layers.3.ffn.gate.weight"),
    ("model.layers.3.mlp.gate.e_score_correction_bias", "layers.3.ffn.gate.bias"),
    ("model.layers.3.mlp.experts.255.gate_proj.weight", "layers.3.ffn.experts.255.w1.weight"),
    ("model.layers.3.mlp.experts.7.down_proj.weight", "layers.3.ffn.experts.7.w2.weight"),
    ("model.layers.3.mlp.experts.7.up_proj.weight_scale_inv", "layers.3.ffn.experts.7.w3.weight_scale_inv"),
    ("model.layers.3.mlp.shared_experts.up_proj.weight", "layers.3.ffn.shared_experts.w3.weight"),
    ("model.norm.weight", "norm.weight"),
    ("lm_head.weight", "head.weight"),
]
TINY = ModelArgs.from_name("tiny", backend="reference")


@pytest.mark.parametrize("hf,ours", PAIRS, ids=[p[1] for p in PAIRS])
def test_names_translate_both_ways(hf, ours):
    assert hf_to_moela(hf) == ours
    assert moela_to_hf(ours) == hf


def test_naming_detection_and_deepseek_scale_alias():
    assert is_hf_naming([p[0] for p in PAIRS]) and not is_hf_naming([p[1] for p in PAIRS])
    assert is_hf_naming(["experts.0.gate_proj.weight"]) and is_hf_naming(["experts.gate_up_proj"])
    out = to_moela_names({"layers.0.attn.wo.scale": torch.ones(1), "layers.0.attn.wo.weight": torch.ones(1)})
    assert set(out) == {"layers.0.attn.wo.weight_scale_inv", "layers.0.attn.wo.weight"}
    with pytest.raises(CheckpointError, match=r"wo\.weight_scale_inv: given twice"):
        to_moela_names({"wo.scale": torch.ones(1), "wo.weight_scale_inv": torch.ones(1)})


def _random_(module):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
        for name, b in module.named_buffers():
            if name.endswith("bias"):
                b.normal_()
    return module


def _assert_same_state(dst, src):
    want = src.state_dict()
    got = dst.state_dict()
    assert set(got) == set(want)
    for k, v in want.items():
        assert torch.equal(got[k], v), k


@pytest.mark.parametrize("naming", ["moela", "hf"])
@pytest.mark.parametrize("sharded", [False, True], ids=["one-file", "shards"])
def test_round_trip_through_safetensors(tmp_path, naming, sharded):
    src = torch.nn.ModuleDict({"ffn": _random_(MoE(TINY)), "attn": _random_(MLA(TINY))})
    dst = torch.nn.ModuleDict({"ffn": MoE(TINY), "attn": MLA(TINY)})
    target = tmp_path / ("ckpt" if sharded else "model.safetensors")
    files = save_checkpoint(src, target, naming=naming, max_shard_bytes=20_000 if sharded else None)
    assert len(files) > 1 if sharded else len(files) == 1
    if naming == "hf":
        assert "model.ffn.gate.e_score_correction_bias" not in read_safetensors(target)  # "ffn" is not HF's
        assert "model.mlp.gate.e_score_correction_bias" in read_safetensors(target)
    load_checkpoint(dst, target)
    _assert_same_state(dst, src)


def test_strict_loading_names_missing_and_unexpected_keys(tmp_path):
    moe = MoE(TINY)
    state = moe.state_dict()
    del state["experts.3.w2.weight"]
    state["experts.99.w1.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointKeyError, match=r"missing keys: experts\.3\.w2\.weight.*unexpected keys: experts\.99"):
        load_checkpoint(moe, state)
    state = moe.state_dict()
    state["gate.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointKeyError, match=r"gate\.weight \(<state dict>\): expected shape \(16, 64\) "
                                                 r"for gate\.weight, got \(3, 3\)"):
        load_checkpoint(moe, state)
    extra = {**moe.state_dict(), "layers.61.eh_proj.weight": torch.zeros(1)}
    load_checkpoint(moe, extra, ignore=[r"^layers\.61\."])
    with pytest.raises(FileNotFoundError, match="path"):
        load_checkpoint(moe, tmp_path / "nothing.safetensors")
    with pytest.raises(ValueError, match="naming"):
        save_checkpoint(moe, tmp_path / "x.safetensors", naming="gguf")
    with pytest.raises(ValueError, match="max_shard_bytes"):
        save_checkpoint(moe, tmp_path / "x", max_shard_bytes=0)
    with pytest.raises(ValueError, match="ignore: not a list of regexes"):
        load_checkpoint(moe, state, ignore=["("])
    with pytest.raises(TypeError, match="ignore"):
        load_checkpoint(moe, state, ignore=r"^layers")
    with pytest.raises(TypeError, match="source"):
        load_checkpoint(moe, 3)
    with pytest.raises(CheckpointError, match=r"'gate\.weight' \(<state dict>\): expected str keys and torch\.Tensor"):
        load_checkpoint(moe, {**moe.state_dict(), "gate.weight": [1.0]})


# --------------------------------------------------------------------------- shard folders
def _shards(tmp_path, shards, index=None):
    """Write {file name: {key: tensor}} and, unless index is False, an index (given, or built from shards)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    for name, tensors in shards.items():
        save_file(tensors, tmp_path / name)
    if index is not False:
        weight_map = index if index is not None else {k: n for n, t in shards.items() for k in t}
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return tmp_path


def _norm():
    from moela.reference import RMSNorm

    return RMSNorm(4)


def test_each_key_is_read_from_the_shard_the_index_names(tmp_path):
    a, b = torch.full((4,), 1.0), torch.full((4,), 2.0)
    folder = _shards(tmp_path / "ok", {"a.safetensors": {"weight": a}, "b.safetensors": {"other": b}})
    norm = _norm()
    load_checkpoint(norm, folder, strict=False)
    assert torch.equal(norm.weight.detach(), a)
    # a file the index does not name is not read (transformers' rule too)
    _shards(tmp_path / "ok", {"c.safetensors": {"weight": b}}, index=False)
    load_checkpoint(norm, folder, strict=False)
    assert torch.equal(norm.weight.detach(), a)
    # the bug this replaced: a stray copy in another shard of the index silently won
    stray = _shards(tmp_path / "stray",
                    {"a.safetensors": {"weight": a}, "b.safetensors": {"weight": b, "other": b.clone()}},
                    index={"weight": "a.safetensors", "other": "b.safetensors"})
    with pytest.raises(CheckpointError, match=r"weight: .*index\.json maps it to a\.safetensors, but .*b\.safetensors "
                                              r"holds a copy too"):
        load_checkpoint(_norm(), stray)
    unlisted = _shards(tmp_path / "unlisted", {"a.safetensors": {"weight": a, "extra": b}},
                       index={"weight": "a.safetensors"})
    with pytest.raises(CheckpointError, match=r"extra: stored in .*a\.safetensors but not listed in .*index\.json"):
        read_safetensors(unlisted)
    absent = _shards(tmp_path / "absent", {"a.safetensors": {"weight": a}},
                     index={"weight": "a.safetensors", "bias": "a.safetensors"})
    with pytest.raises(CheckpointError, match=r"index\.json: 1 key\(s\) are not in the shard it names, e\.g\. bias"):
        load_checkpoint(_norm(), absent)
    gone = _shards(tmp_path / "gone", {"a.safetensors": {"weight": a}}, index={"weight": "c.safetensors"})
    with pytest.raises(FileNotFoundError, match=r"index\.json: weight_map names c\.safetensors"):
        load_checkpoint(_norm(), gone)
    no_index = _shards(tmp_path / "no-index", {"a.safetensors": {"weight": a}, "b.safetensors": {"weight": b}},
                       index=False)
    with pytest.raises(CheckpointError, match=r"weight: stored in both .*a\.safetensors and .*b\.safetensors"):
        load_checkpoint(_norm(), no_index)


@pytest.mark.parametrize(
    "index_text,match",
    [
        ('{"metadata": {}, "weight_map": {"weight": "a.safe', "not valid JSON"),
        ('{"metadata": {}}', "expected a JSON object with a 'weight_map'"),
        ('{"weight_map": ["a.safetensors"]}', "'weight_map' must be a non-empty object"),
        ('{"weight_map": {}}', "'weight_map' must be a non-empty object"),
        ('{"weight_map": {"weight": "../a.safetensors"}}', "outside the checkpoint folder"),
    ],
    ids=["truncated", "no-weight_map", "list", "empty", "escape"],
)
def test_bad_index_files_name_the_index(tmp_path, index_text, match):
    folder = _shards(tmp_path, {"a.safetensors": {"weight": torch.ones(4)}}, index=False)
    index = folder / "model.safetensors.index.json"
    index.write_text(index_text)
    with pytest.raises(CheckpointError, match=match) as info:
        load_checkpoint(_norm(), folder)
    assert str(index) in str(info.value)


def _truncated(path):
    save_file({"weight": torch.ones(64)}, path)
    path.write_bytes(path.read_bytes()[:-20])
    return path


def _pickled(path):
    torch.save({"weight": torch.ones(4)}, path)
    return path


@pytest.mark.parametrize("make", [_truncated, _pickled], ids=["truncated", "torch.save"])
@pytest.mark.parametrize("in_folder", [False, True], ids=["file", "folder"])
def test_unreadable_files_name_the_file(tmp_path, make, in_folder):
    if in_folder:
        folder = _shards(tmp_path / "ckpt", {"good.safetensors": {"bias": torch.ones(4)}}, index=False)
        bad = make(folder / "model-2.safetensors")
        source = folder
    else:
        source = bad = make(tmp_path / ("model.pt" if make is _pickled else "model.safetensors"))
    with pytest.raises(CheckpointError, match="not a readable safetensors file") as info:
        load_checkpoint(_norm(), source)
    assert str(bad) in str(info.value)


# --------------------------------------------------------------------------- casts
def _fp8_linear_state(weight):
    return {"weight": weight, "weight_scale_inv": torch.ones(1, 1)}


def test_casts_that_change_values_are_refused(tmp_path):
    layer = FP8Linear(128, 128, backend="reference")
    big = torch.zeros(128, 128, dtype=torch.bfloat16)
    big[3, 5] = 1000.0  # the bug this replaced: loaded as 448
    path = tmp_path / "fp8.safetensors"
    save_file({"weight": big}, path)
    with pytest.raises(CheckpointError, match=r"weight \(.*fp8\.safetensors\): a torch\.bfloat16 weight cannot load "
                                              r"into the torch\.float8_e4m3fn parameter weight without its "
                                              r"weight_scale_inv"):
        load_checkpoint(layer, path, strict=False)
    save_file(_fp8_linear_state(big), path)
    with pytest.raises(CheckpointError, match=r"beyond e4m3's finite range ±448 \(max \|x\| = 1000\)") as info:
        load_checkpoint(layer, path)
    assert str(path) in str(info.value)
    off_grid = torch.full((128, 128), 0.3, dtype=torch.bfloat16)
    with pytest.raises(CheckpointError, match="e4m3 cannot represent exactly"):
        load_checkpoint(layer, _fp8_linear_state(off_grid))
    q, s = quant_weight(torch.randn(128, 128))
    load_checkpoint(layer, {"weight": q.bfloat16(), "weight_scale_inv": s})  # e4m3 values held in bf16: exact
    assert torch.equal(layer.weight.view(torch.uint8), q.view(torch.uint8))
    with pytest.raises(CheckpointError, match=r"torch\.float8_e5m2 tensor cannot load into the torch\.float8_e4m3fn"):
        load_checkpoint(layer, {"weight": q.to(torch.float8_e5m2), "weight_scale_inv": s})

    linear = torch.nn.Linear(4, 4, bias=False)
    with pytest.raises(CheckpointError, match=r"weight \(<state dict>\): a torch\.int64 tensor cannot load into the "
                                              r"torch\.float32 parameter weight \(int -> float"):
        load_checkpoint(linear, {"weight": torch.ones(4, 4, dtype=torch.int64)})
    with pytest.raises(CheckpointError, match=r"scale would be dropped"):
        load_checkpoint(linear, {"weight": torch.ones(4, 4).to(FP8_DTYPE)})
    half = torch.nn.Linear(4, 4, bias=False).half()
    with pytest.raises(CheckpointError, match=r"beyond torch\.float16's range \(max \|x\| = 100000\)"):
        load_checkpoint(half, {"weight": torch.full((4, 4), 1e5)})
    for source in (torch.randn(4, 4).bfloat16(), torch.randn(4, 4, dtype=torch.float64)):  # precision: allowed
        load_checkpoint(linear, {"weight": source})
        assert torch.equal(linear.weight.detach(), source.float())
    scale = torch.tensor([[0.5]]).to(torch.float8_e8m0fnu)  # power-of-two scales load exactly into float32
    load_checkpoint(layer, {"weight": q, "weight_scale_inv": scale.expand(1, 1)})
    assert layer.weight_scale_inv.item() == 0.5


# --------------------------------------------------------------------------- transformers 5's fused experts
def _fused_state(src, prefix="", hf=True):
    """src (a reference MoE)'s weights in transformers 5's layout: stacked experts, gate rows then up rows."""
    sd = src.state_dict()
    E = src.args.n_routed_experts
    name = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"} if hf else {"w1": "w1", "w2": "w2", "w3": "w3"}
    out = {
        f"{prefix}experts.gate_up_proj": torch.stack(
            [torch.cat([sd[f"experts.{e}.w1.weight"], sd[f"experts.{e}.w3.weight"]]) for e in range(E)]),
        f"{prefix}experts.down_proj": torch.stack([sd[f"experts.{e}.w2.weight"] for e in range(E)]),
        f"{prefix}gate.weight": sd["gate.weight"],
        f"{prefix}gate.{'e_score_correction_bias' if hf else 'bias'}": sd["gate.bias"],
    }
    for w in ("w1", "w2", "w3"):
        out[f"{prefix}shared_experts.{name[w]}.weight"] = sd[f"shared_experts.{w}.weight"]
    return out


@pytest.mark.parametrize("dst_cls", [MoE, FastMoE], ids=["reference", "model"])
def test_v5_fused_expert_tensors_load(tmp_path, dst_cls):
    src = _random_(MoE(TINY))
    fused = _fused_state(src)
    assert fused["experts.gate_up_proj"].shape == (16, 2 * 32, 64)  # [E, 2I, D]
    assert fused["experts.down_proj"].shape == (16, 64, 32)  # [E, D, I]
    dst = dst_cls(TINY)
    load_checkpoint(dst, fused)
    _assert_same_state(dst, src)
    # the same as a file, in a whole-model checkpoint, loaded by prefix
    save_file({k: v.contiguous() for k, v in _fused_state(src, "model.layers.1.mlp.").items()},
              tmp_path / "m.safetensors")
    dst = dst_cls(TINY)
    load_checkpoint(dst, tmp_path / "m.safetensors", prefix="model.layers.1.mlp.")
    _assert_same_state(dst, src)
    odd = {**fused, "experts.gate_up_proj": fused["experts.gate_up_proj"][:, :-1]}
    with pytest.raises(CheckpointError, match=r"experts\.gate_up_proj \(<state dict>\): 63 rows cannot split"):
        load_checkpoint(dst_cls(TINY), odd)


def test_v5_fused_fp8_experts_with_scales_load():
    args = TINY.replace(dim=128, moe_inter_dim=128, dtype="fp8")
    src = FastMoE(args)
    sd = src.state_dict()
    E = args.n_routed_experts
    fused = {k: v for k, v in sd.items() if not k.startswith("experts.")}
    for leaf, suffix in (("weight", ""), ("weight_scale_inv", "_scale_inv")):
        fused[f"experts.gate_up_proj{suffix}"] = torch.stack(
            [torch.cat([sd[f"experts.{e}.w1.{leaf}"], sd[f"experts.{e}.w3.{leaf}"]]) for e in range(E)])
        fused[f"experts.down_proj{suffix}"] = torch.stack([sd[f"experts.{e}.w2.{leaf}"] for e in range(E)])
    assert fused["experts.gate_up_proj_scale_inv"].shape == (E, 2, 1)
    dst = FastMoE(args)
    with torch.no_grad():
        dst.w13.zero_()
        dst.w13_scale_inv.zero_()
    load_checkpoint(dst, fused)
    for k, v in sd.items():
        assert torch.equal(dst.state_dict()[k].view(torch.uint8) if v.dtype == FP8_DTYPE else dst.state_dict()[k],
                           v.view(torch.uint8) if v.dtype == FP8_DTYPE else v), k


# --------------------------------------------------------------------------- prefix
@pytest.mark.parametrize("naming", ["moela", "hf"])
def test_prefix_loads_one_module_of_a_whole_model_checkpoint(tmp_path, naming):
    model = _random_(Transformer(TINY))
    save_checkpoint(model, tmp_path / "ckpt", naming=naming, max_shard_bytes=30_000)
    for prefix in ("layers.1.ffn.", "model.layers.1.mlp", "layers.1.ffn"):
        moe = FastMoE(TINY)
        load_checkpoint(moe, tmp_path / "ckpt", prefix=prefix)
        _assert_same_state(moe, model.layers[1].ffn)
    attn = MLA(TINY)
    load_checkpoint(attn, tmp_path / "ckpt", prefix="model.layers.0.self_attn.")
    _assert_same_state(attn, model.layers[0].attn)
    head = torch.nn.Linear(TINY.dim, TINY.vocab_size, bias=False)
    load_checkpoint(head, tmp_path / "ckpt", prefix="lm_head")
    assert torch.equal(head.weight, model.head.weight)
    with pytest.raises(CheckpointKeyError, match=r"prefix='layers\.7\.ffn\.': no key of .*ckpt is under"):
        load_checkpoint(FastMoE(TINY), tmp_path / "ckpt", prefix="layers.7.ffn.")
    with pytest.raises(CheckpointKeyError, match=r"unexpected keys: .*\(load one module of a whole-model checkpoint "
                                                 r"with prefix=\)"):
        load_checkpoint(FastMoE(TINY), tmp_path / "ckpt")
    with pytest.raises(ValueError, match="prefix: expected a module path"):
        load_checkpoint(FastMoE(TINY), tmp_path / "ckpt", prefix=".")
