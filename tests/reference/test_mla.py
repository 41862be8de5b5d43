"""Tests of the MLA reference: RMSNorm, YaRN RoPE, the KV cache, naive == absorbed, decode == prefill."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moela.reference.config import ModelArgs
from moela.reference.metrics import rel_err
from moela.reference.mla import (
    MLA,
    KVCache,
    RMSNorm,
    apply_rotary_emb,
    precompute_freqs_cis,
    rms_norm,
    yarn_correction_range,
)

F32_EPS = torch.finfo(torch.float32).eps
F64_RTOL = 1e-10  # two float64 evaluations of the same math, different association order


# --------------------------------------------------------------------------- helpers
@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def tiny(**overrides) -> ModelArgs:
    return ModelArgs.from_name("tiny", **overrides)


def randomize_(mla: MLA) -> MLA:
    """Random weights from the global RNG: linears ~ N(0, in_features^-1), norms ~ 1 ± 0.2."""
    with torch.no_grad():
        for name, p in mla.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, dtype=p.dtype))
            else:
                p.copy_(torch.randn(p.shape, dtype=p.dtype) * p.shape[1] ** -0.5)
    return mla


def make_pair(args: ModelArgs, dtype: torch.dtype = torch.float64) -> tuple[MLA, MLA]:
    """A naive and an absorbed layer sharing one set of random weights."""
    naive = randomize_(MLA(args, "naive"))
    absorbed = MLA(args, "absorb")
    absorbed.load_state_dict(naive.state_dict())
    return naive.to(dtype), absorbed.to(dtype)


def nan_cache(mla: MLA, batch: int, max_seq_len: int) -> KVCache:
    """A cache full of NaN: reading a position that was never written poisons the output."""
    cache = mla.new_cache(batch, max_seq_len)
    for name in cache.names:
        cache[name].fill_(float("nan"))
    return cache


def oracle(mla: MLA, x: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
    """MLA without a cache, written from the math with loops and real rotations (float64)."""
    a = mla.args
    w = {k: v.double() for k, v in mla.state_dict().items()}
    x = x.double()
    h, dn, r, dv, c = a.n_heads, a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim, a.kv_lora_rank

    def norm(v, weight):
        return v / torch.sqrt((v * v).mean(-1, keepdim=True) + 1e-6) * weight

    theta = precompute_freqs_cis(a, 2, dtype=torch.float64)[1].angle()  # (R/2,) angle per position

    def rope(v, pos):  # v (..., R) at absolute position pos; rotate pairs (2j, 2j+1)
        cos, sin = torch.cos(pos * theta), torch.sin(pos * theta)
        out = torch.empty_like(v)
        out[..., 0::2] = v[..., 0::2] * cos - v[..., 1::2] * sin
        out[..., 1::2] = v[..., 0::2] * sin + v[..., 1::2] * cos
        return out

    if a.q_lora_rank == 0:
        q = x @ w["wq.weight"].T
    else:
        q = norm(x @ w["wq_a.weight"].T, w["q_norm.weight"]) @ w["wq_b.weight"].T
    q = q.unflatten(-1, (h, dn + r))  # (B, S, H, Dk)
    kv_all = x @ w["wkv_a.weight"].T
    kv = norm(kv_all[..., :c], w["kv_norm.weight"]) @ w["wkv_b.weight"].T
    kv = kv.unflatten(-1, (h, dn + dv))  # (B, S, H, Dn + Dv)
    k_pe = kv_all[..., c:]  # (B, S, R)
    scale = (dn + r) ** -0.5
    if a.max_seq_len > a.original_seq_len:
        scale *= (0.1 * a.mscale * math.log(a.rope_factor) + 1) ** 2

    bsz, s = x.shape[:2]
    o = torch.zeros(bsz, s, h, dv, dtype=torch.float64)
    for i in range(s):
        qi = torch.cat([q[:, i, :, :dn], rope(q[:, i, :, dn:], start_pos + i)], -1)  # (B, H, Dk)
        keys = [torch.cat([kv[:, j, :, :dn], rope(k_pe[:, j], start_pos + j)[:, None].expand(-1, h, -1)], -1)
                for j in range(i + 1)]  # i + 1 of (B, H, Dk)
        scores = torch.stack([(qi * kj).sum(-1) for kj in keys], -1) * scale  # (B, H, i + 1)
        p = torch.softmax(scores, -1)
        o[:, i] = sum(p[..., j, None] * kv[:, j, :, dn:] for j in range(i + 1))
    return o.flatten(2) @ w["wo.weight"].T


# --------------------------------------------------------------------------- RMSNorm
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_rms_norm_matches_formula(dtype):
    torch.manual_seed(101)
    x = (torch.randn(3, 5, 24, dtype=torch.float64) * 3).to(dtype)
    weight = 1 + 0.2 * torch.randn(24, dtype=torch.float64)
    xd = x.double()
    want = xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * weight
    got = rms_norm(x, weight.to(dtype))
    assert got.dtype == dtype
    # float32 internal math for half types: only the final rounding to dtype remains
    tol = {torch.float64: 1e-14, torch.float32: 4 * F32_EPS, torch.bfloat16: 2**-8}[dtype]
    assert rel_err(got, want) < tol
    assert rel_err(rms_norm(x, weight.to(dtype), eps=0.5), xd / torch.sqrt(xd.pow(2).mean(-1, True) + 0.5)
                   * weight) < tol


def test_rms_norm_module_has_weight_ones():
    torch.manual_seed(102)
    norm = RMSNorm(16)
    assert list(norm.state_dict()) == ["weight"] and torch.equal(norm.weight, torch.ones(16))
    x = torch.randn(2, 16)
    torch.testing.assert_close(norm(x), rms_norm(x, torch.ones(16)), rtol=0, atol=0)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(15))


# --------------------------------------------------------------------------- RoPE
def test_plain_rope_frequencies_without_yarn():
    args = tiny(max_seq_len=32, original_seq_len=32)  # no YaRN: max_seq_len <= original_seq_len
    assert not args.uses_yarn
    f = precompute_freqs_cis(args, dtype=torch.float64)
    r = args.qk_rope_head_dim
    assert f.shape == (32, r // 2) and f.dtype == torch.complex128
    theta = args.rope_theta ** (-torch.arange(0, r, 2, dtype=torch.float64) / r)
    t = torch.arange(32, dtype=torch.float64)[:, None]
    torch.testing.assert_close(f, torch.polar(torch.ones(32, r // 2, dtype=torch.float64), t * theta),
                               rtol=1e-14, atol=1e-14)
    f32 = precompute_freqs_cis(args)
    assert f32.dtype == torch.complex64 and f32.shape == (32, r // 2)
    assert (f32 - f).abs().max() < 32 * F32_EPS  # angle t·θ rounded in float32, t < 32


def test_yarn_changes_low_frequencies_and_keeps_the_highest():
    args = tiny()  # max_seq_len 64 > original_seq_len 32, rope_factor 4
    assert args.uses_yarn
    r = args.qk_rope_head_dim
    plain = args.rope_theta ** (-torch.arange(0, r, 2, dtype=torch.float64) / r)
    yarn = precompute_freqs_cis(args, 2, dtype=torch.float64)[1].angle()
    # R=8, L=32: low = floor(8·ln(32/(2π·32))/(2 ln 1e4)) -> 0, high = ceil(8·ln(32/2π)/(2 ln 1e4)) = 1
    assert yarn_correction_range(args) == (0, 1)
    torch.testing.assert_close(yarn[0], plain[0], rtol=1e-15, atol=0)
    torch.testing.assert_close(yarn[1:], plain[1:] / args.rope_factor, rtol=1e-14, atol=0)


def test_yarn_blend_for_deepseek_v3():
    args = ModelArgs.from_name("deepseek-v3")  # R=64, L=4096, beta 32/1, factor 40
    low, high = yarn_correction_range(args)
    assert (low, high) == (10, 23)  # 3.474·ln(651.9/32) = 10.47 -> 10, 3.474·ln(651.9) = 22.5 -> 23
    plain = 10000.0 ** (-torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    ramp = ((torch.arange(32, dtype=torch.float64) - 10) / 13).clamp(0, 1)
    want = plain * (1 - ramp) + plain / 40 * ramp
    got = precompute_freqs_cis(args, 2, dtype=torch.float64)[1].angle()
    torch.testing.assert_close(got, want, rtol=1e-14, atol=0)
    got32 = precompute_freqs_cis(args, 2)[1].angle().double()
    torch.testing.assert_close(got32, want, rtol=4 * F32_EPS, atol=0)
    assert precompute_freqs_cis(args).shape == (args.max_seq_len, 32)


def test_rope_interleaved_pairs():
    """DeepSeek's convention: (x[2j], x[2j+1]) is one complex number, not (x[j], x[j + R/2])."""
    args = tiny(max_seq_len=32, original_seq_len=32)
    f = precompute_freqs_cis(args, 6, dtype=torch.float64)
    x = torch.zeros(1, 6, 1, 8, dtype=torch.float64)
    x[..., 0] = 1.0  # real part of pair 0
    x[..., 3] = 1.0  # imaginary part of pair 1
    y = apply_rotary_emb(x, f)
    t = torch.arange(6, dtype=torch.float64)
    theta1 = args.rope_theta ** (-2 / 8)
    torch.testing.assert_close(y[0, :, 0, 0], torch.cos(t), rtol=0, atol=1e-15)
    torch.testing.assert_close(y[0, :, 0, 1], torch.sin(t), rtol=0, atol=1e-15)
    torch.testing.assert_close(y[0, :, 0, 2], -torch.sin(t * theta1), rtol=0, atol=1e-15)
    torch.testing.assert_close(y[0, :, 0, 3], torch.cos(t * theta1), rtol=0, atol=1e-15)
    assert (y[..., 4:] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rope_keeps_dtype(dtype):
    torch.manual_seed(103)
    f = precompute_freqs_cis(tiny(), 5)
    x = torch.randn(2, 5, 3, 8).to(dtype)
    y = apply_rotary_emb(x, f)
    assert y.dtype == dtype and y.shape == x.shape


def test_rope_preserves_norms_and_depends_on_position_difference():
    torch.manual_seed(104)
    args = tiny()
    f = precompute_freqs_cis(args, dtype=torch.float64)  # (64, 4)
    x = torch.randn(2, 64, 3, 8, dtype=torch.float64)
    y = apply_rotary_emb(x, f)
    assert y.dtype == torch.float64
    pair_norm = lambda v: v.unflatten(-1, (4, 2)).norm(dim=-1)
    torch.testing.assert_close(pair_norm(y), pair_norm(x), rtol=1e-14, atol=0)

    q, k = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)

    def rotated_dot(m, n):  # q at position m, k at position n
        qm = apply_rotary_emb(q.view(1, 1, 1, 8), f[m : m + 1])
        kn = apply_rotary_emb(k.view(1, 1, 1, 8), f[n : n + 1])
        return float((qm * kn).sum())

    for m, n in [(5, 2), (9, 9), (3, 11)]:
        for shift in (1, 7, 40):
            assert rotated_dot(m + shift, n + shift) == pytest.approx(rotated_dot(m, n), rel=1e-12, abs=1e-12)
    assert rotated_dot(5, 2) != pytest.approx(rotated_dot(5, 3), rel=1e-6)


