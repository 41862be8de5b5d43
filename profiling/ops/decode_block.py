"""One decode step of a DeepSeek block (MLA + MoE), bf16: what a model's step costs per layer.

moela:             ``moela.model.Block.decode``: the device-side step (positions read on the
                   device, ``mla_decode`` over the latent cache, the MoE on the kernels); the
                   step ``DecodeGraph`` captures (``bench --graphs`` times its replay)
moela start_pos:   ``Block.forward(x, L, cache)``, the eager step with a host-side position
reference layers:  ``moela.reference`` MLA (absorbed) and MoE over the same weights and cache

Each of B sequences holds L cached tokens (random latents) and decodes one. FLOPs: the
projections, the absorbed attention over L + 1 keys, the gate and the experts each token runs;
bytes, the floor of a memory-bound step: the weights the step must read (the MLA's, the gate's,
the shared experts' and those of the distinct routed experts this batch picks, counted from its
routing), the cache read and x / y. Time over bytes / copy bandwidth is the row's roof%.
"""

from __future__ import annotations

import torch

from moela import reference as ref

from ..registry import Case, Impl, Op, register
from ..shapes import CONFIGS, Problem
from ._common import close, generator, randn

OP = "decode_block"
_DTYPE = torch.bfloat16


def problem(set_name: str, config: str, batch: int, cached: int) -> Problem:
    return Problem(OP, set_name, f"{config} B={batch} L={cached}", {
        "series": f"{config} L={cached}", "tokens": batch, "config": config, "batch": batch, "cached": cached})


def make_case(p: Problem, device: torch.device, seed: int) -> Case:
    from moela.model import Block

    args = CONFIGS[p.params["config"]]
    B, L = p.params["batch"], p.params["cached"]
    args = args.replace(dtype="bf16", max_seq_len=max(args.max_seq_len, L + 1))
    torch.manual_seed(seed)
    gen = generator(device, seed)
    with torch.device(device):  # built where it runs
        block = Block(args.n_dense_layers, args).to(_DTYPE).eval()  # an MoE block
    C, R = args.kv_lora_rank, args.qk_rope_head_dim
    cache = block.attn.new_cache(B, L + 1)
    cache["kv"][:, :L] = randn((B, L, C), _DTYPE, device, gen)
    cache["pe"][:, :L] = randn((B, L, R), _DTYPE, device, gen)
    x = randn((B, 1, args.dim), _DTYPE, device, gen)
    with torch.no_grad():
        _, ids = block.ffn.gate(block.ffn_norm(x).view(B, -1))
    experts = int(torch.unique(ids).numel())
    state = block.state_dict()
    attn_w = sum(v.numel() * v.element_size() for k, v in state.items() if k.startswith("attn."))
    shared_w = sum(v.numel() * v.element_size() for k, v in state.items() if "shared_experts" in k or "gate." in k)
    expert_w = 3 * args.moe_inter_dim * args.dim * 2  # w1, w2, w3 of one routed expert, bf16
    H, Dn = args.n_heads, args.qk_nope_head_dim
    proj = 2.0 * B * sum(v.numel() for k, v in state.items() if k.startswith("attn.") and v.ndim == 2)
    attn = 2.0 * B * H * ((L + 1) * (2 * C + R) + 2 * Dn * C)  # scores, values, the absorbed wkv_b
    moe = 2.0 * B * (args.n_activated_experts + args.n_shared_experts) * expert_w / 2 + 2.0 * B * args.dim * \
        args.n_routed_experts
    nbytes = attn_w + shared_w + experts * expert_w + B * (L + 1) * (C + R) * 2 + 2 * x.numel() * 2
    inputs = {"x": x, "block": block, "cache": cache, "positions": torch.full((B,), L, dtype=torch.int32,
                                                                              device=device), "start": L}
    return Case(p, inputs, flops=proj + attn + moe, bytes=float(nbytes),
                info={"routed_experts_read": experts})


def _moela(inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return inputs["block"].decode(inputs["x"], inputs["positions"], inputs["cache"])


def _start_pos(case: Case):
    i = case.inputs

    def run():
        with torch.no_grad():
            return i["block"](i["x"], i["start"], i["cache"])

    return run


def _reference(case: Case):
    """The same weights in moela.reference's MLA (absorbed) and MoE, over the same cache contents."""
    i = case.inputs
    block, args = i["block"], i["block"].attn.args
    dev = i["x"].device
    with torch.device(dev):
        attn = ref.MLA(args, "absorb").to(_DTYPE).eval()
        moe = ref.MoE(args).to(_DTYPE).eval()
    attn.load_state_dict(block.attn.state_dict())
    moe.load_state_dict(block.ffn.state_dict())
    cache = attn.new_cache(i["x"].shape[0], i["start"] + 1)
    cache["kv"].copy_(i["cache"]["kv"])
    cache["pe"].copy_(i["cache"]["pe"])
    attn_norm, ffn_norm = block.attn_norm, block.ffn_norm

    def run():
        with torch.no_grad():
            h = i["x"] + attn(attn_norm(i["x"]), i["start"], cache)
            return h + moe(ffn_norm(h))

    return run


SETS = {
    "tiny": [problem("tiny", "tiny", 2, 12), problem("tiny", "tiny", 1, 5)],
    "check": [problem("check", "tiny", 4, 40)],
    "quick": [problem("quick", "v2lite", b, 1024) for b in (1, 32)],
    "v3-decode": [problem("v3-decode", "v3", b, 4096) for b in (1, 8, 32, 64)],
}

register(Op(
    name=OP,
    summary="one decode step of an MLA + MoE block (device-side positions), bf16",
    make_case=make_case,
    signature=lambda c: ((c.inputs,), {}),
    reference=None,
    reference_missing="see the 'reference layers' baseline (moela.reference's MLA and MoE)",
    shape_sets=SETS,
    compare=close(1e-2),
    kernel=lambda: _moela,
    baselines=(
        Impl("moela start_pos", _start_pos, note="Block.forward with a host-side position (the eager step)"),
        Impl("reference layers", _reference, note="moela.reference MLA (absorbed) + MoE, same weights and cache"),
    ),
    baseline_order=("reference layers",),
    truth="reference layers",
    compute="bf16",
))
