"""Checkpoints: DeepSeek's and Hugging Face's parameter names, safetensors files and shard folders.

moela's modules use DeepSeek-V3's own names (``inference/model.py``)::

    embed.weight, layers.N.attn_norm.weight, layers.N.attn.{wq | wq_a, q_norm, wq_b}.weight,
    layers.N.attn.{wkv_a, kv_norm, wkv_b, wo}.weight, layers.N.ffn_norm.weight,
    layers.N.ffn.{w1,w2,w3}.weight                              (dense layers)
    layers.N.ffn.gate.weight, layers.N.ffn.gate.bias,
    layers.N.ffn.experts.I.{w1,w2,w3}.weight, layers.N.ffn.shared_experts.{w1,w2,w3}.weight,
    norm.weight, head.weight

with FP8 weights carrying a float32 ``weight_scale_inv`` (128×128 blocks) beside ``weight``
(DeepSeek's converter calls it ``scale``; both load). Hugging Face's names
(``model.layers.N.self_attn.q_a_proj.weight``, ``mlp.experts.I.gate_proj``,
``mlp.gate.e_score_correction_bias``, ``lm_head``...) are translated on load and on request on
save; transformers 5's fused experts ``mlp.experts.gate_up_proj`` (E, 2I, D: each expert's gate
rows, then its up rows), ``mlp.experts.down_proj`` (E, D, I) and their ``*_scale_inv`` are split
into per-expert names on load.

:func:`load_checkpoint` reads lazily: names and shapes come from the safetensors headers, and
only the tensors the module takes are read. A folder's ``model.safetensors.index.json`` decides
which shard holds each key. Every refusal names the file and the key: unreadable files and
indexes, keys stored twice, missing or unexpected keys, shapes, and casts that would change
values (see :func:`load_checkpoint`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "hf_to_moela", "moela_to_hf", "is_hf_naming", "to_moela_names", "read_safetensors",
    "load_checkpoint", "save_checkpoint", "CheckpointError", "CheckpointKeyError",
]

INDEX_NAME = "model.safetensors.index.json"

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
# transformers 5's stacked experts: <...>.experts.{gate_up_proj | down_proj}[_scale_inv]
_FUSED = re.compile(r"^(?P<experts>(?:.+\.)?experts)\.(?P<proj>gate_up_proj|down_proj)(?P<scale>_scale_inv)?$")
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz,
               torch.float8_e8m0fnu)
_E4M3_MAX = 448.0
_SAFETENSORS_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "F16": torch.float16,
    "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu, "C64": torch.complex64, "C128": torch.complex128,
}
_IN_MEMORY = "<state dict>"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the module; the message names the file and key."""


class CheckpointKeyError(CheckpointError):
    """A checkpoint whose keys or shapes don't match the module: lists the missing and unexpected keys."""


# --------------------------------------------------------------------------- names
def is_hf_naming(keys: Iterable[str]) -> bool:
    """True when any key uses a Hugging Face-only name (``model.``, ``self_attn``, ``gate_proj``...)."""
    for k in keys:
        parts = k.split(".")
        if parts[0] in ("model", "lm_head") or parts[-1] in ("e_score_correction_bias", "gate_up_proj"):
            return True
        if any(p in _HF_TO_MOELA for p in parts[:-1]):
            return True
    return False


def hf_to_moela(name: str) -> str:
    """``model.layers.3.mlp.experts.7.gate_proj.weight`` -> ``layers.3.ffn.experts.7.w1.weight``.

    The fused ``model.layers.3.mlp.experts.gate_up_proj`` keeps its leaf:
    ``layers.3.ffn.experts.gate_up_proj`` (split per expert on load).
    """
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


def _moela_name(key: str, hf: bool) -> str:
    return _DEEPSEEK_SCALE.sub(".weight_scale_inv", hf_to_moela(key) if hf else key)


# --------------------------------------------------------------------------- stored tensors
@dataclasses.dataclass(frozen=True)
class _Stored:
    """One tensor of a checkpoint, known from its header before it is read."""

    key: str  # its name in the checkpoint
    file: Path | None  # None: a tensor of an in-memory state dict
    shape: tuple[int, ...]
    dtype: torch.dtype | None  # None: a safetensors dtype torch has no name for

    @property
    def where(self) -> str:
        return f"{self.key} ({_IN_MEMORY if self.file is None else self.file})"