# --------------------------------------------------------------------------- softmax scale
def test_softmax_scale_uses_mscale_squared_under_yarn():
    args = tiny(mscale=0.7)
    m = 0.1 * 0.7 * math.log(args.rope_factor) + 1
    assert args.softmax_scale == pytest.approx(args.qk_head_dim**-0.5 * m * m, rel=1e-15)
    assert MLA(args).softmax_scale == args.softmax_scale
    no_yarn = tiny(mscale=0.7, max_seq_len=32)
    assert MLA(no_yarn).softmax_scale == pytest.approx(no_yarn.qk_head_dim**-0.5, rel=1e-15)


def test_mscale_changes_the_output_only_under_yarn():
    torch.manual_seed(105)
    x = torch.randn(1, 6, 64, dtype=torch.float64)
    for max_seq_len, differs in [(64, True), (32, False)]:
        a, _ = make_pair(tiny(max_seq_len=max_seq_len, mscale=1.0))
        b = MLA(tiny(max_seq_len=max_seq_len, mscale=2.0), "naive").double()
        b.load_state_dict(a.state_dict())
        assert (rel_err(a(x), b(x)) > 1e-3) == differs


# --------------------------------------------------------------------------- the layer
def test_state_dict_names_follow_deepseek():
    with torch.device("meta"):
        lora = MLA(tiny())
        no_lora = MLA(tiny(q_lora_rank=0), "naive")
    common = ["wkv_a.weight", "kv_norm.weight", "wkv_b.weight", "wo.weight"]
    assert sorted(lora.state_dict()) == sorted(["wq_a.weight", "q_norm.weight", "wq_b.weight", *common])
    assert sorted(no_lora.state_dict()) == sorted(["wq.weight", *common])


