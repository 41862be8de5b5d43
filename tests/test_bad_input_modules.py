"""Bad input to the layers (``moela.model`` and their twins in ``moela.reference``), to
``load_checkpoint`` and to ``ModelArgs``.

One table (``CASES``) drives one parametrized test, as in test_bad_input_ops.py. A row's build
function returns the calls to make, one per side: ``model`` and ``reference`` for the twins
(``moela.model.MoE`` / ``moela.reference.MoE``, the same for ``MLA``, with the same weights), the
backends of ``FP8Linear``, one side for ``Transformer``, ``load_checkpoint`` and ``ModelArgs``.
``Raises``: every side raises the same type naming the argument first; ``Computes``: every side
returns and ``doc(outputs)`` checks agreement (the derived tolerance against a float64 twin) and
the documented result. What the loader's and the config's own suites check already
(tests/model/test_checkpoint.py, tests/reference/test_config.py) is not repeated here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from bad_input_testing import (
    Case,
    Computes,
    Raises,
    assert_fp8_linear_close,
    assert_same_numbers,
    case_id,
    check_raises,
    outcome,
)
from safetensors.torch import save_file

import moela.model as M
import moela.reference as R
from moela.model import FP8Linear, load_checkpoint
from moela.model.checkpoint import CheckpointError
from moela.reference import ModelArgs

DEV = "cuda" if torch.cuda.is_available() else "cpu"
NAN = float("nan")

MOE_ARGS = ModelArgs.from_name("tiny", dim=16, moe_inter_dim=8, n_routed_experts=8, n_activated_experts=2,
                               n_expert_groups=4, n_limited_groups=2, backend="triton")
MLA_ARGS = ModelArgs.from_name("tiny", dim=32, n_heads=2, backend="triton")


def _twins(model_cls, ref_cls, args):
    """The layer, its reference twin with the same weights, and a float64 twin (the derived tolerance)."""
    torch.manual_seed(0)
    model = model_cls(args).to(DEV)
    ref, exact = ref_cls(args).to(DEV), ref_cls(args).to(DEV)
    ref.load_state_dict(model.state_dict())
    exact.load_state_dict(model.state_dict())
    return model.eval(), ref.eval(), exact.double().eval()


class PerLayer:
    """An input made for each layer (a cache): ``make(layer)``."""

    def __init__(self, make):
        self.make = make


def _calls(fn, **inputs):
    """One call per twin: fn(layer, **inputs), inputs built once (a PerLayer one for each layer)."""
    def build():
        model, ref, exact = _twins(*fn.twins)
        made = {k: v() if callable(v) else v for k, v in inputs.items()}

        def call(layer, cast=lambda v: v):
            return fn(layer, **{k: v.make(layer) if isinstance(v, PerLayer) else cast(v) for k, v in made.items()})
        return {"model": lambda: call(model), "reference": lambda: call(ref), "exact": lambda: call(exact, _double)}
    return build


def _double(v):
    return v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v


def _agree(doc=None):
    """model and reference agree (NaN/inf where the reference has them, finite values within the
    derived tolerance against the float64 twin); then the documented result, if any."""
    def check(outs):
        assert_same_numbers(outs["model"], outs["exact"], outs["reference"])
        if doc is not None:
            doc(outs["model"])
    return check


# --------------------------------------------------------------------------- MoE
def _moe(layer, x):
    with torch.no_grad():
        return layer(x)


_moe.twins = (M.MoE, R.MoE, MOE_ARGS)


def _x(*shape, dtype=torch.float32, device=None):
    return lambda: torch.randn(*shape, device=device or DEV).to(dtype)


def _only_token_nan(out):
    nan_tokens = out.isnan().any(-1)
    assert nan_tokens.tolist() == [False, True, False, False], "a NaN token must leave the others finite"


def _nan_token():
    x = torch.randn(4, 16, device=DEV)
    x[1, 3] = NAN
    return x


MOE_ROWS = [
    ("x-list", dict(x=[[1.0] * 16]), Raises(TypeError, "x")),
    ("x-int", dict(x=lambda: torch.ones(3, 16, dtype=torch.int32, device=DEV)), Raises(TypeError, "x")),
    ("x-bf16-into-fp32", dict(x=_x(3, 16, dtype=torch.bfloat16)), Raises(TypeError, "x")),
    ("x-float64-into-fp32", dict(x=_x(3, 16, dtype=torch.float64)), Raises(TypeError, "x")),
    ("x-scalar", dict(x=lambda: torch.tensor(1.0, device=DEV)), Raises(ValueError, "x")),
    ("x-last-dim", dict(x=_x(3, 12)), Raises(ValueError, "x")),
    ("x-meta", dict(x=_x(3, 16, device="meta")), Raises(ValueError, "x")),
    ("T=0", dict(x=_x(0, 16)), Computes(_agree())),
    ("3d", dict(x=_x(2, 3, 16)), Computes(_agree())),
    ("x-transposed", dict(x=lambda: torch.randn(16, 4, device=DEV).T), Computes(_agree())),
    ("x-stride-0", dict(x=lambda: torch.randn(1, 16, device=DEV).expand(4, 16)), Computes(_agree())),
    ("nan-token", dict(x=_nan_token), Computes(_agree(_only_token_nan))),
]


def _fp8_moe_calls(x):
    def build():
        layer = M.MoE(MOE_ARGS.replace(dim=128, moe_inter_dim=128, dtype="fp8")).to(DEV)
        return {"model": lambda: _moe(layer, x())}
    return build


# --------------------------------------------------------------------------- MLA
def _mla(layer, x, start_pos=0, cache=None):
    with torch.no_grad():
        return layer(x, start_pos, cache)


_mla.twins = (M.MLA, R.MLA, MLA_ARGS)


def _new_cache(batch=2, **kw):
    return PerLayer(lambda layer: layer.new_cache(batch, **kw))


def _decode_over_garbage(layer, x):
    """Prefill 3 tokens, then decode the 4th over a cache whose rows past it hold NaN."""
    cache = layer.new_cache(2)
    for t in cache.tensors.values():
        t[:, 4:] = NAN
    with torch.no_grad():
        layer(x[:, :3], 0, cache)
        return layer(x[:, 3:4], 3, cache)


def _finite(out):
    assert torch.isfinite(out).all()


_decode_over_garbage.twins = _mla.twins

MLA_ROWS = [
    ("x-list", dict(x=[[[1.0] * 32]]), Raises(TypeError, "x")),
    ("x-int", dict(x=lambda: torch.ones(2, 2, 32, dtype=torch.int64, device=DEV)), Raises(TypeError, "x")),
    ("x-2d", dict(x=_x(2, 32)), Raises(ValueError, "x")),
    ("x-dim", dict(x=_x(2, 2, 30)), Raises(ValueError, "x")),
    ("x-float64-into-fp32", dict(x=_x(2, 2, 32, dtype=torch.float64)), Raises(TypeError, "x")),
    ("x-meta", dict(x=_x(2, 2, 32, device="meta")), Raises(ValueError, "x")),
    ("start_pos=10**9", dict(x=_x(2, 1, 32), start_pos=10**9, cache=_new_cache()), Raises(ValueError, "start_pos")),
    ("start_pos=-1", dict(x=_x(2, 1, 32), start_pos=-1), Raises(ValueError, "start_pos")),
    ("start_pos=1.0", dict(x=_x(2, 1, 32), start_pos=1.0), Raises(TypeError, "start_pos")),
    ("start_pos=True", dict(x=_x(2, 1, 32), start_pos=True), Raises(TypeError, "start_pos")),
    ("start_pos-tensor", dict(x=_x(2, 1, 32), start_pos=torch.tensor(0)), Raises(TypeError, "start_pos")),
    ("start_pos-past-cache", dict(x=_x(2, 2, 32), start_pos=7, cache=_new_cache(max_seq_len=8)),
     Raises(ValueError, "start_pos")),
    ("cache-dict", dict(x=_x(2, 1, 32), cache={"kv": 1}), Raises(TypeError, "cache")),
    ("cache-naive-into-absorb", dict(x=_x(2, 1, 32), cache=PerLayer(lambda layer: R.KVCache.zeros(
        2, 8, {"k": (2, 24), "v": (2, 16)}, device=DEV))), Raises(ValueError, "cache")),
    ("cache-dtype", dict(x=_x(2, 1, 32), cache=_new_cache(dtype=torch.float64)), Raises(TypeError, "cache")),
    ("cache-meta", dict(x=_x(2, 1, 32), cache=_new_cache(device="meta")), Raises(ValueError, "cache")),
    ("cache-batch", dict(x=_x(3, 1, 32), cache=_new_cache(2)), Raises(ValueError, "cache")),
    ("S=0", dict(x=_x(2, 0, 32), cache=_new_cache()), Computes(_agree())),
    ("x-strided", dict(x=lambda: torch.randn(2, 2, 64, device=DEV)[..., ::2]), Computes(_agree())),
]


# --------------------------------------------------------------------------- FP8Linear, Transformer
def _fp8_linears():
    torch.manual_seed(0)
    src = torch.nn.Linear(256, 8, bias=True, device=DEV)
    first = FP8Linear.from_linear(src, backend="reference")
    layers = {"reference": first}
    for backend in ("triton", "dequant"):
        layer = FP8Linear(256, 8, bias=True, backend=backend, dtype=torch.float32, device=DEV)
        layer.load_state_dict(first.state_dict())
        layers[backend] = layer
    return layers


def _linear_calls(x, backends=("reference", "triton", "dequant")):
    def build():
        layers = _fp8_linears()
        made = x()
        return {b: (lambda layer=layers[b]: layer(made)) for b in backends}
    return build


def _fp8_close(outs):
    """Both backends against the definition: the derived FP8 GEMM bound of fp8_testing."""
    layer = outs["layer"]
    for backend in ("reference", "triton"):
        assert_fp8_linear_close(outs[backend], outs["x"], layer.weight, layer.weight_scale_inv, layer.bias)


def _linear_agree(x):
    def build():
        layers = _fp8_linears()
        made = x()
        return {"reference": lambda: layers["reference"](made), "triton": lambda: layers["triton"](made),
                "x": lambda: made, "layer": lambda: layers["reference"]}
    return build


def _transformer_calls(tokens, start_pos=0, caches=None):
    def build():
        torch.manual_seed(0)
        model = M.Transformer(ModelArgs.from_name("tiny", backend="reference")).to(DEV)
        made = tokens()
        cs = caches(model) if callable(caches) else caches
        return {"model": lambda: model(made, start_pos, cs)}
    return build


def _tokens(*shape, dtype=torch.int64, device=None, high=256):
    return lambda: torch.randint(0, high, shape, device=device or DEV).to(dtype)


# --------------------------------------------------------------------------- load_checkpoint, ModelArgs
def _norm():
    return R.RMSNorm(4)


def _file(tmp: Path, name: str, data: bytes) -> Path:
    path = tmp / name
    path.write_bytes(data)
    return path


def _folder(tmp: Path, index) -> Path:
    save_file({"weight": torch.ones(4)}, tmp / "a.safetensors")
    (tmp / "model.safetensors.index.json").write_text(index if isinstance(index, str) else json.dumps(index))
    return tmp


def _meta_norm():
    with torch.device("meta"):
        return _norm()


#: (what, make(tmp) -> thunk, error, the argument the message names first; None: the path of the
#: file, which a loader error names first)
LOADER_ROWS = [
    ("module-str", lambda tmp: lambda: load_checkpoint("norm", {"weight": torch.ones(4)}), TypeError, "module"),
    ("meta-module", lambda tmp: lambda: load_checkpoint(_meta_norm(), {"weight": torch.ones(4)}), ValueError,
     "module"),
    ("meta-source-tensor", lambda tmp: lambda: load_checkpoint(_norm(), {"weight": torch.ones(4, device="meta")}),
     CheckpointError, "'weight' (<state dict>)"),
    ("empty-file", lambda tmp: lambda: load_checkpoint(_norm(), _file(tmp, "e.safetensors", b"")), CheckpointError,
     None),
    ("header-past-the-file", lambda tmp: lambda: load_checkpoint(_norm(), _file(
        tmp, "h.safetensors", (10**9).to_bytes(8, "little") + b"{}")), CheckpointError, None),
    ("header-not-json", lambda tmp: lambda: load_checkpoint(_norm(), _file(
        tmp, "j.safetensors", (10).to_bytes(8, "little") + b"{not json}")), CheckpointError, None),
    ("index-a-list", lambda tmp: lambda: load_checkpoint(_norm(), _folder(tmp, "[1]")), CheckpointError, None),
    ("index-shard-not-a-name", lambda tmp: lambda: load_checkpoint(_norm(), _folder(tmp, {"weight_map": {
        "weight": 3}})), CheckpointError, None),
    ("index-key-twice", lambda tmp: lambda: load_checkpoint(_norm(), _folder(
        tmp, '{"weight_map": {"weight": "a.safetensors", "weight": "b.safetensors"}}')), CheckpointError, None),
    ("folder-without-shards", lambda tmp: lambda: load_checkpoint(_norm(), tmp), FileNotFoundError, "path"),
    ("nan-into-fp8", lambda tmp: lambda: load_checkpoint(FP8Linear(128, 128, backend="reference"), {
        "weight": torch.full((128, 128), NAN, dtype=torch.bfloat16), "weight_scale_inv": torch.ones(1, 1)}),
     CheckpointError, "weight (<state dict>)"),
    ("config-not-a-path", lambda tmp: lambda: ModelArgs.from_json(3), TypeError, "path"),
    ("config-a-folder", lambda tmp: lambda: ModelArgs.from_json(tmp), IsADirectoryError, None),
    ("config-none", lambda tmp: lambda: ModelArgs.from_dict(None), TypeError, "config"),
    ("args-numpy-int", lambda tmp: lambda: ModelArgs.from_name("tiny", dim=__import__("numpy").int64(64)),
     ValueError, "ModelArgs.dim"),
    ("args-bool-int", lambda tmp: lambda: ModelArgs.from_name("tiny", max_seq_len=True), ValueError,
     "ModelArgs.max_seq_len"),
    ("args-zero-experts", lambda tmp: lambda: ModelArgs.from_name("tiny", n_routed_experts=0), ValueError,
     "ModelArgs.n_routed_experts"),
    ("args-zero-batch", lambda tmp: lambda: ModelArgs.from_name("tiny", max_batch_size=0), ValueError,
     "ModelArgs.max_batch_size"),
    ("args-route_scale-str", lambda tmp: lambda: ModelArgs.from_name("tiny", route_scale="2"), ValueError,
     "ModelArgs.route_scale"),
    ("args-dtype-none", lambda tmp: lambda: ModelArgs.from_name("tiny", dtype=None), ValueError, "ModelArgs.dtype"),
]


# --------------------------------------------------------------------------- the table
CASES: list[Case] = [
    *(Case("MoE", what, _calls(_moe, **inputs), expect) for what, inputs, expect in MOE_ROWS),
    Case("MoE", "fp8-float64-x", _fp8_moe_calls(_x(3, 128, dtype=torch.float64)), Raises(TypeError, "x")),
    Case("MoE", "fp8-int-x", _fp8_moe_calls(lambda: torch.ones(3, 128, dtype=torch.int32, device=DEV)),
         Raises(TypeError, "x")),
    *(Case("MLA", what, _calls(_mla, **inputs), expect) for what, inputs, expect in MLA_ROWS),
    Case("MLA", "decode-over-nan-garbage", _calls(_decode_over_garbage, x=_x(2, 4, 32)), Computes(_agree(_finite))),
    Case("FP8Linear", "x-list", _linear_calls(lambda: [1.0] * 256), Raises(TypeError, "x")),
    Case("FP8Linear", "x-int", _linear_calls(lambda: torch.ones(3, 256, dtype=torch.int32, device=DEV)),
         Raises(TypeError, "x")),
    Case("FP8Linear", "x-fp8", _linear_calls(lambda: torch.zeros(3, 256, device=DEV).to(torch.float8_e4m3fn)),
         Raises(TypeError, "x")),
    Case("FP8Linear", "x-K", _linear_calls(_x(3, 128)), Raises(ValueError, "x")),
    Case("FP8Linear", "x-scalar", _linear_calls(lambda: torch.tensor(1.0, device=DEV)), Raises(ValueError, "x")),
    Case("FP8Linear", "x-meta", _linear_calls(_x(3, 256, device="meta")), Raises(ValueError, "x")),
    Case("FP8Linear", "x-float64-triton", _linear_calls(_x(3, 256, dtype=torch.float64), ("triton",)),
         Raises(TypeError, "x")),
    Case("FP8Linear", "x-float64-torch", _linear_calls(_x(3, 256, dtype=torch.float64), ("reference", "dequant")),
         Computes()),
    Case("FP8Linear", "nan-x", _linear_agree(lambda: torch.randn(3, 256, device=DEV).index_fill_(1, torch.tensor(
        [7], device=DEV), NAN)), Computes(_fp8_close)),
    Case("FP8Linear", "rows=0", _linear_agree(_x(0, 256)), Computes(_fp8_close)),
    Case("Transformer", "tokens-float", _transformer_calls(_x(1, 2)), Raises(ValueError, "tokens")),
    Case("Transformer", "tokens-1d", _transformer_calls(_tokens(3)), Raises(ValueError, "tokens")),
    Case("Transformer", "tokens-meta", _transformer_calls(_tokens(1, 2, device="meta")), Raises(ValueError, "tokens")),
    Case("Transformer", "caches-length", _transformer_calls(_tokens(1, 2), caches=[]), Raises(ValueError, "caches")),
    Case("Transformer", "start_pos=10**9", _transformer_calls(_tokens(1, 2), 10**9, lambda m: m.new_caches(1)),
         Raises(ValueError, "start_pos")),
    Case("Transformer", "S=0", _transformer_calls(_tokens(1, 0)), Computes()),
]


def check_case(case: Case) -> None:
    calls = case.build()
    outs = {side: outcome(fn, {}) for side, fn in calls.items()}
    expect = case.expect
    if isinstance(expect, Raises):
        for side, got in outs.items():
            if side != "exact":
                check_raises(side, got, expect)
        return
    for side, got in outs.items():
        if isinstance(got, BaseException):
            raise AssertionError(f"{side} raised instead of computing: {type(got).__name__}: {got}") from got
    if expect.doc is not None:
        expect.doc(outs)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_bad_input_to_a_module(case):
    check_case(case)


@pytest.mark.parametrize("what,make,error,arg", LOADER_ROWS, ids=[r[0] for r in LOADER_ROWS])
def test_bad_checkpoints_and_configs(tmp_path, what, make, error, arg):
    call = make(tmp_path)
    got = outcome(lambda: call(), {})
    assert type(got) is error, f"expected {error.__name__}, got {type(got).__name__}: {got}"
    if arg is None:  # a file's error names the file (the folder's for an index)
        assert str(tmp_path) in str(got), f"the message should name the file: {got}"
    else:
        assert str(got).startswith(f"{arg}: "), f"the message should name {arg!r} first: {got}"
