"""moela.model.MoE(ep_group=...) on 2 and 4 spawned gloo ranks against the one-process MoE holding
every expert (the same weights).

Each rank compares its part: the routing (ids bit for bit), the output and input gradient (held
to the derived bound of ``moela_testing.assert_close_derived``: within twice the error the
one-process layer makes at the same precision, against its float64 twin), its own experts'
weight gradients, the replicated gate's and shared experts' gradients (summed over the ranks
when the tokens are sharded), the balance loss (its shares summed) and the gate-bias update
(bit for bit, from the all-reduced loads). Cases: uneven token counts with a rank that has none,
a gate bias that leaves one rank's experts without tokens, 2-D and 3-D (sequence) inputs, both
dispatchers, the Triton kernels (interpreted) on one small case, bf16 and FP8 experts, a
checkpoint loaded per rank, and a DeepSeek-V3-shaped layer (256 experts, top-8, groups 8/4)
on 4 ranks.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from distributed_testing import Rank, register_checks
from moela_testing import assert_close_derived

from moela.distributed import AllReduceDispatcher, AllToAllDispatcher, Dispatcher
from moela.model import MoE, load_checkpoint, save_checkpoint
from moela.reference import ModelArgs

TINY = ModelArgs.from_name("tiny", backend="reference")  # 16 experts, top-4, groups 4/2, sigmoid, bias
TOKENS = {1: [9], 2: [6, 3], 4: [4, 0, 5, 2]}  # tokens per rank: uneven, one rank without any
SEQS = {1: [3], 2: [2, 1], 4: [1, 0, 2, 1]}  # sequences per rank for 3-D input
SEQ_LEN = 3
ALPHA = 0.01  # sequence balance loss weight


def _full_layers(args: ModelArgs, device, starve_rank: int | None, world: int) -> dict[str, MoE]:
    """One-process layers with every expert, on the references: float64 (the truth), float32 and bf16."""
    args = args.replace(backend="reference")
    base = MoE(args, ALPHA).to(device=device, dtype=torch.float64)
    with torch.no_grad():
        for name, p in base.named_parameters():
            p.normal_(0, 0.02 if name == "gate.bias" else 0.3)
        if starve_rank is not None and base.gate.bias is not None:  # that rank's experts are never chosen
            n = args.n_routed_experts // world
            base.gate.bias[starve_rank * n:(starve_rank + 1) * n] = -100.0
    layers = {"f64": base}
    for name, dt in (("f32", torch.float32), ("bf16", torch.bfloat16)):
        layers[name] = MoE(args, ALPHA).to(device=device, dtype=dt)
        layers[name].load_state_dict(base.state_dict())
    return layers


def _ep_layer(args: ModelArgs, full: MoE, dispatcher: str | Dispatcher, dtype, device) -> MoE:
    ep = MoE(args, ALPHA, ep_group=dist.group.WORLD, dispatcher=dispatcher).to(device=device, dtype=dtype)
    ep.load_state_dict(full.state_dict())  # takes this rank's experts from the whole layer's state
    return ep


def _my_rows(rank: Rank, counts: list[int], t: torch.Tensor) -> torch.Tensor:
    start = sum(counts[:rank.rank])
    return t[start:start + counts[rank.rank]]


def _sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t)
    return t


def _run(layer: MoE, x: torch.Tensor, dy: torch.Tensor):
    """Forward, backward of ``Σ y·dy + aux_loss``; returns y, aux, dx and the parameter gradients."""
    layer.train()
    x = x.detach().requires_grad_(True)
    y = layer(x)
    aux = layer.aux_loss
    ((y * dy).sum() + aux).backward()
    grads = {k: p.grad for k, p in layer.named_parameters() if p.grad is not None}
    return y, aux, x.grad, grads


def compare_with_one_process(rank: Rank, args: ModelArgs, dispatcher: str | Dispatcher, *, dtype=torch.float32,
                             starve_rank: int | None = None, sequences: bool = False) -> None:
    device, W = rank.device, rank.world
    layers = _full_layers(args, device, starve_rank, W)
    ep = _ep_layer(args, layers["f64"], dispatcher, dtype, device)
    sharded = ep.dispatcher.shards_tokens
    if sequences:  # (B, SEQ_LEN, D): the balance loss per sequence, averaged over every rank's sequences
        counts, shape = SEQS[W], (sum(SEQS[W]), SEQ_LEN, args.dim)
    else:  # (T, D): one sequence across the ranks
        counts, shape = TOKENS[W], (sum(TOKENS[W]), args.dim)
    x = torch.randn(shape, device=device, dtype=torch.float64)
    dy = torch.randn(shape, device=device, dtype=torch.float64)
    mine = (lambda t: _my_rows(rank, counts, t)) if sharded else (lambda t: t)
    lo = {torch.float32: "f32", torch.bfloat16: "bf16"}[dtype]

    with torch.no_grad():  # the routing: bit for bit, and the float64 truth routes alike
        ids = {name: layers[name].gate(x.reshape(-1, args.dim).to(layers[name].gate.weight.dtype))[1]
               for name in ("f64", lo)}
        assert torch.equal(ids["f64"], ids[lo]), f"float64 and {lo} routings differ (a near-tie): change the seed"
        ep_ids = ep.gate(mine(x).reshape(-1, args.dim).to(dtype))[1]
        assert torch.equal(ep_ids, mine(ids[lo].view(*shape[:-1], -1)).reshape(ep_ids.shape))

    runs = {name: _run(layers[name], x.to(layers[name].w13.dtype), dy.to(layers[name].w13.dtype))
            for name in ("f64", lo)}
    y, aux, dx, grads = _run(ep, mine(x).to(dtype), mine(dy).to(dtype))
    hi, ref = runs["f64"], runs[lo]
    assert_close_derived(y, mine(hi[0]), mine(ref[0]), name="y")
    assert_close_derived(dx, mine(hi[2]), mine(ref[2]), name="dx")
    first, n_local = ep.local_experts.start, len(ep.local_experts)
    for key in ("w13", "w2"):  # this rank's experts: their gradients from every rank's tokens
        assert_close_derived(grads[key], hi[3][key][first:first + n_local], ref[3][key][first:first + n_local],
                             name=key)
    for key in ("gate.weight", "shared_experts.w1.weight", "shared_experts.w2.weight"):
        g = _sum_over_ranks(grads[key]) if sharded else grads[key]
        assert_close_derived(g, hi[3][key], ref[3][key], name=key)
    assert_close_derived(_sum_over_ranks(aux) if sharded else aux, hi[1], ref[1], name="aux_loss")
    if starve_rank == rank.rank:
        assert (ep.expert_load == 0).all() and (grads["w13"] == 0).all() and (grads["w2"] == 0).all()

    # aux-loss-free balancing: the group's loads, and the same step as one process, bit for bit
    assert torch.equal(_sum_over_ranks(ep.expert_load), layers[lo].expert_load)
    ep.update_gate_bias(1e-3)
    layers[lo].update_gate_bias(1e-3)
    assert torch.equal(ep.gate.bias, layers[lo].gate.bias)
    assert (ep.expert_load == 0).all()


# ------------------------------------------------------------------------------ the checks
def check_all_to_all_layer(rank: Rank) -> None:
    compare_with_one_process(rank, TINY, "all_to_all")


def check_all_to_all_layer_sequences(rank: Rank) -> None:
    compare_with_one_process(rank, TINY, "all_to_all", sequences=True)


def check_all_to_all_layer_rank_without_experts_chosen(rank: Rank) -> None:
    compare_with_one_process(rank, TINY, "all_to_all", starve_rank=1)


def check_all_reduce_layer(rank: Rank) -> None:
    compare_with_one_process(rank, TINY, "all_reduce", starve_rank=1)


def check_data_input_without_grad(rank: Rank) -> None:
    """Inputs that need no gradient (data) and a rank whose experts get no rows: the backward's
    exchanges still run on every rank, and the experts' gradients match one process."""
    layers = _full_layers(TINY, rank.device, 1, rank.world)
    ep = _ep_layer(TINY, layers["f64"], "all_to_all", torch.float32, rank.device)
    x = torch.randn(sum(TOKENS[rank.world]), TINY.dim, device=rank.device)
    dy = torch.randn_like(x)
    for layer, xi, dyi in ((ep, _my_rows(rank, TOKENS[rank.world], x), _my_rows(rank, TOKENS[rank.world], dy)),
                           (layers["f32"], x, dy), (layers["f64"], x.double(), dy.double())):
        (layer(xi) * dyi).sum().backward()
    n, first = len(ep.local_experts), ep.local_experts.start
    for key in ("w13", "w2"):
        hi, lo = (getattr(layers[k], key).grad[first:first + n] for k in ("f64", "f32"))
        assert_close_derived(getattr(ep, key).grad, hi, lo, name=key)