@pytest.mark.parametrize("q_lora_rank", [0, 32], ids=["wq", "wq_a"])
@pytest.mark.parametrize("attn_impl", ["naive", "absorb"])
@pytest.mark.parametrize("start_pos", [0, 5])
def test_matches_loop_oracle(q_lora_rank, attn_impl, start_pos):
    torch.manual_seed(110 + q_lora_rank + start_pos)
    naive, absorbed = make_pair(tiny(q_lora_rank=q_lora_rank))
    mla = naive if attn_impl == "naive" else absorbed
    x = torch.randn(2, 7, 64, dtype=torch.float64)
    want = oracle(mla, x, start_pos)
    assert rel_err(mla(x, start_pos), want) < F64_RTOL
    if start_pos == 0:  # with a cache too (from start_pos > 0 a cache adds the prefix's keys)
        assert rel_err(mla(x, 0, nan_cache(mla, 2, 7)), want) < F64_RTOL


@pytest.mark.parametrize("q_lora_rank", [0, 32], ids=["wq", "wq_a"])
@pytest.mark.parametrize("yarn", [True, False], ids=["yarn", "plain"])
def test_naive_equals_absorbed_float64(q_lora_rank, yarn):
    torch.manual_seed(120 + q_lora_rank + yarn)
    naive, absorbed = make_pair(tiny(q_lora_rank=q_lora_rank, max_seq_len=64 if yarn else 32))
    x = torch.randn(3, 11, 64, dtype=torch.float64)
    assert rel_err(absorbed(x), naive(x)) < F64_RTOL
    assert rel_err(absorbed(x, 9), naive(x, 9)) < F64_RTOL


