"""moela.model.MLA against the reference layer: decode on the mla_decode kernel (interpreted on
CPU), prefill and training on SDPA.

The kernel path runs when the backend picks the kernels, no gradient is recorded, the step has
at most DECODE_MAX_TOKENS new tokens and the cache is the fused (C + R)-column buffer that
MLA.new_cache builds; longer steps and cache-less forwards in bf16/fp16 run SDPA over per-head
k/v; everything else runs the reference's attention.
"""

import pytest
import torch
from moela_testing import assert_close_derived

import moela.kernels as K
from moela.kernels.interpreter import interpreter_active
from moela.model import MLA, PagedLatentCache, quantize_linears_
from moela.model.mla import DECODE_MAX_TOKENS, LatentCache
from moela.reference import MLA as ReferenceMLA
from moela.reference import ModelArgs, dequant
from moela.reference.mla_decode import quant_latent


def _layers(dtype, device, **overrides):
    """The same weights in moela.model.MLA (triton backend, `dtype`), the reference layer in
    `dtype` and the reference in float64."""
    args = ModelArgs.from_name("tiny", backend="triton", **overrides)
    torch.manual_seed(0)
    exact = ReferenceMLA(args).to(device=device, dtype=torch.float64)
    with torch.no_grad():
        for name, p in exact.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.2 if "norm" in name else p.shape[-1] ** -0.5)
    model, ref = MLA(args).to(device=device, dtype=dtype), ReferenceMLA(args).to(device=device, dtype=dtype)
    model.load_state_dict(exact.state_dict())
    ref.load_state_dict(exact.state_dict())
    return model.eval(), ref.eval(), exact.eval()


@pytest.fixture
def kernel_calls(monkeypatch):
    class Calls(list):
        kv: list  # each call's kv and keyword arguments

    calls = Calls()
    calls.kv = []

    def counting(q, kv, softmax_scale, *, v_dim=512, **kw):
        calls.append((tuple(q.shape), tuple(kv.shape)))
        calls.kv.append((kv, {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}))
        return real(q, kv, softmax_scale, v_dim=v_dim, **kw)

    real = K.mla_decode
    monkeypatch.setattr(K, "mla_decode", counting)
    return calls


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_decode_steps_run_the_kernel_and_match_the_reference(dtype, device, kernel_calls):
    model, ref, exact = _layers(dtype, device)
    B, P = 3, DECODE_MAX_TOKENS + 1  # a prefill longer than a decode step
    x = torch.randn(B, P + 3, model.dim, device=device, dtype=torch.float64)
    caches = [layer.new_cache(B, P + 4) for layer in (model, ref, exact)]
    assert isinstance(caches[0], LatentCache) and not isinstance(caches[1], LatentCache)
    with torch.no_grad():
        for layer, cache in zip((model, ref, exact), caches, strict=True):
            layer(x[:, :P].to(cache.dtype), 0, cache)  # prefill: SDPA (model), reference math (the others)
        assert kernel_calls == []
        for start, s in ((P, 1), (P + 1, 2)):  # a decode step, then a two-token (MTP-like) step
            ys = [layer(x[:, start:start + s].to(c.dtype), start, c) for layer, c in zip((model, ref, exact), caches,
                                                                                        strict=True)]
            assert_close_derived(ys[0], ys[2], ys[1], name=f"y at {start}")
    C, R = model.kv_lora_rank, model.qk_rope_head_dim
    assert kernel_calls == [((B, 1, model.n_heads, C + R), (B, P + 1, C + R)),
                            ((B, 2, model.n_heads, C + R), (B, P + 3, C + R))]


def test_reference_cache_gradients_and_prefill_do_not_run_the_kernel(device, kernel_calls):
    model, ref, _ = _layers(torch.float32, device)
    x = torch.randn(2, DECODE_MAX_TOKENS + 2, model.dim, device=device)
    separate = ref.new_cache(2, 32)  # kv and pe in two buffers: not the kernel's layout
    with torch.no_grad():
        model(x[:, :4], 0, separate)
        model(x[:, 4:5], 4, separate)
        model(x, 0, model.new_cache(2, 32))  # more than DECODE_MAX_TOKENS new tokens: prefill
    cache = model.new_cache(2, 32)
    y = model(x[:, :1], 0, cache)  # grad mode with parameters that need grads: the kernel has no backward
    y.sum().backward()
    assert model.wkv_b.weight.grad is not None
    assert kernel_calls == []


