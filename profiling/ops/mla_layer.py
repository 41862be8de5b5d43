"""The MLA layer (projections, RoPE, cache, attention), bf16: prefill and decode (``mla_layer``), and
a training step's forward + backward without a cache (``mla_layer_fwd_bwd``).

moela:          ``moela.model.MLA`` in the absorbed form (latent cache), as a model runs it: decode
                attention on ``moela.kernels.mla_decode`` (the cache's fused C + R layout),
                prefill on SDPA over per-head k/v expanded from the latent
reference:      ``moela.reference.MLA`` in the naive form (per-head k/v cache)
torch SDPA:     the naive form with its attention through ``F.scaled_dot_product_attention``

Prefill: B=1, S tokens from position 0, causal. Decode: one new token per sequence after a
cache of L tokens (filled with random latents, never zeros). Train: prefill without a cache, then
``backward`` of a random output gradient (the parameters' gradients dropped before each call, as
``zero_grad(set_to_none=True)`` does); moela's layer runs it on SDPA over per-head k/v. FLOPs: the
projections plus the attention of the absorbed form over the (query, key) pairs the causal mask
keeps (S(S+1)/2 per head in prefill, L+1 in decode), ×3 with the backward; bytes: the weights (and
their gradients), the cache read, x/y (and dy/dx).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from moela.reference import MLA as ReferenceMLA

from ..registry import Case, Impl, Op, register
from ..shapes import CONFIGS, Problem
from ._common import close, generator, randn

OP = "mla_layer"
_DTYPE = torch.bfloat16


def problem(set_name: str, config: str, mode: str, batch: int, tokens: int) -> Problem:
    what = f"S={tokens}" if mode == "prefill" else f"B={batch} L={tokens}"
    return Problem(OP, set_name, f"{config} {mode} {what}", {
        "series": f"{config} {mode}" + ("" if mode == "prefill" else f" B={batch}"), "tokens": tokens,
        "config": config, "mode": mode, "batch": batch})


def _layer(cls, args, impl: str, state, device):
    with torch.device(device):  # built where it runs (no CPU initialisation of the weights)
        layer = cls(args, attn_impl=impl).to(_DTYPE).eval()
    layer.load_state_dict(state)
    return layer


def make_case(p: Problem, device: torch.device, seed: int) -> Case:
    from moela.model import MLA

    args = CONFIGS[p.params["config"]]
    args = args.replace(dtype="bf16", backend="triton", max_seq_len=max(args.max_seq_len, p.params["tokens"] + 1))
    mode, B, L = p.params["mode"], p.params["batch"], p.params["tokens"]
    gen = generator(device, seed)
    torch.manual_seed(seed)
    with torch.device(device):
        moela_layer = MLA(args, "absorb").to(_DTYPE).eval()
    with torch.no_grad():
        for t in moela_layer.parameters():
            shift = 1.0 if t.ndim == 1 else 0.0  # norm weights around 1
            t.copy_(randn(t.shape, t.dtype, device, gen, std=t.shape[-1] ** -0.5 if t.ndim > 1 else 0.1) + shift)
    state = moela_layer.state_dict()
    H, C, R = args.n_heads, args.kv_lora_rank, args.qk_rope_head_dim
    S = 1 if mode == "decode" else L
    x = randn((B, S, args.dim), _DTYPE, device, gen)
    inputs = {"x": x, "mode": mode, "start": L if mode == "decode" else 0, "args": args, "state": state,
              "moela": moela_layer}
    if mode == "train":
        inputs["dy"] = randn((B, S, args.dim), _DTYPE, device, gen)
    if mode == "decode":  # a cache of L random latents, the naive form's k/v derived from them
        cache = moela_layer.new_cache(B, L + 1)
        cache["kv"][:, :L] = randn((B, L, C), _DTYPE, device, gen)
        cache["pe"][:, :L] = randn((B, L, R), _DTYPE, device, gen)
        inputs["cache"] = cache
    proj = 2.0 * B * S * sum(v.numel() for k, v in state.items() if k.endswith("weight") and v.ndim == 2)
    keys = L + 1 if mode == "decode" else S
    pairs = keys if mode == "decode" else S * (S + 1) // 2  # (query, key) pairs: causal prefill sees the past
    attn = 2.0 * B * H * pairs * (C + R + C)
    cache_bytes = B * keys * (C + R) * 2 if mode == "decode" else 0
    weight_bytes = sum(v.numel() * v.element_size() for v in state.values())
    if mode == "train":  # backward: twice the forward's FLOPs; weights read again and their grads written, dy, dx
        return Case(p, inputs, flops=3 * (proj + attn), bytes=float(3 * weight_bytes + 4 * x.numel() * 2))
    return Case(p, inputs, flops=proj + attn, bytes=float(weight_bytes + cache_bytes + 2 * x.numel() * 2))


def _naive_cache(layer, inputs):
    """The naive form's per-head k/v cache holding the same keys and values as the latent cache."""
    lat = inputs["cache"]
    B, L = inputs["x"].shape[0], inputs["start"]
    cache = layer.new_cache(B, L + 1)
    with torch.no_grad():
        kv = rearrange(layer.wkv_b(lat["kv"][:, :L]), "b t (h d) -> b t h d", h=layer.n_heads)
        k_nope, v = torch.split(kv, [layer.qk_nope_head_dim, layer.v_head_dim], dim=-1)
        pe = lat["pe"][:, :L, None].expand(-1, -1, layer.n_heads, -1)
        cache["k"][:, :L] = torch.cat([k_nope, pe], dim=-1)
        cache["v"][:, :L] = v
    return cache