@pytest.mark.parametrize("q_lora_rank", [0, 32], ids=["wq", "wq_a"])
def test_naive_equals_absorbed_float32(q_lora_rank):
    """Each float32 form stays within a small factor of float32's own error against float64."""
    torch.manual_seed(130 + q_lora_rank)
    naive64, absorbed64 = make_pair(tiny(q_lora_rank=q_lora_rank))
    naive32, absorbed32 = copy.deepcopy(naive64).float(), copy.deepcopy(absorbed64).float()
    x64 = torch.randn(2, 16, 64, dtype=torch.float64)
    x32 = x64.float()
    truth = naive64(x64)
    assert rel_err(absorbed64(x64), truth) < F64_RTOL
    y_naive, y_absorbed = naive32(x32), absorbed32(x32)
    assert y_naive.dtype == y_absorbed.dtype == torch.float32
    baseline = max(rel_err(y_naive, truth), F32_EPS)  # float32's own error on this problem
    assert baseline < 1e3 * F32_EPS
    assert rel_err(y_absorbed, truth) <= 4 * baseline
    assert rel_err(y_absorbed, y_naive) <= 8 * baseline


@pytest.mark.parametrize("q_lora_rank", [0, 32], ids=["wq", "wq_a"])
@pytest.mark.parametrize("attn_impl", ["naive", "absorb"])
def test_decode_and_chunked_prefill_match_prefill(q_lora_rank, attn_impl):
    torch.manual_seed(140 + q_lora_rank + (attn_impl == "naive"))
    naive, absorbed = make_pair(tiny(q_lora_rank=q_lora_rank))
    mla = naive if attn_impl == "naive" else absorbed
    s = 12
    x = torch.randn(2, s, 64, dtype=torch.float64)
    full = mla(x)  # no cache
    prefill = mla(x, 0, nan_cache(mla, 3, 20))  # a cache with a larger batch and length
    assert rel_err(prefill, full) < F64_RTOL

    cache = nan_cache(mla, 2, s)
    outs = [mla(x[:, :5], 0, cache)]
    outs += [mla(x[:, t : t + 1], t, cache) for t in range(5, s)]  # decode one token at a time
    assert rel_err(torch.cat(outs, 1), full) < F64_RTOL

    cache = nan_cache(mla, 2, s)
    bounds = [0, 3, 4, 9, 12]  # chunks of 3, 1, 5, 3
    outs = [mla(x[:, a:b], a, cache) for a, b in itertools.pairwise(bounds)]
    assert rel_err(torch.cat(outs, 1), full) < F64_RTOL
    # the last chunk alone (S > 1, start_pos > 0) against the oracle: the mask is offset
    assert rel_err(outs[-1], oracle(mla, x)[:, 9:]) < F64_RTOL