def test_frozen_query_path_with_grad_mode_does_not_run_the_kernel(device, kernel_calls):
    """Only wkv_b trains: q_nope needs no grad, yet the kernel (no backward) must not run: the
    reference's absorbed math does (a short step over a cache)."""
    model, _, _ = _layers(torch.float32, device)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("wkv_b"))
    x = torch.randn(2, 3, model.dim, device=device)
    cache = model.new_cache(2, 8)
    with torch.no_grad():
        model(x[:, :2], 0, cache)  # a 2-token step without grad: the kernel
    assert len(kernel_calls) == 1
    model(x[:, 2:], 2, cache).sum().backward()
    assert model.wkv_b.weight.grad is not None and len(kernel_calls) == 1


def test_autocast_decode_takes_the_reference_path(device, kernel_calls):
    """Under autocast the query is bf16 while the cache stays float32: the reference's math."""
    model, _, _ = _layers(torch.float32, device)
    x = torch.randn(2, 3, model.dim, device=device)
    cache = model.new_cache(2, 8)
    with torch.no_grad(), torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
        model(x[:, :2], 0, cache)
        y = model(x[:, 2:], 2, cache)
    assert torch.isfinite(y).all() and kernel_calls == []


def _capture_attention(layer, into: dict, key: str) -> None:
    """Record the inputs and output of ``layer._attend_absorbed`` (the attention, before wo)."""
    inner = layer._attend_absorbed

    def wrapped(*args):
        into[key] = (args, inner(*args))
        return into[key][1]

    layer._attend_absorbed = wrapped


def test_smaller_batch_than_the_cache_and_fp8_wkv_b(device, kernel_calls):
    """A step of 2 sequences over a cache of 4, with DeepSeek's fp8 projections (wkv_b dequantized
    for the absorbed form). The attention output (wo's input, before wo quantizes it to fp8)
    against the reference layer's and a float64 attention from the same inputs."""
    dims = dict(dim=128, q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=32, v_head_dim=32, dtype="fp8")
    args = ModelArgs.from_name("tiny", backend="triton", **dims)
    model = MLA(args).to(device=device, dtype=torch.bfloat16).eval()
    ref_args = args.replace(backend="reference")
    ref = ReferenceMLA(ref_args).to(device=device, dtype=torch.bfloat16).eval()
    quantize_linears_(ref, ref_args)
    ref.load_state_dict(model.state_dict())
    seen: dict = {}
    _capture_attention(model, seen, "model")
    _capture_attention(ref, seen, "ref")
    x = torch.randn(2, 3, args.dim, device=device, dtype=torch.bfloat16)
    caches = [model.new_cache(4, 8), ref.new_cache(4, 8)]
    with torch.no_grad():
        for layer, cache in zip((model, ref), caches, strict=True):
            layer(x[:, :2], 0, cache)
        model(x[:, 2:], 2, caches[0])
        ref(x[:, 2:], 2, caches[1])
    width = 128 + args.qk_rope_head_dim  # C + R
    assert kernel_calls == [((2, 2, args.n_heads, width), (2, 2, width)), ((2, 1, args.n_heads, width), (2, 3, width))]
    if interpreter_active():  # the same projections, bit for bit (a GPU's fp8 dots accumulate with ~14 bits)
        assert torch.equal(caches[0]["kv"], caches[1]["kv"]) and torch.equal(caches[0]["pe"], caches[1]["pe"])
    # the truths from the model's own attention inputs and cache prefix: the reference attention in
    # bf16 and in float64
    (q_nope, q_pe, kv, k_pe, start, key_start, _), o_model = seen["model"]
    cache_lo = ref.new_cache(4, 8)
    for name in ("kv", "pe"):
        cache_lo[name][:, :start] = caches[0][name][:, :start]
    with torch.no_grad():
        o_ref = ref._attend_absorbed(q_nope, q_pe, kv, k_pe, start, key_start, cache_lo)
    exact = ReferenceMLA(ref_args.replace(dtype="bf16")).to(device=device, dtype=torch.float64)
    with torch.no_grad():
        exact.wkv_b.weight.copy_(dequant(ref.wkv_b.weight, ref.wkv_b.weight_scale_inv, out_dtype=torch.float64))
        cache64 = exact.new_cache(4, 8)
        for name in ("kv", "pe"):
            cache64[name][:, :start] = caches[0][name][:, :start].double()
        o_hi = exact._attend_absorbed(q_nope.double(), q_pe.double(), kv.double(), k_pe.double(), start, key_start,
                                      cache64)
    assert_close_derived(o_model, o_hi, o_ref, name="attention before wo")


