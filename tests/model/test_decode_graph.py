"""The device-side decode step and its graph: sequences at different positions, static buffers.

Truth: the Transformer's own forward over each sequence's whole prefix (no cache), in float64 on
the reference backend; the step's logits of slot b must be that forward's last logits."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moela.model import DecodeGraph, Transformer
from moela.reference import ModelArgs

PROMPT = 9
LENGTHS = [9, 5, 7]  # slots 0-2 decode from these lengths (slots 1 and 2 forget part of their prefill)


def _model(backend="reference", dtype=torch.float64, device="cpu", **kw):
    args = ModelArgs.from_name("tiny", dim=64, n_layers=2, n_dense_layers=1, n_heads=2, vocab_size=50,
                               n_routed_experts=4, n_activated_experts=2, n_expert_groups=1, n_limited_groups=1,
                               moe_inter_dim=32, inter_dim=64, kv_lora_rank=32, qk_nope_head_dim=16,
                               qk_rope_head_dim=16, v_head_dim=16, max_seq_len=32, backend=backend, **kw)
    torch.manual_seed(0)
    return Transformer(args).to(device, dtype).eval(), args


class _NoHostRead(TorchDispatchMode):
    """Fails on every op whose result needs a value on the host (a sync on a GPU)."""

    FORBIDDEN = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "bincount", "item")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(name in str(func) for name in self.FORBIDDEN):
            raise AssertionError(f"{func} reads a value on the host inside the decode step")
        return func(*args, **(kwargs or {}))


def _prefill(model, caches, tokens):
    with torch.no_grad():
        model(tokens[:, :PROMPT], 0, caches)


def _truth(model, seq_tokens):
    with torch.no_grad():
        return model(seq_tokens[None])[0, -1]


@pytest.mark.parametrize("paged", [False, True], ids=["latent", "paged"])
def test_steps_match_the_full_forward(paged):
    model, args = _model()
    B = 4
    tokens = torch.randint(0, args.vocab_size, (B, PROMPT + 4))
    if paged:
        caches = [layer.attn.new_paged_cache(num_pages=16, batch=B, max_seq_len=32) for layer in model.layers]
    else:
        caches = model.new_caches(batch=B, max_seq_len=32)
    _prefill(model, caches, tokens)
    graph = model.decode_graph(caches, batch_sizes=(1, 4))
    assert isinstance(graph, DecodeGraph) and not graph.capture
    graph.set_lengths(LENGTHS)
    seqs = [tokens[b, :n].clone() for b, n in enumerate(LENGTHS)]
    out_ptr = None
    for _ in range(3):
        nxt = torch.randint(0, args.vocab_size, (3,))
        logits = graph.step(nxt)
        assert logits.shape == (3, args.vocab_size)
        out_ptr = out_ptr or logits.data_ptr()
        assert logits.data_ptr() == out_ptr  # one static buffer, every step
        for b in range(3):
            seqs[b] = torch.cat([seqs[b], nxt[b:b + 1]])
            torch.testing.assert_close(logits[b], _truth(model, seqs[b]), rtol=1e-10, atol=1e-10)
    assert graph.positions[:3].tolist() == [n + 3 for n in LENGTHS]  # advanced on the device
    assert graph.lengths[:3] == [n + 3 for n in LENGTHS]
    assert graph.positions[3].item() == 0  # a padding row of the bucket does not advance
    if paged:
        assert caches[0].cache_seqlens[:3].tolist() == [n + 3 for n in LENGTHS]
        assert [caches[0].seq_len(b) for b in range(3)] == [n + 3 for n in LENGTHS]


def test_the_step_reads_nothing_on_the_host_and_keeps_its_storage():
    """On moela's kernels (the reference's routing counts with bincount: not capturable)."""
    model, args = _model(backend="triton", dtype=torch.float32)
    caches = model.new_caches(batch=2, max_seq_len=32)
    _prefill(model, caches, torch.randint(0, args.vocab_size, (2, PROMPT)))
    graph = model.decode_graph(caches, batch_sizes=(2,))
    graph.set_lengths([PROMPT, PROMPT - 2])
    graph.step(torch.tensor([1, 2]))  # first step: the buffers of bucket 2 exist now
    storages = {n: t.data_ptr() for n, t in (("tokens", graph.tokens), ("positions", graph.positions),
                                             ("logits", graph._logits[2]), ("cache", caches[0].latent))}
    graph.tokens[:2] = torch.tensor([[3], [4]])
    graph.active.fill_(2)
    with torch.no_grad(), _NoHostRead():
        graph._run(2)  # the work a CUDA graph would capture
    assert storages == {n: t.data_ptr() for n, t in (("tokens", graph.tokens), ("positions", graph.positions),
                                                      ("logits", graph._logits[2]), ("cache", caches[0].latent))}


def test_kernels_backend_matches_the_reference_backend():
    """The same step on moela's kernels (the interpreter on a CPU: mla_decode with per-sequence
    lengths, the MoE kernels) against the reference backend, float32."""
    ref, args = _model(dtype=torch.float32)
    ker, _ = _model(backend="triton", dtype=torch.float32)
    ker.load_state_dict(ref.state_dict())
    tokens = torch.randint(0, args.vocab_size, (2, PROMPT))
    outs = []
    for model in (ref, ker):
        caches = model.new_caches(batch=2, max_seq_len=32)
        _prefill(model, caches, tokens)
        graph = model.decode_graph(caches, batch_sizes=(2,))
        graph.set_lengths([PROMPT, PROMPT - 3])
        outs.append(graph.step(torch.tensor([7, 8])).clone())
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)


def test_errors():
    model, args = _model(dtype=torch.float32)
    caches = model.new_caches(batch=2, max_seq_len=32)
    with pytest.raises(ValueError, match="batch_sizes: the largest bucket 4 exceeds"):
        model.decode_graph(caches, batch_sizes=(4,))
    with pytest.raises(ValueError, match="capture: CUDA graphs need the caches on a GPU"):
        model.decode_graph(caches, batch_sizes=(2,), capture=True)
    with pytest.raises(TypeError, match=r"caches\[0\]"):
        DecodeGraph(model, [object()] * 2)
    graph = model.decode_graph(caches, batch_sizes=(2,))
    with pytest.raises(ValueError, match="lengths: a sequence is full"):
        graph.set_lengths([32])
    graph.set_lengths([31, 3])
    graph.step(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="would pass max_seq_len"):
        graph.step(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="tokens: expected 1 to 2 sequences"):
        graph.step(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="positions"):
        model.layers[0].attn.decode(torch.randn(2, 1, 64), torch.zeros(3, dtype=torch.int32), caches[0])


@pytest.mark.gpu
def test_gpu_graph_replay_with_changing_lengths():
    """Captured once per bucket, replayed as the lengths grow and the batch changes; each step
    equals the eager step."""
    model, args = _model(backend="triton", dtype=torch.bfloat16, device="cuda")
    tokens = torch.randint(0, args.vocab_size, (4, PROMPT), device="cuda")
    caches = model.new_caches(batch=4, max_seq_len=32)
    eager_caches = model.new_caches(batch=4, max_seq_len=32)
    _prefill(model, caches, tokens)
    _prefill(model, eager_caches, tokens)
    graph = model.decode_graph(caches, batch_sizes=(2, 4))
    eager = model.decode_graph(eager_caches, batch_sizes=(2, 4), capture=False)
    assert graph.capture
    for g in (graph, eager):
        g.set_lengths([9, 4, 6, 8])
    torch.cuda.set_sync_debug_mode("error")
    try:
        for b in (4, 3, 4, 2):
            nxt = torch.randint(0, args.vocab_size, (b,), device="cuda")
            got = graph.step(nxt).clone()
            want = eager.step(nxt)
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert graph.lengths == eager.lengths


def test_decode_step_compiles_whole():
    """torch.compile(fullgraph=True) traces the step in one graph (what mode="reduce-overhead"
    captures on a GPU), and computes the eager step's numbers."""
    model, args = _model(backend="triton", dtype=torch.float32)
    tokens = torch.randint(0, args.vocab_size, (2, PROMPT))
    outs = []
    for fn in (model.decode_step, torch.compile(model.decode_step, backend="aot_eager", fullgraph=True)):
        caches = model.new_caches(batch=2, max_seq_len=32)
        _prefill(model, caches, tokens)
        with torch.no_grad():
            outs.append(fn(torch.tensor([[3], [4]]), torch.tensor([PROMPT, PROMPT - 2], dtype=torch.int32), caches))
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)


def test_paged_writes_without_a_page_land_in_the_sink():
    """write_at at a position whose block has no page writes the sink page, never another
    sequence's page; positions past the cache are clamped to its last position."""
    model, _ = _model(dtype=torch.float32)
    cache = model.layers[0].attn.new_paged_cache(num_pages=4, batch=2, max_seq_len=128)
    cache.reserve(0, 64)  # sequence 0: page 0; sequence 1: none
    before = cache.pool.clone()
    kv, pe = torch.randn(2, 1, 32), torch.randn(2, 1, 16)
    cache.write_at(torch.tensor([3, 70], dtype=torch.int32), kv=kv, pe=pe)
    assert torch.equal(cache.pool[0, 3, :32], kv[0, 0]) and torch.equal(cache.pool[0, 3, 32:], pe[0, 0])
    changed = (cache.pool != before).any(-1).nonzero().tolist()
    assert changed == [[0, 3], [4, 70 % 64]]  # page 0 row 3, and the sink (page num_pages)
    latent = model.new_caches(batch=1, max_seq_len=8)[0]
    latent.write_at(torch.tensor([100]), kv=kv[:1], pe=pe[:1])
    assert torch.equal(latent.latent[0, 7, :32], kv[0, 0])  # clamped to the last position
