"""moela.reference.mla_decode: the paged and FP8 cache layouts and the log-sum-exp output,
against independent formulations (gathered caches, explicit scores, FlashMLA's byte layout).

Legend: B batch, S new tokens, H heads, L cache length, Dk key width, Dv value width, P page size.
"""

from __future__ import annotations

import pytest
import torch

from moela import reference
from moela.reference.mla_decode import dequant_latent, fp8_latent_width, quant_latent


def _scores(q, keys, scale, lens):
    """Explicit float64 scores (B, S, H, L), -inf where a query does not see a key."""
    B, S, H, _ = q.shape
    s = torch.einsum("bshd,btd->bsht", q.double(), keys.double()) * scale
    t = torch.arange(keys.shape[1])
    for b in range(B):
        for i in range(S):
            s[b, i, :, t > int(lens[b]) - S + i] = float("-inf")
    return s


def test_paged_equals_the_gathered_cache():
    """Pages in random order and shared between sequences: the same numbers, bit for bit, as the
    contiguous cache the block table describes."""
    B, max_blocks, P, NP, H, S, Dk, Dv = 3, 3, 4, 10, 2, 2, 12, 8
    pool = torch.randn(NP, P, Dk, dtype=torch.float64)
    table = torch.randperm(NP)[:B * max_blocks].view(B, max_blocks).to(torch.int32)
    table[2, 0] = table[0, 0]
    q = torch.randn(B, S, H, Dk, dtype=torch.float64)
    lens = torch.tensor([12, 5, 9])
    contiguous = pool[table.long()].flatten(1, 2)
    for lse in (False, True):
        got = reference.mla_decode(q, pool, 0.3, v_dim=Dv, cache_seqlens=lens, block_table=table, return_lse=lse)
        want = reference.mla_decode(q, contiguous, 0.3, v_dim=Dv, cache_seqlens=lens, return_lse=lse)
        for g, w in zip(got if lse else (got,), want if lse else (want,), strict=True):
            assert torch.equal(g, w)


def test_invalid_page_ids_hold_no_key():
    """A page id outside the pool: its keys are skipped, whatever the pool holds (NaN too)."""
    P, NP, H, S, Dk, Dv = 4, 3, 2, 1, 12, 8
    pool = torch.randn(NP, P, Dk, dtype=torch.float64)
    q = torch.randn(1, S, H, Dk, dtype=torch.float64)
    table = torch.tensor([[2, -1, 0, 3]], dtype=torch.int32)
    got = reference.mla_decode(q, pool, 0.3, v_dim=Dv, block_table=table)
    want = reference.mla_decode(q, torch.cat([pool[2], pool[0]])[None], 0.3, v_dim=Dv)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.isfinite(reference.mla_decode(q, pool, 0.3, v_dim=Dv, block_table=table[:, 1:2])).all()  # no key


def test_keys_a_sequence_does_not_hold_carry_no_weight():
    q = torch.randn(2, 1, 2, 12, dtype=torch.float64)
    kv = torch.randn(2, 6, 12, dtype=torch.float64)
    lens = torch.tensor([4, 6])
    poisoned = kv.clone()
    poisoned[0, 4:] = float("nan")
    assert torch.equal(reference.mla_decode(q, poisoned, 0.3, v_dim=8, cache_seqlens=lens),
                       reference.mla_decode(q, kv, 0.3, v_dim=8, cache_seqlens=lens))


def test_lse_is_the_logsumexp_of_the_visible_scores_and_merges():
    B, L, H, S, Dk, Dv = 2, 9, 3, 2, 12, 8
    q, kv = torch.randn(B, S, H, Dk, dtype=torch.float64), torch.randn(B, L, Dk, dtype=torch.float64)
    lens = torch.tensor([9, 1])  # sequence 1: token 0 sees no key
    o, lse = reference.mla_decode(q, kv, 0.3, v_dim=Dv, cache_seqlens=lens, return_lse=True)
    s = _scores(q, kv, 0.3, lens)
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), rtol=1e-12, atol=1e-12)
    assert lse[1, 0].eq(float("-inf")).all() and o[1, 0].eq(0).all()
    torch.testing.assert_close(o, torch.einsum("bsht,btd->bshd", s.softmax(-1).nan_to_num(), kv[..., :Dv]))
    # one query over two chunks of keys, merged by their lse weights: the whole
    q1 = q[:, :1]
    (o_a, lse_a), (o_b, lse_b) = (reference.mla_decode(q1, part, 0.3, v_dim=Dv, return_lse=True)
                                  for part in (kv[:, :4], kv[:, 4:]))
    whole = reference.mla_decode(q1, kv, 0.3, v_dim=Dv, return_lse=True)
    merged = torch.logaddexp(lse_a, lse_b)
    torch.testing.assert_close(merged, whole[1], rtol=1e-12, atol=1e-12)
    w_a, w_b = torch.exp(lse_a - merged)[..., None], torch.exp(lse_b - merged)[..., None]
    torch.testing.assert_close(w_a * o_a + w_b * o_b, whole[0], rtol=1e-12, atol=1e-12)