def test_reference_backend_never_runs_the_kernel(device, kernel_calls):
    args = ModelArgs.from_name("tiny", backend="reference")
    layer = MLA(args).to(device).eval()
    cache = layer.new_cache(1, 8)
    with torch.no_grad():
        layer(torch.randn(1, 1, args.dim, device=device), 0, cache)
    assert kernel_calls == []


def test_latent_cache_is_the_reference_cache_in_one_buffer(device):
    model, ref, _ = _layers(torch.float32, device)
    cache = model.new_cache(2, 5)
    C, R = model.kv_lora_rank, model.qk_rope_head_dim
    assert cache.names == ("kv", "pe") and cache["kv"].shape == (2, 5, C) and cache["pe"].shape == (2, 5, R)
    assert cache.latent.shape == (2, 5, C + R) and cache.dtype == torch.float32
    kv, pe = torch.randn(2, 3, C, device=device), torch.randn(2, 3, R, device=device)
    cache.update(1, kv=kv, pe=pe)
    assert torch.equal(cache.latent[:, 1:4, :C], kv) and torch.equal(cache.latent[:, 1:4, C:], pe)
    assert torch.count_nonzero(cache.latent[:, 0]) == 0 and torch.count_nonzero(cache.latent[:, 4]) == 0
    cache.reset()
    assert torch.count_nonzero(cache.latent) == 0
    naive = MLA(model.args, attn_impl="naive").new_cache(2, 5)
    assert naive.names == ("k", "v") and not isinstance(naive, LatentCache)
    with pytest.raises(ValueError, match="batch"):
        model.new_cache(0, 5)
    with pytest.raises(ValueError, match="kv_lora_rank"):
        LatentCache(torch.zeros(1, 4, 8), 8)


def test_decode_step_compiles_fullgraph(device, kernel_calls):
    model, _, _ = _layers(torch.float32, device)
    x = torch.randn(2, 3, model.dim, device=device)
    caches = [model.new_cache(2, 8) for _ in range(2)]
    step = torch.compile(model, fullgraph=True, backend="aot_eager")  # the same ops: the same bits
    with torch.no_grad():
        for cache in caches:
            model(x[:, :2], 0, cache)
        y = step(x[:, 2:], 2, caches[0])
        expected = model(x[:, 2:], 2, caches[1])
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    assert torch.equal(caches[0].latent, caches[1].latent)
    assert len(kernel_calls) >= 2  # traced and eager steps both on the kernel