@dataclasses.dataclass(frozen=True)
class _Entry:
    """A moela-named tensor: a stored tensor, or one expert's rows of a fused one."""

    stored: _Stored
    shape: tuple[int, ...]
    expert: int | None = None  # fused: the expert index
    rows: slice | None = None  # fused gate_up_proj: the gate or the up rows

    def take(self, t: torch.Tensor) -> torch.Tensor:
        if self.expert is not None:
            t = t[self.expert]
        return t if self.rows is None else t[self.rows]


def _safe_open(file: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(file), framework="pt")
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError)
        raise CheckpointError(f"{file}: not a readable safetensors file: {e}") from None


def _list_file(file: Path) -> dict[str, _Stored]:
    with _safe_open(file) as f:
        out = {}
        for key in f.keys():
            part = f.get_slice(key)
            out[key] = _Stored(key, file, tuple(part.get_shape()), _SAFETENSORS_DTYPES.get(part.get_dtype()))
        return out


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out = {}
    for k, v in pairs:
        if k in out:
            raise KeyError(k)
        out[k] = v
    return out


def _read_index(index: Path) -> dict[str, str]:
    try:
        data = json.loads(index.read_text(encoding="utf-8"), object_pairs_hook=_unique_keys)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{index}: not valid JSON: {e}") from None
    except KeyError as e:  # json would keep the last of two entries silently
        raise CheckpointError(f"{index}: key {e.args[0]!r} appears twice") from None
    if not isinstance(data, dict) or "weight_map" not in data:
        raise CheckpointError(f"{index}: expected a JSON object with a 'weight_map' (key -> shard file name)")
    weight_map = data["weight_map"]
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(f"{index}: 'weight_map' must be a non-empty object of key -> shard file name")
    for shard in set(weight_map.values()):
        p = Path(shard)
        if p.is_absolute() or ".." in p.parts:
            raise CheckpointError(f"{index}: shard {shard!r} is outside the checkpoint folder")
    return weight_map


def _list_folder(folder: Path) -> dict[str, _Stored]:
    """Every key of a shard folder, each from the shard the index names (or the only shard holding it)."""
    index = folder / INDEX_NAME
    if index.is_file():
        weight_map = _read_index(index)
        stored: dict[str, _Stored] = {}
        for shard in sorted(set(weight_map.values())):
            file = folder / shard
            if not file.is_file():
                raise FileNotFoundError(f"{index}: weight_map names {shard}, which is not in {folder}")
            for key, s in _list_file(file).items():
                if key not in weight_map:
                    raise CheckpointError(f"{key}: stored in {file} but not listed in {index}")
                if weight_map[key] != shard:
                    raise CheckpointError(f"{key}: {index} maps it to {weight_map[key]}, but {file} holds a copy too")
                stored[key] = s
        absent = sorted(k for k in weight_map if k not in stored)
        if absent:
            raise CheckpointError(f"{index}: {len(absent)} key(s) are not in the shard it names, e.g. "
                                  f"{absent[0]} -> {weight_map[absent[0]]}")
        return stored
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"path: no .safetensors files in {folder}")
    stored = {}
    for file in files:
        for key, s in _list_file(file).items():
            if key in stored:
                raise CheckpointError(f"{key}: stored in both {stored[key].file} and {file}, and no {INDEX_NAME} "
                                      "says which to read (tensor-parallel shards must be merged first)")
            stored[key] = s
    return stored


def _list_source(source: str | os.PathLike | Mapping[str, torch.Tensor]) -> dict[str, _Stored]:
    if isinstance(source, Mapping):
        stored = {}
        for key, t in source.items():
            if not isinstance(key, str) or not isinstance(t, torch.Tensor):
                raise CheckpointError(f"{key!r} ({_IN_MEMORY}): expected str keys and torch.Tensor values, got "
                                      f"{type(t).__name__}")
            if t.is_meta:
                raise CheckpointError(f"{key!r} ({_IN_MEMORY}): a meta tensor carries no values to load")
            stored[key] = _Stored(key, None, tuple(t.shape), t.dtype)
        return stored
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source: expected a path or a state dict, got {type(source).__name__}")
    path = Path(source)
    if path.is_dir():
        return _list_folder(path)
    if not path.exists():
        raise FileNotFoundError(f"path: {path} does not exist")
    return _list_file(path)