def check_masked_layout_layers(rank: Rank) -> None:
    """Dispatchers that hand out masked blocks (the layer runs them as contiguous rows for now)."""
    for dispatcher in (AllToAllDispatcher, AllReduceDispatcher):
        compare_with_one_process(rank, TINY, dispatcher(TINY.n_routed_experts, layout="masked"))


def check_all_to_all_layer_bf16(rank: Rank) -> None:
    compare_with_one_process(rank, TINY, "all_to_all", dtype=torch.bfloat16)


def check_all_to_all_layer_triton(rank: Rank) -> None:
    """The Triton kernels inside the expert-parallel layer: float32 through the interpreter (exact
    float32 products), bf16 on GPUs (whose float32 dots are TF32)."""
    args = TINY.replace(backend="triton", dim=32, moe_inter_dim=16, n_routed_experts=8, n_activated_experts=2,
                        n_expert_groups=2, n_limited_groups=1)
    dtype = torch.bfloat16 if rank.device.type == "cuda" else torch.float32
    compare_with_one_process(rank, args, "all_to_all", dtype=dtype)


def check_deepseek_v3_shaped_layer(rank: Rank) -> None:
    """DeepSeek-V3's routing (256 experts, top-8, groups 8/4, sigmoid, bias, route_scale 2.5) at a small dim."""
    args = ModelArgs.from_name("deepseek-v3", dim=32, moe_inter_dim=16, dtype="bf16", gate_bias=True,
                               backend="reference")
    compare_with_one_process(rank, args, "all_to_all")


