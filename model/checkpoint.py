"""Checkpoints: DeepSeek's official parameter names, Hugging Face's, and safetensors shards.

moela's modules use DeepSeek-V3's own names (``inference/model.py``)::

    embed.weight, layers.N.attn_norm.weight, layers.N.attn.{wq | wq_a, q_norm, wq_b}.weight,
    layers.N.attn.{wkv_a, kv_norm, wkv_b, wo}.weight, layers.N.ffn_norm.weight,
    layers.N.ffn.{w1,w2,w3}.weight                              (dense layers)
    layers.N.ffn.gate.weight, layers.N.ffn.gate.bias,
    layers.N.ffn.experts.I.{w1,w2,w3}.weight, layers.N.ffn.shared_experts.{w1,w2,w3}.weight,
    norm.weight, head.weight

with FP8 weights carrying a float32 ``weight_scale_inv`` (128×128 blocks) beside ``weight``
(DeepSeek's converter calls it ``scale``; both load). Hugging Face's DeepSeek-V3 names
(``model.layers.N.self_attn.q_a_proj.weight``, ``mlp.experts.I.gate_proj``,
``mlp.gate.e_score_correction_bias``, ``lm_head``...) are translated on load and on request
on save.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "hf_to_moela", "moela_to_hf", "is_hf_naming", "to_moela_names", "read_safetensors",
    "load_checkpoint", "save_checkpoint", "CheckpointKeyError",
]

# HF module name -> DeepSeek/moela module name (one path component each)
_HF_TO_MOELA = {
    "embed_tokens": "embed", "lm_head": "head", "self_attn": "attn", "mlp": "ffn",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "q_proj": "wq", "q_a_proj": "wq_a", "q_a_layernorm": "q_norm", "q_b_proj": "wq_b",
    "kv_a_proj_with_mqa": "wkv_a", "kv_a_layernorm": "kv_norm", "kv_b_proj": "wkv_b", "o_proj": "wo",
    "gate_proj": "w1", "down_proj": "w2", "up_proj": "w3",
}
_MOELA_TO_HF = {v: k for k, v in _HF_TO_MOELA.items()}
# parameter (leaf) names
_HF_LEAF = {"e_score_correction_bias": "bias", "weight_scale_inv": "weight_scale_inv"}
_DEEPSEEK_SCALE = re.compile(r"\.scale$")


class CheckpointKeyError(ValueError):
    """A checkpoint whose keys don't match the module: lists the missing and unexpected keys."""


def is_hf_naming(keys: Iterable[str]) -> bool:
    """True when any key uses a Hugging Face-only name (``model.``, ``self_attn``, ``gate_proj``...)."""
    for k in keys:
        parts = k.split(".")
        if parts[0] in ("model", "lm_head") or parts[-1] == "e_score_correction_bias":
            return True
        if any(p in _HF_TO_MOELA for p in parts[:-1]):
            return True
    return False


def hf_to_moela(name: str) -> str:
    """``model.layers.3.mlp.experts.7.gate_proj.weight`` -> ``layers.3.ffn.experts.7.w1.weight``."""
    name = name.removeprefix("model.")
    *mods, leaf = name.split(".")
    in_gate = bool(mods) and mods[-1] == "gate"
    mods = [_HF_TO_MOELA.get(m, m) for m in mods]
    if in_gate and leaf == "e_score_correction_bias":
        leaf = "bias"
    return ".".join([*mods, _HF_LEAF.get(leaf, leaf)])


def moela_to_hf(name: str) -> str:
    """The inverse of :func:`hf_to_moela` (``embed`` and ``norm`` get HF's ``model.`` prefix)."""
    *mods, leaf = name.split(".")
    if mods and mods[-1] == "gate" and leaf == "bias":
        leaf = "e_score_correction_bias"
    out = ".".join([*(_MOELA_TO_HF.get(m, m) for m in mods), leaf])
    return out if out.startswith("lm_head.") else "model." + out


def to_moela_names(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Translate a state dict in HF or DeepSeek naming into moela's (DeepSeek's, scale -> weight_scale_inv)."""
    hf = is_hf_naming(state)
    out = {}
    for k, v in state.items():
        name = hf_to_moela(k) if hf else k
        out[_DEEPSEEK_SCALE.sub(".weight_scale_inv", name)] = v
    return out


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of one ``.safetensors`` file, or of every shard in a directory (with or
    without a ``model.safetensors.index.json``)."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        index = path / "model.safetensors.index.json"
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"path: no .safetensors files in {path}")
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(load_file(path / f))
        return state
    if not path.exists():
        raise FileNotFoundError(f"path: {path} does not exist")
    return load_file(path)


def _summarise(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_checkpoint(
    module: nn.Module,
    source: str | os.PathLike | Mapping[str, torch.Tensor],
    *,
    strict: bool = True,
    ignore: Iterable[str] = (),
) -> None:
    """Load DeepSeek- or HF-named weights (a state dict, a safetensors file or a shard folder).

    Keys matching a regex in ``ignore`` are dropped first (e.g. ``r"^layers\\.61\\."`` for V3's
    multi-token-prediction layer). With ``strict``, missing or unexpected keys raise
    :class:`CheckpointKeyError` naming them; shape mismatches raise too.
    """
    state = dict(source) if isinstance(source, Mapping) else read_safetensors(source)
    state = to_moela_names(state)
    patterns = [re.compile(p) for p in ignore]
    state = {k: v for k, v in state.items() if not any(p.search(k) for p in patterns)}
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing keys: {_summarise(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_summarise(unexpected)}")
        raise CheckpointKeyError(f"checkpoint does not match {type(module).__name__}: " + "; ".join(parts))
    for k, v in state.items():
        if k in expected and expected[k].shape != v.shape:
            raise CheckpointKeyError(f"{k}: expected shape {tuple(expected[k].shape)}, got {tuple(v.shape)}")
    module.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)


def save_checkpoint(
    module: nn.Module, path: str | os.PathLike, *, naming: str = "moela", max_shard_bytes: int | None = None
) -> list[Path]:
    """Write ``module.state_dict()`` as safetensors, in moela/DeepSeek or HF naming.

    With ``max_shard_bytes`` the tensors go into ``path/model-0000i-of-0000n.safetensors`` plus
    a ``model.safetensors.index.json`` (Hugging Face's layout); otherwise ``path`` is one file.
    """
    from safetensors.torch import save_file

    if naming not in ("moela", "deepseek", "hf"):
        raise ValueError(f"naming: expected 'moela', 'deepseek' or 'hf', got {naming!r}")
    state = {(moela_to_hf(k) if naming == "hf" else k): v.detach().contiguous().cpu()
             for k, v in module.state_dict().items()}
    path = Path(path)
    if max_shard_bytes is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(state, path)
        return [path]
    path.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    files, weight_map = [], {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, path / name)
        files.append(path / name)
        weight_map.update(dict.fromkeys(shard, name))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return files