@pytest.mark.parametrize("attn_impl", ["naive", "absorb"])
def test_causal(attn_impl):
    torch.manual_seed(150 + (attn_impl == "naive"))
    naive, absorbed = make_pair(tiny())
    mla = naive if attn_impl == "naive" else absorbed
    x = torch.randn(1, 9, 64, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 6] += 1.0
    for start_pos in (0, 4):
        y, y2 = mla(x, start_pos), mla(x2, start_pos)
        assert torch.equal(y[:, :6], y2[:, :6])
        assert (y[:, 6:] - y2[:, 6:]).abs().amax(-1).min() > 1e-6  # every later output moved


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_low_precision_forward(dtype):
    torch.manual_seed(160)
    naive64, absorbed64 = make_pair(tiny())
    x = torch.randn(2, 10, 64, dtype=torch.float64)
    truth = naive64(x)
    for mla in (naive64, absorbed64):
        m = copy.deepcopy(mla).to(dtype)
        cache = m.new_cache(2, 10)
        assert cache.dtype == dtype
        y = torch.cat([m(x[:, :6].to(dtype), 0, cache), m(x[:, 6:].to(dtype), 6, cache)], 1)
        assert y.dtype == dtype
        # weights, inputs and every op round to dtype: measured 1-3 eps, allow a few times that
        assert rel_err(y, truth) < 8 * torch.finfo(dtype).eps


# --------------------------------------------------------------------------- cache and errors
def test_kv_cache_update_writes_and_returns_prefix_views():
    torch.manual_seed(170)
    cache = KVCache.zeros(3, 8, {"kv": (4,), "pe": (2,)}, dtype=torch.float64)
    assert cache.names == ("kv", "pe") and cache.batch_size == 3 and cache.max_seq_len == 8
    kv, pe = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, 2, dtype=torch.float64)
    got_kv, got_pe = cache.update(2, pe=pe, kv=kv)  # returned in the cache's name order
    assert got_kv.shape == (2, 5, 4) and got_pe.shape == (2, 5, 2)
    assert torch.equal(got_kv[:, 2:], kv) and torch.equal(got_pe[:, 2:], pe)
    assert (got_kv[:, :2] == 0).all() and (cache["kv"][2] == 0).all() and (cache["kv"][:, 5:] == 0).all()
    assert got_kv.data_ptr() == cache["kv"].data_ptr()  # a view, not a copy
    with pytest.raises(ValueError, match=r"\[6, 9\).*max_seq_len 8"):
        cache.update(6, kv=kv, pe=pe)
    with pytest.raises(ValueError, match="batch 4 .* batch 3"):
        cache.update(0, kv=torch.zeros(4, 1, 4), pe=torch.zeros(4, 1, 2))
    with pytest.raises(ValueError, match="named"):
        cache.update(0, kv=kv)
    with pytest.raises(ValueError, match="pe"):
        cache.update(0, kv=kv, pe=torch.zeros(2, 3, 3))


def test_new_cache_shapes():
    args = tiny()
    naive = MLA(args, "naive").double().new_cache(2)
    assert {n: tuple(naive[n].shape) for n in naive.names} == {"k": (2, 64, 4, 24), "v": (2, 64, 4, 16)}
    assert naive.dtype == torch.float64
    absorbed = MLA(args).new_cache(1, 10, dtype=torch.bfloat16)
    assert {n: tuple(absorbed[n].shape) for n in absorbed.names} == {"kv": (1, 10, 32), "pe": (1, 10, 8)}
    assert absorbed.dtype == torch.bfloat16