def check_fp8_experts(rank: Rank) -> None:
    """FP8 experts: the same quantized arithmetic as one process (activations quantized per row)."""
    args = TINY.replace(dim=128, moe_inter_dim=128, dtype="fp8", n_routed_experts=8, n_activated_experts=2,
                        n_expert_groups=2, n_limited_groups=1)
    full = MoE(args).to(rank.device)  # the FP8 experts as built (quantized), bf16 elsewhere
    full_bf16 = MoE(args).to(rank.device).bfloat16()
    full_bf16.load_state_dict(full.state_dict())
    ep = MoE(args, ep_group=dist.group.WORLD).to(rank.device).bfloat16()
    ep.load_state_dict(full.state_dict())
    assert ep.w13.dtype == torch.float8_e4m3fn and ep.w13.shape[0] == 8 // rank.world
    x = torch.randn(sum(TOKENS[rank.world]), 128, device=rank.device).bfloat16()
    with torch.no_grad():
        y = ep(_my_rows(rank, TOKENS[rank.world], x))
        hi = full(x.float())  # the same quantized activations (bf16 values are exact in float32), float32 out
        lo = full_bf16(x)
    assert_close_derived(y, _my_rows(rank, TOKENS[rank.world], hi), _my_rows(rank, TOKENS[rank.world], lo), name="y")


def check_checkpoint_loaded_per_rank(rank: Rank) -> None:
    """A whole layer's checkpoint (sharded safetensors) loads on every rank: its experts only."""
    full = _full_layers(TINY, rank.device, None, rank.world)["f32"]
    path = f"{rank.shared_dir}/moe-checkpoint"
    if rank.rank == 0:
        save_checkpoint(full, path, max_shard_bytes=40_000)  # several shards
    dist.barrier()
    ep = MoE(TINY, ep_group=dist.group.WORLD).to(rank.device)
    load_checkpoint(ep, path)  # the layer declares the other ranks' experts (checkpoint_ignore)
    state, whole = ep.state_dict(), full.state_dict()
    mine = {f"experts.{i}." for i in ep.local_experts}
    expected = {k for k in whole if not k.startswith("experts.") or any(k.startswith(m) for m in mine)}
    assert set(state) == expected, sorted(set(state) ^ expected)
    for k, v in state.items():
        assert torch.equal(v, whole[k]), k
    n = TINY.n_routed_experts // rank.world
    assert ep.w13.shape[0] == n and torch.equal(ep.w13, full.w13[rank.rank * n:(rank.rank + 1) * n])


