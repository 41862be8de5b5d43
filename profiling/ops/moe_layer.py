"""The whole MoE layer (routed experts + shared experts), forward and forward+backward.

moe_layer:            ``moela.model.MoE`` (gate -> plan -> permute -> grouped GEMMs -> combine)
moe_layer_fwd_bwd:    the same plus ``backward`` of a random output gradient (router and experts)
moe_layer_fp8:        the forward with FP8 (e4m3) expert weights
moe_layer_fp8_train:  forward+backward of ``ModelArgs(train_fp8=True)``: bf16 master weights, every
                      expert GEMM (fprop, dgrad, wgrad) in FP8; the e4m3 weight copies are made once
                      per optimizer step, so the timed steady state (the weights unchanged between
                      calls, as between the micro-batches of a step) does not re-quantize them

against the reference loop (``moela.reference.MoE``, with the same weights) and a torch-native
composition: the reference gate's routing (plain torch), argsort + index_select dispatch,
``torch._grouped_mm`` and ``index_add_`` combine (no host sync).

FLOPs: 3 expert GEMMs (``6·T·k·D·I``) plus the shared experts (``6·T·D·I_shared``) plus the router
(``2·T·D·E``); ×3 with the backward. Bytes: the weights of the experts that receive tokens (the
floor of a decode step; in their stored dtype, FP8 experts with their scales), the shared experts'
and the router's, x and y; with the backward also dy, dx and the gradients of those weights. The
tokens are routed by the layer's own gate on random x (the problem's ``load`` does not steer it),
so the active experts are counted from that routing.
"""

from __future__ import annotations

import torch

from moela.reference import MoE as ReferenceMoE
from moela.reference import gate as ref_gate

from ..registry import Case, Impl, Op, Unavailable, register
from ..shapes import CONFIGS, DECODE_TOKENS, PREFILL_TOKENS, Problem, token_problems
from ._common import close, generator, grouped_mm, probed, randn
from ._outside import layer_impls

_DTYPE = torch.bfloat16


def _layer(p: Problem, device: torch.device, seed: int):
    from moela.model import MoE

    precision = p.params.get("precision", "bf16")
    args = CONFIGS[p.params["config"]].replace(backend="triton", dtype="fp8" if precision == "fp8" else "bf16",
                                               train_fp8=precision == "fp8-train", **p.params.get("dims", {}))
    torch.manual_seed(seed)
    with torch.device(device):
        layer = MoE(args).to(_DTYPE)  # FP8 experts keep their dtype (and are random already)
    gen = generator(device, seed)
    with torch.no_grad():
        for name, t in layer.named_parameters():
            if t.dtype != torch.float8_e4m3fn and not name.endswith("scale_inv"):
                t.copy_(randn(t.shape, t.dtype, device, gen, std=t.shape[-1] ** -0.5 if t.ndim > 1 else 0.1))
    return args, layer


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def make_case(p: Problem, device: torch.device, seed: int) -> Case:
    args, layer = _layer(p, device, seed)
    T, D, E, k, I = p.params["tokens"], args.dim, args.n_routed_experts, args.n_activated_experts, args.moe_inter_dim
    x = randn((T, D), _DTYPE, device, generator(device, seed + 1))
    backward = p.params.get("backward", False)
    shared = args.n_shared_experts * I
    flops = 2.0 * T * (3 * k * D * I + 3 * D * shared + D * E) * (3 if backward else 1)
    with torch.no_grad():  # the experts the layer's gate picks for x (outside any timed region)
        ids = ref_gate(x, layer.gate.weight, layer.gate.bias, args)[1]
    active = int(torch.unique(ids).numel())
    expert = [layer.w13[0], layer.w2[0]] + ([layer.w13_scale_inv[0], layer.w2_scale_inv[0]] if layer.fp8 else [])
    shared_w = list(layer.shared_experts.parameters()) if layer.shared_experts is not None else []
    weights = active * _nbytes(expert) + _nbytes(shared_w) + _nbytes([layer.gate.weight])
    bias = _nbytes([layer.gate.bias]) if layer.gate.bias is not None else 0  # read, never differentiated
    nbytes = float(weights * (2 if backward else 1) + bias + (4 if backward else 2) * T * D * x.element_size())
    layer.train(backward)
    dy = randn((T, D), _DTYPE, device, generator(device, seed + 2)) if backward else None
    return Case(p, {"x": x, "dy": dy, "layer": layer, "args": args, "backward": backward}, flops=flops, bytes=nbytes,
                info={"tokens": T, "experts": E, "active_experts": active})