def _read(entries: Iterable[_Stored], source) -> dict[str, torch.Tensor]:
    """The tensors of ``entries`` (checkpoint names), each file opened once."""
    out: dict[str, torch.Tensor] = {}
    by_file: dict[Path | None, list[_Stored]] = {}
    for s in entries:
        by_file.setdefault(s.file, []).append(s)
    for file, group in by_file.items():
        if file is None:
            out.update((s.key, source[s.key]) for s in group)
            continue
        with _safe_open(file) as f:
            for s in group:
                try:
                    out[s.key] = f.get_tensor(s.key)
                except Exception as e:
                    raise CheckpointError(f"{s.where}: cannot read the tensor: {e}") from None
    return out


def _moela_entries(stored: Mapping[str, _Stored]) -> dict[str, _Entry]:
    """moela name -> entry, fused experts split; a name given twice (e.g. ``scale`` and ``weight_scale_inv``) raises."""
    hf = is_hf_naming(stored)
    out: dict[str, _Entry] = {}
    for s in stored.values():
        name = _moela_name(s.key, hf)
        fused = _FUSED.match(name)
        for moela, entry in (_split_fused(fused, s) if fused else [(name, _Entry(s, s.shape))]):
            if moela in out:
                raise CheckpointError(f"{moela}: given twice, by {out[moela].stored.where} and {s.where}")
            out[moela] = entry
    return out


def _split_fused(m: re.Match, s: _Stored) -> list[tuple[str, _Entry]]:
    """``experts.gate_up_proj`` (E, 2I, D) -> ``experts.{e}.w1/w3.weight``; ``experts.down_proj`` -> ``w2``."""
    leaf = "weight_scale_inv" if m["scale"] else "weight"
    if len(s.shape) != 3:
        raise CheckpointError(f"{s.where}: expected a 3-D stacked-experts tensor, got shape {s.shape}")
    E, rows, cols = s.shape
    out = []
    for e in range(E):
        base = f"{m['experts']}.{e}"
        if m["proj"] == "down_proj":
            out.append((f"{base}.w2.{leaf}", _Entry(s, (rows, cols), e)))
            continue
        if rows % 2:
            raise CheckpointError(f"{s.where}: {rows} rows cannot split into equal gate and up halves")
        half = rows // 2
        out.append((f"{base}.w1.{leaf}", _Entry(s, (half, cols), e, slice(0, half))))
        out.append((f"{base}.w3.{leaf}", _Entry(s, (half, cols), e, slice(half, rows))))
    return out


def to_moela_names(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict in HF or DeepSeek naming in moela's names (``scale`` -> ``weight_scale_inv``, fused
    experts split into per-expert views)."""
    entries = _moela_entries(_list_source(state))
    return {name: e.take(state[e.stored.key]) for name, e in entries.items()}


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors (by their stored names) of one ``.safetensors`` file or of a shard folder.

    In a folder with a ``model.safetensors.index.json`` each key is read from the shard the
    index names; a copy in another shard, or a key the index does not list, raises.
    """
    stored = _list_source(path)
    return _read(stored.values(), None)


# --------------------------------------------------------------------------- casts
def _kind(dtype: torch.dtype) -> str:
    if dtype in _FP8_DTYPES:
        return "fp8"
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    return "float" if dtype.is_floating_point else "int"


def _check_kind(name: str, e: _Entry, want: torch.dtype, has_scale: bool) -> None:
    """Refuse casts that change what a value means, before anything is read."""
    got = e.stored.dtype
    if got is None or got == want:
        return
    if got == torch.float8_e8m0fnu and want in (torch.float32, torch.float64):
        return  # power-of-two scales: exact in float32
    if want in _FP8_DTYPES:
        if _kind(got) != "float":
            raise CheckpointError(f"{e.stored.where}: a {got} tensor cannot load into the {want} parameter {name}")
        if not has_scale:
            raise CheckpointError(f"{e.stored.where}: a {got} weight cannot load into the {want} parameter {name} "
                                  "without its weight_scale_inv in the checkpoint (quantize it first, e.g. "
                                  "moela.reference.quant_weight)")
        return
    if got in _FP8_DTYPES:
        raise CheckpointError(f"{e.stored.where}: an {got} tensor cannot load into the {want} parameter {name}: "
                              "its scale would be dropped (build the module with dtype='fp8', or dequantize first)")
    if _kind(got) != _kind(want):
        raise CheckpointError(f"{e.stored.where}: a {got} tensor cannot load into the {want} parameter {name} "
                              f"({_kind(got)} -> {_kind(want)} changes what the values mean)")