def check_all_reduce_decode_step_cuda_graph(rank: Rank) -> None:
    """Decode on replicated tokens (GPUs): no host sync, and one CUDA graph replays the whole layer."""
    args = TINY.replace(backend="triton")
    layers = _full_layers(args, rank.device, None, rank.world)
    ep = _ep_layer(args, layers["f64"], "all_reduce", torch.bfloat16, rank.device).eval()
    x = torch.randn(4, args.dim, device=rank.device)
    with torch.no_grad():
        assert_close_derived(ep(x.bfloat16()), layers["f64"].eval()(x.double()), layers["bf16"].eval()(x.bfloat16()),
                             name="eager y")  # also the warm-up: autotuning stays out of the capture
        torch.cuda.set_sync_debug_mode("error")
        try:
            ep(x.bfloat16())
        finally:
            torch.cuda.set_sync_debug_mode("default")
        static_x = x.bfloat16().clone()
        side = torch.cuda.Stream()  # warm up on a side stream, as captures with NCCL want
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            ep(static_x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = ep(static_x)
        x = torch.randn(4, args.dim, device=rank.device)
        static_x.copy_(x)
        graph.replay()
        assert_close_derived(static_y, layers["f64"](x.double()), layers["bf16"](x.bfloat16()), name="replayed y")


def check_bad_arguments_raise(rank: Rank) -> None:
    with pytest.raises(ValueError, match="dispatcher: expected one of"):
        MoE(TINY, ep_group=dist.group.WORLD, dispatcher="broadcast")
    with pytest.raises(ValueError, match="n_experts: expected a multiple of the group size"):
        MoE(TINY.replace(n_routed_experts=5, n_expert_groups=1, n_limited_groups=1), ep_group=dist.group.WORLD)


_BOTH = ["check_all_to_all_layer", "check_all_to_all_layer_rank_without_experts_chosen", "check_all_reduce_layer",
         "check_checkpoint_loaded_per_rank"]
_MORE = ["check_all_to_all_layer_sequences", "check_all_to_all_layer_bf16", "check_fp8_experts",
         "check_all_to_all_layer_triton", "check_masked_layout_layers", "check_data_input_without_grad"]
CHECKS_2 = register_checks(__file__, 2, [*_BOTH, *_MORE, "check_bad_arguments_raise"])
CHECKS_4 = register_checks(__file__, 4, [*_BOTH, "check_deepseek_v3_shaped_layer"])
GPU_CHECKS = ["check_all_reduce_decode_step_cuda_graph"]
register_checks(__file__, 2, GPU_CHECKS, backends=("nccl",))
register_checks(__file__, 4, GPU_CHECKS, backends=("nccl",))
# one GPU: the NCCL code paths, the kernels on CUDA and the CUDA graph, in a group of one
CHECKS_1 = register_checks(__file__, 1, [*_BOTH, *_MORE, *GPU_CHECKS], backends=("nccl",))


@pytest.mark.parametrize("name", CHECKS_2)
def test_two_gloo_ranks(rank_results, name):
    rank_results(2).check(__file__, name)


@pytest.mark.parametrize("name", CHECKS_4)
def test_four_gloo_ranks(rank_results, name):
    rank_results(4).check(__file__, name)


@pytest.mark.gpu
@pytest.mark.parametrize("name", CHECKS_1)
def test_one_nccl_rank(rank_results, name):
    rank_results(1, "nccl").check(__file__, name)


@pytest.mark.gpu
@pytest.mark.skipif("__import__('torch').cuda.device_count() < 2", reason="needs 2 CUDA devices (NCCL)")
@pytest.mark.parametrize("name", CHECKS_2 + GPU_CHECKS)
def test_two_nccl_ranks(rank_results, name):
    rank_results(2, "nccl").check(__file__, name)


@pytest.mark.gpu
@pytest.mark.skipif("__import__('torch').cuda.device_count() < 4", reason="needs 4 CUDA devices (NCCL)")
@pytest.mark.parametrize("name", CHECKS_4 + GPU_CHECKS)
def test_four_nccl_ranks(rank_results, name):
    rank_results(4, "nccl").check(__file__, name)