def layer_runner(fn, inputs: dict, module: torch.nn.Module | None = None):
    """``fn(x)``, or ``fn(x).backward(dy)`` returning (y, dx): what one timed call does.

    With the backward, the gradients of ``module``'s parameters (``fn`` itself when it is a
    module) are dropped before each call, as ``zero_grad(set_to_none=True)`` does in a training
    step: otherwise every call after the first would also accumulate into the previous call's
    gradients (for stacked experts a read and a write of every expert's gradient).
    """
    x, dy = inputs["x"], inputs["dy"]
    if not inputs["backward"]:
        return lambda: fn(x)
    xg = x.detach().requires_grad_(True)
    module = fn if module is None else module
    params = list(module.parameters()) if isinstance(module, torch.nn.Module) else []

    def run():
        xg.grad = None
        for p in params:
            p.grad = None
        y = fn(xg)
        y.backward(dy)
        return y.detach(), xg.grad

    return run


def _moela_layer():
    """The moela layer's forward (moela.model.MoE on the Triton kernels), once every op it uses exists."""
    import moela.kernels as kernels

    missing = [n for n in ("route", "make_routing", "permute", "unpermute", "grouped_gemm") if not hasattr(kernels, n)]
    if missing:
        raise Unavailable(f"moela.kernels lacks {', '.join(missing)}")

    def run(inputs: dict) -> object:
        return inputs["run"]()

    return run


def _signature(case: Case) -> tuple[tuple, dict]:
    i = case.inputs
    if "run" not in i:
        i["run"] = layer_runner(i["layer"], i)
    return (i,), {}


def _reference(case: Case):
    i = case.inputs
    with torch.device(i["x"].device):  # built where it runs: V3's 11G expert weights initialised on the GPU
        ref = ReferenceMoE(i["args"]).to(_DTYPE)
    if ref.gate.bias is not None:  # the layer's float32 selection bias, not rounded to bf16 (other routing)
        ref.gate.bias.data = ref.gate.bias.data.float()
    ref.load_state_dict(i["layer"].state_dict())
    return layer_runner(ref, i)