def test_errors():
    torch.manual_seed(180)
    args = tiny()
    with pytest.raises(ValueError, match="attn_impl"):
        MLA(args, "flash")
    mla = MLA(args)
    with pytest.raises(ValueError, match=r"x: expected shape \(B, S, 64\), got \(5, 64\)"):
        mla(torch.randn(5, 64))
    with pytest.raises(ValueError, match=r"x: expected shape \(B, S, 64\), got \(1, 5, 32\)"):
        mla(torch.randn(1, 5, 32))
    with pytest.raises(TypeError, match="x: expected a floating-point"):
        mla(torch.ones(1, 5, 64, dtype=torch.int64))
    with pytest.raises(TypeError, match="x: expected dtype torch.float32"):
        mla(torch.randn(1, 5, 64, dtype=torch.float64))
    with pytest.raises(ValueError, match="start_pos"):
        mla(torch.randn(1, 5, 64), -1)
    cache = mla.new_cache(2, 8)
    mla(torch.randn(2, 6, 64), 0, cache)
    with pytest.raises(ValueError, match=r"\[6, 9\).*max_seq_len 8"):
        mla(torch.randn(2, 3, 64), 6, cache)
    with pytest.raises(ValueError, match="batch 3"):
        mla(torch.randn(3, 1, 64), 0, cache)
    with pytest.raises(ValueError, match="'naive' layer"):
        MLA(args, "naive")(torch.randn(2, 1, 64), 0, cache)
    with pytest.raises(TypeError, match="cache: expected dtype"):
        mla(torch.randn(2, 1, 64), 0, mla.new_cache(2, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match="dtype"):
        precompute_freqs_cis(args, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="freqs_cis"):
        apply_rotary_emb(torch.randn(1, 4, 2, 8), precompute_freqs_cis(args, 5))


# --------------------------------------------------------------------------- property test
@pytest.mark.slow
@settings(max_examples=20, deadline=None)
@given(
    n_heads=st.integers(1, 4),
    qk_nope_head_dim=st.integers(1, 12),
    half_rope=st.integers(1, 4),
    v_head_dim=st.integers(1, 12),
    kv_lora_rank=st.integers(1, 16),
    q_lora_rank=st.integers(0, 16),
    dim=st.integers(4, 24),
    batch=st.integers(1, 2),
    seqlen=st.integers(1, 6),
    start_pos=st.integers(0, 5),
    yarn=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_naive_equals_absorbed_property(n_heads, qk_nope_head_dim, half_rope, v_head_dim, kv_lora_rank,
                                        q_lora_rank, dim, batch, seqlen, start_pos, yarn, seed):
    torch.manual_seed(seed)
    args = tiny(n_heads=n_heads, qk_nope_head_dim=qk_nope_head_dim, qk_rope_head_dim=2 * half_rope,
                v_head_dim=v_head_dim, kv_lora_rank=kv_lora_rank, q_lora_rank=q_lora_rank, dim=dim,
                max_seq_len=64 if yarn else 32)
    naive, absorbed = make_pair(args)
    x = torch.randn(batch, start_pos + seqlen, dim, dtype=torch.float64)
    outs = []
    for mla in (naive, absorbed):  # prefix, then the chunk under test, through a cache
        cache = nan_cache(mla, batch, start_pos + seqlen)
        if start_pos:
            mla(x[:, :start_pos], 0, cache)
        outs.append(mla(x[:, start_pos:], start_pos, cache))
    assert outs[0].shape == (batch, seqlen, dim)
    assert rel_err(outs[1], outs[0]) < F64_RTOL
    assert rel_err(outs[0], naive(x)[:, start_pos:]) < F64_RTOL


# --------------------------------------------------------------------------- DeepSeek configs
def test_deepseek_v2_lite_smoke():
    torch.manual_seed(190)
    args = ModelArgs.from_name("deepseek-v2-lite")
    assert args.q_lora_rank == 0 and args.n_heads == 16
    naive, absorbed = make_pair(args, torch.float32)  # ~12M parameters
    x = torch.randn(1, 4, args.dim)
    y = absorbed(x, 0, absorbed.new_cache(1, 8))
    assert y.shape == (1, 4, 2048) and y.dtype == torch.float32 and torch.isfinite(y).all()
    truth = copy.deepcopy(naive).double()(x.double())
    baseline = max(rel_err(naive(x), truth), F32_EPS)
    assert rel_err(y, truth) <= 4 * baseline


def test_deepseek_v3_parameter_shapes_on_meta():
    args = ModelArgs.from_name("deepseek-v3")
    with torch.device("meta"):
        mla = MLA(args)
    shapes = {k: tuple(v.shape) for k, v in mla.state_dict().items()}
    assert shapes == {
        "wq_a.weight": (1536, 7168),
        "q_norm.weight": (1536,),
        "wq_b.weight": (128 * 192, 1536),
        "wkv_a.weight": (576, 7168),
        "kv_norm.weight": (512,),
        "wkv_b.weight": (128 * 256, 512),
        "wo.weight": (7168, 128 * 128),
    }
    assert all(v.is_meta for v in mla.state_dict().values())
    cache = mla.new_cache(2)
    assert cache["kv"].shape == (2, args.max_seq_len, 512) and cache["pe"].shape == (2, args.max_seq_len, 64)
    assert cache.device.type == "meta"