def _check_values(name: str, e: _Entry, t: torch.Tensor, want: torch.dtype) -> None:
    """Refuse casts that would change values: past e4m3's ±448 or off its grid, or past the target's range."""
    if t.dtype in (want, torch.float8_e8m0fnu) or t.numel() == 0:  # e8m0 scales: exact in float32 (_check_kind)
        return
    if want == torch.float8_e4m3fn:
        amax = t.detach().abs().max().item()
        if not amax <= _E4M3_MAX:  # NaN too
            raise CheckpointError(f"{e.stored.where}: values beyond e4m3's finite range ±{_E4M3_MAX:g} "
                                  f"(max |x| = {amax:g}) cannot load into the {want} parameter {name}")
        if not torch.equal(t.to(want).to(t.dtype), t):
            raise CheckpointError(f"{e.stored.where}: values that e4m3 cannot represent exactly would be rounded "
                                  f"loading into the {want} parameter {name}")
        return
    if want in _FP8_DTYPES:
        raise CheckpointError(f"{e.stored.where}: a {t.dtype} tensor cannot load into the {want} parameter {name}")
    if _kind(want) == "float" and torch.finfo(want).max < torch.finfo(t.dtype).max:  # e.g. float32 -> float16
        finite = t[torch.isfinite(t)]
        if finite.numel() and finite.abs().max().item() > torch.finfo(want).max:
            raise CheckpointError(f"{e.stored.where}: finite values beyond {want}'s range (max |x| = "
                                  f"{finite.abs().max().item():g}) would become inf in the parameter {name}")
    elif _kind(want) == "int":
        lo, hi = torch.iinfo(want).min, torch.iinfo(want).max
        if t.min().item() < lo or t.max().item() > hi:
            raise CheckpointError(f"{e.stored.where}: values outside {want}'s range [{lo}, {hi}] cannot load into "
                                  f"the parameter {name}")