def _torch_native(case: Case):
    """Plain-torch routing, argsort dispatch, torch's grouped GEMM, index_add_ combine."""
    fn, name = grouped_mm()
    i = case.inputs
    layer, a = i["layer"], i["args"]
    if layer.fp8:
        raise Unavailable("bf16 composition only")
    E, k, I = a.n_routed_experts, a.n_activated_experts, a.moe_inter_dim
    w13t, w2t = layer.w13.transpose(1, 2), layer.w2.transpose(1, 2)  # (E, D, 2I), (E, I, D)

    def forward(x: torch.Tensor) -> torch.Tensor:
        # The layer's routing in plain torch (moela.reference.gate): layer.gate would run moela's
        # gate kernel, and on a CPU the Triton interpreter would then dominate this baseline.
        weights, ids = ref_gate(x, layer.gate.weight, layer.gate.bias, a)
        flat = ids.reshape(-1).long()
        order = torch.argsort(flat, stable=True)
        counts = torch.zeros(E, dtype=torch.int64, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
        offsets = torch.cumsum(counts, 0).to(torch.int32)  # (bincount would sync: its length depends on the ids)
        xs = x.index_select(0, order // k)
        h = fn(xs, w13t, offs=offsets)
        act = torch.nn.functional.silu(h[:, :I]) * h[:, I:]
        ys = fn(act, w2t, offs=offsets) * weights.reshape(-1)[order, None].to(x.dtype)
        y = torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add_(0, order // k, ys.float())
        return (y + layer.shared_experts(x).float()).to(x.dtype)

    run = layer_runner(forward, i, layer)
    return probed(run, f"{name} composition")


def _sets(op: str, backward: bool) -> dict[str, list[Problem]]:
    kw = {"backward": True} if backward else {}
    return {
        "tiny": token_problems(op, "tiny", ["tiny"], [4, 32], **kw),
        "check": token_problems(op, "check", ["tiny"], [1, 64], ["balanced", "zipf"], **kw),
        "quick": token_problems(op, "quick", ["v2lite"], [64, 4096], **kw),
        "v3-decode": token_problems(op, "v3-decode", ["v3"], DECODE_TOKENS, **kw),
        "v3-prefill": token_problems(op, "v3-prefill", ["v3"], PREFILL_TOKENS[:1], **kw),
        "v2lite-decode": token_problems(op, "v2lite-decode", ["v2lite"], DECODE_TOKENS, **kw),
        "v2lite-prefill": token_problems(op, "v2lite-prefill", ["v2lite"], PREFILL_TOKENS, **kw),
    }


for _name, _backward in (("moe_layer", False), ("moe_layer_fwd_bwd", True)):
    register(Op(
        name=_name,
        summary="MoE layer " + ("forward + backward" if _backward else "forward") + " (routed + shared), bf16",
        make_case=make_case,
        signature=_signature,
        reference=None,
        reference_missing="see the 'reference loop' baseline",
        shape_sets=_sets(_name, _backward),
        compare=close(1e-3),
        kernel=_moela_layer,
        baselines=(
            Impl("reference loop", _reference, note="moela.reference.MoE: a Python loop over experts"),
            Impl("torch native", _torch_native, note="argsort + index_select + grouped_mm + index_add_"),
            *layer_impls(fp8=False, backward=_backward),
        ),
        baseline_order=("torch native", "reference loop"),
        truth="reference loop",
        compute="bf16",
    ))


def _reference_ops(case: Case):
    """The same FP8 layer on moela.reference's ops (quant_act, fp8_grouped_gemm...): the truth."""
    from moela.model import MoE

    i = case.inputs
    with torch.device(i["x"].device):
        ref = MoE(i["args"].replace(backend="reference")).to(_DTYPE)
    ref.load_state_dict(i["layer"].state_dict())
    ref.train(i["backward"])
    return layer_runner(ref, i)


def _bf16_layer(case: Case):
    """The bf16 moela layer of the same shapes (the FP8 variant's speedup is over this)."""
    from moela.model import MoE

    i = case.inputs
    with torch.device(i["x"].device):
        layer = MoE(i["args"].replace(dtype="bf16", train_fp8=False)).to(_DTYPE).train(i["backward"])
    if not i["layer"].fp8:  # bf16 master weights (train_fp8): the same numbers in bf16
        layer.load_state_dict(i["layer"].state_dict())
    return layer_runner(layer, i)


_FP8_DIMS = {"dim": 128, "moe_inter_dim": 128}  # the tiny config with 128×128 weight blocks


def _fp8_sets(op: str, precision: str = "fp8") -> dict[str, list[Problem]]:
    backward = {"backward": True} if precision == "fp8-train" else {}

    def tiny(set_name: str, tokens: list[int]) -> list[Problem]:
        return [Problem(op, set_name, f"tiny-128 T={t}", {"series": "tiny-128", "tokens": t, "config": "tiny",
                                                           "load": "balanced", "precision": precision,
                                                           "dims": _FP8_DIMS, **backward})
                for t in tokens]

    kw = {"precision": precision, **backward}
    return {
        "tiny": tiny("tiny", [4, 32]),
        "check": tiny("check", [1, 64]),
        "quick": token_problems(op, "quick", ["v2lite"], [64, 4096], **kw),
        "v3-decode": token_problems(op, "v3-decode", ["v3"], DECODE_TOKENS, **kw),
        "v3-prefill": token_problems(op, "v3-prefill", ["v3"], PREFILL_TOKENS[:1], **kw),
        "v2lite-prefill": token_problems(op, "v2lite-prefill", ["v2lite"], PREFILL_TOKENS, **kw),
    }


register(Op(
    name="moe_layer_fp8",
    summary="MoE layer forward with FP8 experts (quantize in permute, FP8 grouped GEMMs), bf16 in/out",
    make_case=make_case,
    signature=_signature,
    reference=None,
    reference_missing="see the 'reference ops' baseline",
    shape_sets=_fp8_sets("moe_layer_fp8"),
    compare=close(1e-3),
    kernel=_moela_layer,
    baselines=(
        Impl("reference ops", _reference_ops, note="the same layer on moela.reference's FP8 ops"),
        Impl("moela bf16", _bf16_layer, kind="moela", same_function=False,
             note="moela.model.MoE with bf16 experts"),
        *layer_impls(fp8=True),
    ),
    baseline_order=("moela bf16", "reference ops"),
    truth="reference ops",
    compute="fp8",
))

register(Op(
    name="moe_layer_fp8_train",
    summary="MoE layer forward + backward trained in FP8 (train_fp8: FP8 fprop, dgrad, wgrad), bf16 masters",
    make_case=make_case,
    signature=_signature,
    reference=None,
    reference_missing="see the 'reference ops' baseline",
    shape_sets=_fp8_sets("moe_layer_fp8_train", "fp8-train"),
    compare=close(1e-3),
    kernel=_moela_layer,
    baselines=(
        Impl("reference ops", _reference_ops, note="the same FP8 training layer on moela.reference's ops"),
        Impl("moela bf16", _bf16_layer, kind="moela", same_function=False,
             note="moela.model.MoE in bf16, the same weights, forward + backward"),
        Impl("torch native", _torch_native, same_function=False,
             note="bf16 argsort + index_select + grouped_mm + index_add_, forward + backward"),
    ),
    baseline_order=("moela bf16", "torch native", "reference ops"),
    truth="reference ops",
    compute="fp8",
))