def _runner(layer, inputs, cache):
    """What one timed call does: the layer's forward, or (train) forward + backward returning (y, dx)."""
    x, start = inputs["x"], inputs["start"]
    if inputs["mode"] != "train":
        return lambda: layer(x, start, cache)
    xg, dy, params = x.detach().requires_grad_(True), inputs["dy"], list(layer.parameters())

    def step():
        xg.grad = None
        for t in params:
            t.grad = None
        y = layer(xg, 0, None)
        y.backward(dy)
        return y.detach(), xg.grad

    return step


def _moela(inputs: dict):
    if "run" not in inputs:  # built once per case: the timed call is only the step
        inputs["run"] = _runner(inputs["moela"], inputs, inputs.get("cache"))
    return inputs["run"]()


class _SDPAMLA(ReferenceMLA):
    """The naive form with its attention through F.scaled_dot_product_attention."""

    def _attend_naive(self, q_nope, q_pe, kv, k_pe, start_pos, key_start, cache):
        h = self.n_heads
        q = torch.cat([q_nope, q_pe], dim=-1)
        kv = rearrange(self.wkv_b(kv), "b s (h d) -> b s h d", h=h)
        k_nope, v = torch.split(kv, [self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, :, None].expand(-1, -1, h, -1)], dim=-1)
        if cache is not None:
            k, v = cache.update(start_pos, k=k, v=v)
        s, t = q.shape[1], k.shape[1]
        q_pos = torch.arange(start_pos, start_pos + s, device=q.device)
        mask = torch.arange(key_start, key_start + t, device=q.device)[None, :] <= q_pos[:, None]
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask, scale=self.softmax_scale)
        return o.transpose(1, 2)


def _baseline(cls):
    def prepare(case: Case):
        i = case.inputs
        layer = _layer(cls, i["args"], "naive", i["state"], i["x"].device)
        layer.train(i["mode"] == "train")
        return _runner(layer, i, _naive_cache(layer, i) if i["mode"] == "decode" else None)

    return prepare


def _sets() -> dict[str, list[Problem]]:
    return {
        "tiny": [problem("tiny", "tiny", "prefill", 1, 8), problem("tiny", "tiny", "decode", 2, 12)],
        "check": [problem("check", "tiny", "prefill", 1, 16), problem("check", "tiny", "decode", 3, 20)],
        "quick": [problem("quick", "v2lite", "prefill", 1, 1024), problem("quick", "v2lite", "decode", 32, 1024)],
        "v3-prefill": [problem("v3-prefill", "v3", "prefill", 1, t) for t in (1024, 4096)],
        "v3-decode": [problem("v3-decode", "v3", "decode", b, L) for b in (16, 128) for L in (1024, 4096)],
        "v2lite-decode": [problem("v2lite-decode", "v2lite", "decode", b, L) for b in (16, 128) for L in (1024, 4096)],
    }


def _train_sets(op: str) -> dict[str, list[Problem]]:
    def train(set_name: str, config: str, tokens: int) -> Problem:
        return Problem(op, set_name, f"{config} train S={tokens}", {
            "series": f"{config} train", "tokens": tokens, "config": config, "mode": "train", "batch": 1})

    return {
        "tiny": [train("tiny", "tiny", 8)],
        "check": [train("check", "tiny", 16)],
        "quick": [train("quick", "v2lite", 1024)],
        "v3-prefill": [train("v3-prefill", "v3", t) for t in (1024, 4096)],
        "v2lite-prefill": [train("v2lite-prefill", "v2lite", t) for t in (1024, 4096)],
    }


register(Op(
    name=OP,
    summary="MLA layer prefill / decode (projections + attention), bf16",
    make_case=make_case,
    signature=lambda c: ((c.inputs,), {}),
    reference=None,
    reference_missing="see the 'reference naive' baseline",
    shape_sets=_sets(),
    compare=close(1e-3),
    kernel=lambda: _moela,
    baselines=(
        Impl("reference naive", _baseline(ReferenceMLA), note="moela.reference.MLA, per-head k/v cache"),
        Impl("torch SDPA", _baseline(_SDPAMLA), note="naive form, F.scaled_dot_product_attention"),
    ),
    baseline_order=("torch SDPA", "reference naive"),
    truth="reference naive",
    compute="bf16",
))

register(Op(
    name="mla_layer_fwd_bwd",
    summary="MLA layer forward + backward without a cache (a training step's attention), bf16",
    make_case=make_case,
    signature=lambda c: ((c.inputs,), {}),
    reference=None,
    reference_missing="see the 'reference naive' baseline",
    shape_sets=_train_sets("mla_layer_fwd_bwd"),
    compare=close(1e-3),
    kernel=lambda: _moela,
    baselines=(
        Impl("reference naive", _baseline(ReferenceMLA), note="moela.reference.MLA, autograd"),
        Impl("torch SDPA", _baseline(_SDPAMLA), note="naive form, F.scaled_dot_product_attention, autograd"),
    ),
    baseline_order=("torch SDPA", "reference naive"),
    truth="reference naive",
    compute="bf16",
))