# --------------------------------------------------------------------------- loading
def _summarise(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def _moela_prefix(prefix: str) -> str:
    """``"model.layers.3.mlp"`` or ``"layers.3.ffn."`` -> ``"layers.3.ffn."``."""
    if not isinstance(prefix, str) or not prefix.strip("."):
        raise ValueError(f"prefix: expected a module path such as 'layers.3.ffn.' or 'model.layers.3.mlp.', "
                         f"got {prefix!r}")
    p = prefix if prefix.endswith(".") else prefix + "."
    return hf_to_moela(p + "weight").removesuffix("weight") if is_hf_naming([p + "weight"]) else p


def load_checkpoint(
    module: nn.Module,
    source: str | os.PathLike | Mapping[str, torch.Tensor],
    *,
    strict: bool = True,
    ignore: Iterable[str] = (),
    prefix: str | None = None,
) -> None:
    """Load DeepSeek- or HF-named weights (a state dict, a safetensors file or a shard folder).

    Args:
        module: the module to fill (its ``state_dict()`` names are DeepSeek's).
        source: a state dict, a ``.safetensors`` file, or a folder of shards (with or without a
            ``model.safetensors.index.json``; with one, each key is read from the shard it
            names, a copy of a key in another of its shards or a key it does not list raises,
            and files it does not name are not read).
        strict: missing or unexpected keys raise :class:`CheckpointKeyError` naming them.
        ignore: regexes over the (moela-named) keys to drop first, e.g. ``r"^layers\\.61\\."``
            for DeepSeek-V3's multi-token-prediction layer. Submodules that hold part of a layer
            on purpose declare their own (``checkpoint_ignore``: an expert-parallel MoE names
            the experts of the other ranks), which are added, so ``strict=True`` holds as is.
        prefix: load one submodule of a whole-model checkpoint: only keys under this module path
            (``"layers.3.ffn."`` or HF's ``"model.layers.3.mlp."``), with the prefix removed.

    Casts: a tensor loads into a parameter of another dtype only when no value changes its
    meaning. Refused, naming the key and file: int <-> float and other kind changes; an FP8
    tensor into a floating parameter (its scale would be dropped); a float tensor into an FP8
    parameter unless the checkpoint carries its ``weight_scale_inv`` and every value is an exact
    e4m3 value within ±448; finite values beyond a float parameter's range. Precision changes
    between floating dtypes (bf16 <-> float32) are the module's choice and allowed.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module: expected an nn.Module, got {type(module).__name__}")
    if isinstance(ignore, str):
        raise TypeError("ignore: expected an iterable of regexes, got a single string (wrap it in a list)")
    declared = [p for m in module.modules() for p in getattr(m, "checkpoint_ignore", ())]
    try:
        patterns = [re.compile(p) for p in [*ignore, *declared]]
    except (re.error, TypeError) as e:
        raise ValueError(f"ignore: not a list of regexes: {e}") from None
    entries = _moela_entries(_list_source(source))
    entries = {k: e for k, e in entries.items() if not any(p.search(k) for p in patterns)}
    label = _IN_MEMORY if isinstance(source, Mapping) else str(source)
    if prefix is not None:
        p = _moela_prefix(prefix)
        entries = {k[len(p):]: e for k, e in entries.items() if k.startswith(p)}
        if not entries:
            raise CheckpointKeyError(f"prefix={prefix!r}: no key of {label} is under {p!r} (in moela's names)")

    expected = module.state_dict()
    for name, e in entries.items():
        if name in expected:
            scale = name.removesuffix("weight") + "weight_scale_inv" if name.endswith("weight") else None
            _check_kind(name, e, expected[name].dtype, scale in entries)
    missing = sorted(set(expected) - set(entries))
    unexpected = sorted(set(entries) - set(expected))
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing keys: {_summarise(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_summarise(unexpected)}")
        hint = " (load one module of a whole-model checkpoint with prefix=)" if missing and unexpected else ""
        raise CheckpointKeyError(f"{label} does not match {type(module).__name__}: " + "; ".join(parts) + hint)
    for name, e in entries.items():
        if name in expected and tuple(expected[name].shape) != e.shape:
            raise CheckpointKeyError(f"{e.stored.where}: expected shape {tuple(expected[name].shape)} for {name}, "
                                     f"got {e.shape}")

    take = {k: e for k, e in entries.items() if k in expected}
    on_meta = [k for k in take if expected[k].is_meta]
    if on_meta:
        raise ValueError(f"module: {_summarise(on_meta)} on the meta device have no storage to load into "
                         f"(materialize the module first, e.g. module.to_empty(device='cpu'))")
    raw = _read({e.stored.key: e.stored for e in take.values()}.values(), source)
    state = {}
    for name, e in take.items():
        t = e.take(raw[e.stored.key])
        if e.stored.dtype is None:  # a dtype the header named in a way torch has no name for: check it now
            e = dataclasses.replace(e, stored=dataclasses.replace(e.stored, dtype=t.dtype))
            scale = name.removesuffix("weight") + "weight_scale_inv" if name.endswith("weight") else None
            _check_kind(name, e, expected[name].dtype, scale in entries)
        _check_values(name, e, t, expected[name].dtype)
        state[name] = t
    module.load_state_dict(state, strict=False)


# --------------------------------------------------------------------------- saving
def save_checkpoint(
    module: nn.Module, path: str | os.PathLike, *, naming: str = "moela", max_shard_bytes: int | None = None
) -> list[Path]:
    """Write ``module.state_dict()`` as safetensors, in moela/DeepSeek or HF (per-expert) naming.

    With ``max_shard_bytes`` the tensors go into ``path/model-0000i-of-0000n.safetensors`` plus
    a ``model.safetensors.index.json`` (Hugging Face's layout); otherwise ``path`` is one file.
    """
    from safetensors.torch import save_file

    if naming not in ("moela", "deepseek", "hf"):
        raise ValueError(f"naming: expected 'moela', 'deepseek' or 'hf', got {naming!r}")
    if max_shard_bytes is not None and (not isinstance(max_shard_bytes, int) or isinstance(max_shard_bytes, bool)
                                        or max_shard_bytes <= 0):
        raise ValueError(f"max_shard_bytes: expected a positive int or None, got {max_shard_bytes!r}")
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
    (path / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return files