@pytest.mark.gpu
def test_gpu_v3_prefill_and_decode_layer():
    from moela.profiling.shapes import V3

    args = V3.replace(backend="auto", dtype="bf16", max_seq_len=4096)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = MLA(args).to(torch.bfloat16).eval()
        ref = ReferenceMLA(args).to(torch.bfloat16).eval()
        exact = ReferenceMLA(args).to(torch.float64).eval()
    with torch.no_grad():
        for name, p in exact.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.2 if "norm" in name else p.shape[-1] ** -0.5)
    model.load_state_dict(exact.state_dict())
    ref.load_state_dict(exact.state_dict())
    B, P = 2, 512
    x = torch.randn(B, P + 1, args.dim, device="cuda", dtype=torch.float64)
    caches = [layer.new_cache(B, P + 1) for layer in (model, ref, exact)]
    with torch.no_grad():  # prefill on SDPA, then a decode step on the kernel
        ys = [layer(x[:, :P].to(c.dtype), 0, c) for layer, c in zip((model, ref, exact), caches, strict=True)]
        assert_close_derived(ys[0], ys[2], ys[1], name="prefill y")
        ys = [layer(x[:, P:].to(c.dtype), P, c) for layer, c in zip((model, ref, exact), caches, strict=True)]
    assert_close_derived(ys[0], ys[2], ys[1], name="decode y")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_prefill_and_chunked_prefill_on_sdpa_match_the_reference(dtype, device, kernel_calls):
    """Steps longer than DECODE_MAX_TOKENS run SDPA over per-head k/v: a first chunk
    (causal among its tokens), then a chunk after the cached prefix (masked); no cache (training's
    forward) too."""
    model, ref, exact = _layers(dtype, device)
    n = DECODE_MAX_TOKENS + 3
    x = torch.randn(2, 2 * n, model.dim, device=device, dtype=torch.float64)
    caches = [layer.new_cache(2, 2 * n) for layer in (model, ref, exact)]
    with torch.no_grad():
        for start in (0, n):
            ys = [layer(x[:, start:start + n].to(c.dtype), start, c) for layer, c in zip((model, ref, exact), caches,
                                                                                        strict=True)]
            assert_close_derived(ys[0], ys[2], ys[1], name=f"chunk at {start}")
        ys = [layer(x[:, :n].to(c.dtype)) for layer, c in zip((model, ref, exact), caches, strict=True)]
        assert_close_derived(ys[0], ys[2], ys[1], name="no cache")
    assert kernel_calls == []


def test_training_forward_on_sdpa_has_the_reference_gradients(device):
    model, ref, exact = _layers(torch.bfloat16, device)
    x = torch.randn(2, 7, model.dim, device=device, dtype=torch.float64)
    dy = torch.randn_like(x)
    grads = {}
    for name, layer in (("model", model), ("ref", ref), ("exact", exact)):
        layer.train()
        xi = x.to(layer.wkv_b.weight.dtype).requires_grad_()
        layer(xi).backward(dy.to(xi.dtype))
        grads[name] = {"x": xi.grad, "wkv_b": layer.wkv_b.weight.grad, "wq_b": layer.wq_b.weight.grad}
    for key in grads["model"]:
        assert_close_derived(grads["model"][key], grads["exact"][key], grads["ref"][key], name=key)


def test_sdpa_path_is_taken(device, monkeypatch):
    model, _, _ = _layers(torch.bfloat16, device)
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: (calls.append(k.get("is_causal", False)), real(*a, **k))[1])
    x = torch.randn(1, DECODE_MAX_TOKENS + 1, model.dim, device=device, dtype=torch.bfloat16)
    cache = model.new_cache(1, 2 * DECODE_MAX_TOKENS + 2)
    with torch.no_grad():
        model(x, 0, cache)  # causal
        model(x, DECODE_MAX_TOKENS + 1, cache)  # masked
        model(x[:, :4], 2 * DECODE_MAX_TOKENS + 2 - 4, cache)  # a short step: the decode kernel
    assert calls == [True, False]
    ref_backend = MLA(model.args.replace(backend="reference")).to(device, torch.bfloat16)
    with torch.no_grad():
        ref_backend(x)  # the reference backend: the reference's math
        model.float()(x.float())  # float32: the reference's exact math
    assert calls == [True, False]


def test_short_steps_with_grad_mode_on(device, kernel_calls, monkeypatch):
    """A frozen model in grad mode decodes on the kernel (nothing needs a gradient); a trainable one
    takes the reference's absorbed math for a short step over a cache, never SDPA (which would
    expand the whole prefix); without a cache a short step is training: SDPA."""
    model, _, _ = _layers(torch.bfloat16, device)
    sdpa = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: (sdpa.append(1), real(*a, **k))[1])
    x = torch.randn(1, 4, model.dim, device=device, dtype=torch.bfloat16)
    cache = model.new_cache(1, 8)
    with torch.no_grad():
        model(x[:, :2], 0, cache)
    assert len(kernel_calls) == 1
    model.requires_grad_(False)
    model(x[:, 2:3], 2, cache)  # grad mode, nothing requires grad: the kernel
    assert len(kernel_calls) == 2 and sdpa == []
    model.requires_grad_(True)
    model(x[:, 3:4], 3, cache).sum().backward()  # grad needed: the reference's math
    assert len(kernel_calls) == 2 and sdpa == [] and model.wkv_b.weight.grad is not None
    model(x[:, :3]).sum().backward()  # no cache: SDPA
    assert sdpa == [1]