def test_fp8_layout_is_flashmlas():
    """656 bytes for 512 + 64: e4m3 values = quant_act's, then its float32 scales, then the rope
    part's bf16 bits; dequantizing is bf16(e4m3 · scale); the FP8 reference is the bf16 reference
    on the dequantized cache."""
    assert fp8_latent_width(576, 512) == 656
    x = torch.randn(3, 5, 576).mul(torch.rand(3, 5, 1) * 8).bfloat16()
    packed = quant_latent(x, 512)
    assert packed.dtype == torch.float8_e4m3fn and packed.shape == (3, 5, 656)
    values, scales = reference.quant_act(x[..., :512], 128)
    raw = packed.view(torch.uint8)
    assert torch.equal(raw[..., :512], values.view(torch.uint8))
    assert torch.equal(raw[..., 512:528].contiguous().view(torch.float32), scales)
    assert torch.equal(raw[..., 528:].contiguous().view(torch.bfloat16), x[..., 512:])
    back = dequant_latent(packed, 512)
    assert torch.equal(back[..., :512], (values.float() * scales.repeat_interleave(128, -1)).bfloat16())
    assert torch.equal(back[..., 512:], x[..., 512:])
    # e4m3 keeps 3 mantissa bits: half a step is 2^-4 relative (2^-10 of the scale below 2^-6), plus
    # the bf16 rounding of the product (2^-9 relative)
    err = (back[..., :512].double() - x[..., :512].double()).abs()
    step = scales.double().repeat_interleave(128, -1)
    bound = 2**-4 * x[..., :512].double().abs() * (1 + 2**-8) + 2**-10 * step + 2**-9 * back[..., :512].double().abs()
    assert (err <= bound).all()
    q = torch.randn(3, 2, 4, 576, dtype=torch.bfloat16)
    lens = torch.tensor([5, 3, 2])
    assert torch.equal(reference.mla_decode(q, packed, 0.1, cache_seqlens=lens),
                       reference.mla_decode(q, back, 0.1, cache_seqlens=lens))


def test_validate_and_contract_errors():
    q, kv = torch.randn(2, 1, 2, 12), torch.randn(4, 4, 12)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    lens = torch.tensor([5, 2])
    reference.mla_decode(q, kv, 0.1, v_dim=8, cache_seqlens=lens, block_table=table, validate=True)
    table[1, 1] = 9  # unused by sequence 1 (2 keys): fine
    reference.mla_decode(q, kv, 0.1, v_dim=8, cache_seqlens=lens, block_table=table, validate=True)
    table[0, 1] = 4  # used by sequence 0
    with pytest.raises(ValueError, match=r"block_table: expected page ids in \[0, 4\).*got 4 at \[0, 1\]"):
        reference.mla_decode(q, kv, 0.1, v_dim=8, cache_seqlens=lens, block_table=table, validate=True)
    with pytest.raises(ValueError, match=r"block_table: expected page ids"):
        reference.mla_decode(q, kv, 0.1, v_dim=8, block_table=table, validate=True)  # every block used
    with pytest.raises(TypeError, match="block_table: expected dtype int32"):
        reference.mla_decode(q, kv, 0.1, v_dim=8, block_table=table.long())
    with pytest.raises(ValueError, match=r"kv: expected a page pool \(num_pages, page_size >= 1, 12\)"):
        reference.mla_decode(q, kv[..., :10], 0.1, v_dim=8, block_table=table)
    with pytest.raises(ValueError, match="q: expected at most L=8"):
        reference.mla_decode(q.expand(2, 9, 2, 12), kv, 0.1, v_dim=8, block_table=table)
    with pytest.raises(TypeError, match="return_lse"):
        reference.mla_decode(q, kv[:2], 0.1, v_dim=8, return_lse=None)
    kv8 = quant_latent(torch.randn(2, 4, 192, dtype=torch.bfloat16), 128)
    with pytest.raises(TypeError, match="q: an FP8 cache"):
        reference.mla_decode(torch.randn(2, 1, 2, 192), kv8, 0.1, v_dim=128)
    with pytest.raises(ValueError, match="kv: expected shape"):
        reference.mla_decode(torch.randn(2, 1, 2, 190, dtype=torch.bfloat16), kv8, 0.1, v_dim=128)
    with pytest.raises(ValueError, match="v_dim: expected a multiple of 128"):
        quant_latent(torch.randn(2, 100, dtype=torch.bfloat16), 64)