def test_paged_latent_cache_pages_and_lengths(device):
    """Pages from the free list (lowest id first) as sequences grow, the block table and lengths on
    the device, the logical tensors, freeing and reuse, exhaustion."""
    C, R = 16, 8
    cache = PagedLatentCache(5, 3, 200, C, R, dtype=torch.float32, device=device)
    assert cache.names == ("kv", "pe") and cache.batch_size == 3 and cache.max_seq_len == 200
    assert cache.block_table.shape == (3, 4) and (cache.block_table == -1).all() and cache.free_pages == 5
    cache.reserve(1, 100)
    assert cache.pages(1) == [0, 1] and cache.block_table[1].tolist() == [0, 1, -1, -1] and cache.seq_len(1) == 0
    kv, pe = torch.randn(2, 70, C, device=device), torch.randn(2, 70, R, device=device)
    cache.write(0, kv=kv, pe=pe)
    assert cache.pages(0) == [2, 3] and cache.pages(1) == [0, 1] and cache.free_pages == 1
    assert cache.cache_seqlens.tolist() == [70, 70, 0] and [cache.seq_len(b) for b in range(3)] == [70, 70, 0]
    assert torch.equal(cache["kv"][:2, :70], kv) and torch.equal(cache["pe"][:2, :70], pe)
    assert torch.count_nonzero(cache["kv"][:, 70:]) == 0 and torch.count_nonzero(cache["kv"][2]) == 0
    kv2, pe2 = torch.randn(2, 1, C, device=device), torch.randn(2, 1, R, device=device)
    prefix_kv, prefix_pe = cache.update(70, kv=kv2, pe=pe2)
    assert torch.equal(prefix_kv, torch.cat([kv, kv2], 1)) and torch.equal(prefix_pe, torch.cat([pe, pe2], 1))
    with pytest.raises(RuntimeError, match="needs 3 more pages for 150 positions, 1 of 5 are free"):
        cache.reserve(2, 150)
    cache.free(0)
    assert cache.free_pages == 3 and cache.cache_seqlens.tolist() == [0, 71, 0] and (cache.block_table[0] == -1).all()
    cache.reserve(2, 150)
    assert cache.pages(2) == [2, 3, 4]
    with pytest.raises(ValueError, match=r"seq: expected a sequence in \[0, 3\)"):
        cache.reserve(3, 1)
    with pytest.raises(ValueError, match="length: 201 positions run past"):
        cache.reserve(0, 201)
    with pytest.raises(ValueError, match="run past the cache's max_seq_len 200"):
        cache.write(199, kv=torch.cat([kv2, kv2], 1), pe=torch.cat([pe2, pe2], 1))
    cache.reset()
    assert cache.free_pages == 5 and cache.cache_seqlens.tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="dtype: an FP8 cache computes in bfloat16"):
        PagedLatentCache(2, 1, 64, 128, 8, dtype=torch.float32, fp8=True)
    with pytest.raises(ValueError, match="kv_lora_rank: an FP8 cache needs a multiple of 128"):
        PagedLatentCache(2, 1, 64, 96, 8, fp8=True)


def _new_cache(layer, kind: str, batch: int, max_seq_len: int):
    if kind.startswith("paged"):
        return layer.new_paged_cache(num_pages=3 * batch + 1, batch=batch, max_seq_len=max_seq_len,
                                     fp8=kind.endswith("fp8"))
    return layer.new_cache(batch, max_seq_len, fp8=kind == "fp8")


@pytest.mark.parametrize("kind", ["paged", "fp8", "paged-fp8"])
def test_paged_and_fp8_caches_decode_on_the_kernel(kind, device, kernel_calls):
    """Prefill (SDPA, two pages) then decode steps of 1 and 2 tokens on the kernel over the
    cache's layout: the attention (wo's input) against the reference attention run on the
    cache's own (dequantized) contents, in bf16 and float64; the FP8 rows the model wrote are
    bit for bit quant_latent (quant_act) of its latent; a bf16 paged cache holds the bf16 bits."""
    model, ref, _ = _layers(torch.bfloat16, device, kv_lora_rank=128, max_seq_len=96)
    B, P = 3, DECODE_MAX_TOKENS + 60  # 76 tokens: two 64-token pages
    x = torch.randn(B, P + 3, model.dim, device=device, dtype=torch.bfloat16)
    cache = _new_cache(model, kind, B, 96)
    plain = model.new_cache(B, 96)
    seen: dict = {}
    _capture_attention(model, seen, "model")
    with torch.no_grad():
        model(x[:, :P], 0, cache)
        model(x[:, :P], 0, plain)
        assert kernel_calls == []
        for start, s in ((P, 1), (P + 1, 2)):
            model(x[:, start:start + s], start, cache)
            (q_nope, q_pe, kv, k_pe, _, key_start, _), o_model = seen["model"]
            written = torch.cat([cache["kv"][:, start:start + s], cache["pe"][:, start:start + s]], -1)
            if kind.endswith("fp8"):
                rows = (cache.latent[:, start:start + s] if kind == "fp8" else
                        cache.pool.flatten(0, 1)[cache._rows(B, torch.arange(start, start + s, device=device))])
                want = quant_latent(torch.cat([kv, k_pe], -1), 128)
                assert torch.equal(rows.view(torch.uint8), want.view(torch.uint8))
            else:
                assert torch.equal(written, torch.cat([kv, k_pe], -1))
            # the truths: the reference attention over the model's cache contents (dequantized)
            end = start + s
            truths = []
            exact = ReferenceMLA(ref.args).to(device, torch.float64)
            for layer, dtype in ((ref, torch.bfloat16), (exact, torch.float64)):
                layer.load_state_dict(model.state_dict())
                c = layer.new_cache(B, 96)
                c["kv"][:, :end], c["pe"][:, :end] = cache["kv"][:, :end], cache["pe"][:, :end]
                c_kv, c_pe = c["kv"][:, start:end].clone(), c["pe"][:, start:end].clone()
                truths.append(layer._attend_absorbed(q_nope.to(dtype), q_pe.to(dtype), c_kv, c_pe, start, key_start, c))
            assert_close_derived(o_model, truths[1], truths[0], name=f"{kind} attention at {start}")
    C, R = model.kv_lora_rank, model.qk_rope_head_dim
    width = C + 4 + 2 * R if kind.endswith("fp8") else C + R
    kv_shape = (3 * B + 2, 64, width) if kind.startswith("paged") else (B, P + 1, width)  # + the sink page
    assert kernel_calls[0] == ((B, 1, model.n_heads, C + R), kv_shape)
    kv_arg, kw = kernel_calls.kv[0]
    assert kv_arg.dtype == (torch.float8_e4m3fn if kind.endswith("fp8") else torch.bfloat16)
    if kind.startswith("paged"):
        assert kw["block_table"] is not None and kw["cache_seqlens"].tolist() == [P + 1] * B


def test_fp8_and_paged_cache_switches(device):
    model, _, _ = _layers(torch.float32, device, kv_lora_rank=128)
    with pytest.raises(ValueError, match="dtype: an FP8 cache computes in bfloat16"):
        model.new_cache(2, 8, fp8=True)
    cache = model.new_cache(2, 8, dtype=torch.bfloat16, fp8=True)
    assert cache.fp8 and cache.dtype == torch.bfloat16 and cache.latent.dtype == torch.float8_e4m3fn
    assert cache.latent.shape == (2, 8, 128 + 4 + 2 * model.qk_rope_head_dim)
    naive = MLA(model.args, attn_impl="naive")
    with pytest.raises(ValueError, match="fp8: an FP8 cache holds the absorbed form's latent"):
        naive.new_cache(2, 8, fp8=True)
    with pytest.raises(ValueError, match="a paged cache holds the absorbed form's latent"):
        naive.new_paged_cache(4, 2)
    paged = model.new_paged_cache(4, 2)
    assert isinstance(paged, PagedLatentCache) and paged.max_seq_len == model.args.max_seq_len
    assert not paged.fp8 and paged.dtype == torch.float32
