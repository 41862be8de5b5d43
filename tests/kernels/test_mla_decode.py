"""moela.kernels.mla_decode against moela.reference.mla_decode in float64 (derived tolerances).

Legend: B batch, S new tokens, H heads, L cache length, Dk key width, Dv value width, P page
size (64), NP pages in the pool.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from moela_testing import assert_close_derived, nan_empty

from moela import reference
from moela.kernels.mla_decode import CONFIGS, PAGE_ALIGN, config_for, mla_decode, num_parts_for
from moela.profiling.shapes import FLASHMLA_DECODE
from moela.reference.mla_decode import dequant_latent, quant_latent

_kernel_module = importlib.import_module("moela.kernels.mla_decode")  # the schedule, for its own test


def truths(q, kv, scale, v_dim, **kw):
    """The reference in float64 (the truth; an FP8 cache dequantized first) and at the inputs'
    precision (what torch itself makes: bf16 products, float32 softmax)."""
    keys = dequant_latent(kv, v_dim) if kv.dtype == torch.float8_e4m3fn else kv
    hi = reference.mla_decode(q.double(), keys.double(), scale, v_dim=v_dim, **kw)
    lo = reference.mla_decode(q, kv, scale, v_dim=v_dim, **kw)
    return hi, lo


def check(o, q, kv, scale, v_dim, name="o", **kw):
    hi, lo = truths(q, kv, scale, v_dim, **kw)
    assert o.dtype == q.dtype and o.shape == hi.shape
    assert_close_derived(o, hi, lo, factor=2.0, name=name)


def inputs(B, L, H, S, Dk, dtype, device):
    return torch.randn(B, S, H, Dk, dtype=dtype, device=device), torch.randn(B, L, Dk, dtype=dtype, device=device)


DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float32, id="fp32")]
SMALL = [
    pytest.param(2, L, H, S, 40, 32, id=f"B2-L{L}-H{H}-S{S}")
    for L in (1, 17, 64) for H in (1, 4) for S in (1, 2) if S <= L
] + [
    pytest.param(1, 3, 2, 2, 576, 512, id="deepseek-dims-L3-H2-S2"),
    pytest.param(2, 19, 3, 1, 40, 24, id="odd-dv-H3"),  # masked value and rope columns, odd rows
    pytest.param(2, 9, 2, 2, 32, 32, id="no-rope"),  # Dk == Dv
    pytest.param(1, 70, 20, 2, 40, 32, id="R40-two-row-tiles"),  # S·H = 40: a 64-row tile (bf16), three 16-row (fp32)
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,L,H,S,Dk,v_dim", SMALL)
def test_matches_float64(B, L, H, S, Dk, v_dim, dtype, device):
    q, kv = inputs(B, L, H, S, Dk, dtype, device)
    scale = Dk**-0.5
    out = nan_empty((B, S, H, v_dim), dtype, device)
    o = mla_decode.launch(q, kv, scale, v_dim=v_dim, out=out)
    assert o is out
    check(o, q, kv, scale, v_dim)


def test_public_op_fp16_and_strided(device):
    """The public function (its direct path); fp16; q and kv as non-contiguous views."""
    B, L, H, S, Dk, v_dim = 2, 21, 4, 2, 40, 32
    q = torch.randn(B, H, S, Dk + 8, dtype=torch.float16, device=device).transpose(1, 2)[..., :Dk]
    kv = torch.randn(L, B, Dk, dtype=torch.float16, device=device).transpose(0, 1)
    o = mla_decode(q, kv, 0.3, v_dim=v_dim)
    check(o, q, kv, 0.3, v_dim)


def test_causal(device):
    """Changing keys past a query's position leaves its output bit-identical; earlier ones change it."""
    B, L, H, S, Dk, v_dim = 2, 17, 4, 2, 40, 32
    q, kv = inputs(B, L, H, S, Dk, torch.bfloat16, device)
    o = mla_decode(q, kv, Dk**-0.5, v_dim=v_dim)
    kv2 = kv.clone()
    kv2[:, L - 1] = 100.0  # visible to token 1 only
    o2 = mla_decode(q, kv2, Dk**-0.5, v_dim=v_dim)
    assert torch.equal(o[:, 0], o2[:, 0])
    assert not torch.equal(o[:, 1], o2[:, 1])


# ----------------------------------------------------------------------------- the schedule
def _pieces(sched: torch.Tensor, B: int, num_parts: int):
    slots = B + num_parts - 1
    s = sched.cpu().tolist()
    seq, lo, hi = s[:slots], s[slots:2 * slots], s[2 * slots:3 * slots]
    return seq, lo, hi, s[3 * slots:3 * slots + B], s[3 * slots + B:]


@pytest.mark.parametrize("num_parts", [1, 2, 7, 40])
def test_schedule_covers_every_key_block_once(num_parts, device):
    """The device schedule: each sequence's keys [0, len) are cut at 64-key boundaries into
    pieces that follow each other in slots slot0_b .., no slot used twice, every part's pieces
    within its share of the units (keys + OVERHEAD per sequence); lengths clamped into [0, L]."""
    B, L, overhead = 9, 1000, 2
    lens = [0, 1000, 64, 65, -3, 5000, 130, 999, 1]
    clamped = [min(max(n, 0), L) for n in lens]
    sched = _kernel_module._schedule(torch.tensor(lens, dtype=torch.int32, device=device), B, L, num_parts, overhead,
                                     torch.device(device))
    seq, lo, hi, slot0, pieces = _pieces(sched, B, num_parts)
    units = sum(-(-n // 64) + overhead for n in clamped if n)
    T = max(-(-units // num_parts), 1)
    used = set()
    for b, n in enumerate(clamped):
        mine = list(range(slot0[b], slot0[b] + pieces[b]))
        assert not used & set(mine)
        used |= set(mine)
        assert all(seq[s] == b for s in mine)
        covered = [(lo[s], hi[s]) for s in mine]
        assert [k for piece in covered for k in piece][1:-1:2] == [k for piece in covered for k in piece][2::2]
        if n:
            assert covered[0][0] == 0 and covered[-1][1] == n and all(a < z and a % 64 == 0 for a, z in covered)
            assert all(-(-(z - a) // 64) <= T for a, z in covered)  # no piece larger than a part
        else:
            assert covered == []
    for s in set(range(B + num_parts - 1)) - used:  # unused slots: no keys
        assert lo[s] == hi[s] == 0 and seq[s] == 0
    assert max(pieces) <= num_parts


@pytest.mark.parametrize("dtype", DTYPES)
def test_any_number_of_parts_gives_the_same_attention(dtype, device):
    """1 part (each sequence in one piece, written directly), several (split sequences, merged by
    the combine kernel), more parts than key blocks: all within the derived bound."""
    B, L, H, S, Dk, v_dim = 3, 300, 4, 2, 40, 32
    q, kv = inputs(B, L, H, S, Dk, dtype, device)
    lens = torch.tensor([300, 2, 129], dtype=torch.int32, device=device)
    for parts in (1, 3, 20):
        o = mla_decode.launch(q, kv, Dk**-0.5, v_dim=v_dim, cache_seqlens=lens, config={"num_parts": parts},
                              out=nan_empty((B, S, H, v_dim), dtype, device))
        check(o, q, kv, Dk**-0.5, v_dim, name=f"{parts} parts", cache_seqlens=lens)


def test_num_parts_rule():
    """Shapes only: parts × head tiles fill every SM's resident CTAs, never more parts than
    64-key blocks in the cache."""
    F = FLASHMLA_DECODE
    for L in F["cache_len"]:
        for H in F["heads"]:
            for S in F["q_tokens"]:
                choice = config_for(S * H, torch.bfloat16, False)
                tiles = -(-S * H // choice.block_h)
                parts = num_parts_for(F["batch"], tiles, L, 132, choice.ctas_per_sm)
                assert choice.ctas_per_sm * 132 - tiles < parts * tiles <= choice.ctas_per_sm * 132
    assert num_parts_for(1, 1, 64, 132, 4) == 1  # one block of keys
    assert num_parts_for(2, 1, 8192, 132, 4) == 256  # capped: 2 · 128 key blocks
    assert num_parts_for(8, 1, 8192, 132, 4) == 528  # 4 CTAs on each of 132 SMs
    assert num_parts_for(128, 2, 4096, 132, 1) == 66
    for B in (1, 3, 64):
        for L in (1, 129, 100000):
            assert 1 <= num_parts_for(B, 1, L, 132, 4) <= B * -(-L // 64)


def test_configs_cover_every_kind():
    for dtype, fp8 in ((torch.bfloat16, False), (torch.float16, False), (torch.float32, False),
                       (torch.bfloat16, True)):
        for rows in (1, 16, 17, 32, 33, 256):
            c = config_for(rows, dtype, fp8)
            assert c in CONFIGS and PAGE_ALIGN % c.block_n == 0 and c.ctas_per_sm >= 1


# ----------------------------------------------------------------------------- lengths
def _ragged(B, L, H, S, Dk, dtype, device, lens):
    """q, a fixed-size cache buffer whose slots past each sequence's length hold NaN (never read),
    and the lengths as an int32 tensor."""
    q, kv = inputs(B, L, H, S, Dk, dtype, device)
    for b, n in enumerate(lens):
        kv[b, n:] = float("nan")
    return q, kv, torch.tensor(lens, dtype=torch.int32, device=device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_parts", [1, 5])
def test_cache_seqlens_attend_to_each_sequences_prefix(num_parts, dtype, device):
    """Each sequence b sees its first cache_seqlens[b] keys; the rest of the buffer is never read (NaN)."""
    B, L, H, S, Dk, v_dim = 4, 300, 3, 2, 40, 32
    lens = [2, 45, 300, 129]  # S (only the new tokens), mid-block, the whole buffer, a block boundary + 1
    q, kv, seqlens = _ragged(B, L, H, S, Dk, dtype, device, lens)
    scale = Dk**-0.5
    o = mla_decode.launch(q, kv, scale, v_dim=v_dim, cache_seqlens=seqlens, config={"num_parts": num_parts},
                          out=nan_empty((B, S, H, v_dim), dtype, device))
    for b, n in enumerate(lens):
        check(o[b:b + 1], q[b:b + 1], kv[b:b + 1, :n], scale, v_dim, name=f"sequence {b} ({n} keys)")


def test_cache_seqlens_public_op_int64_and_validation(device):
    B, L, H, S, Dk, v_dim = 2, 20, 2, 1, 40, 32
    q, kv, seqlens = _ragged(B, L, H, S, Dk, torch.bfloat16, device, [7, 20])
    o = mla_decode(q, kv, 0.2, v_dim=v_dim, cache_seqlens=seqlens.long(), validate=True)
    for b, n in enumerate((7, 20)):
        check(o[b:b + 1], q[b:b + 1], kv[b:b + 1, :n], 0.2, v_dim)
    for bad in ([0, 20], [7, 21]):  # fewer keys than new tokens; past the buffer
        with pytest.raises(ValueError, match="cache_seqlens: expected lengths in"):
            mla_decode(q, kv, 0.2, v_dim=v_dim, cache_seqlens=torch.tensor(bad, device=device), validate=True)


def test_cache_seqlens_out_of_range_never_read_out_of_bounds(device):
    """Without validation, lengths are clamped into [0, L]: a row that sees no key gets zeros
    (lse -inf), a length past the buffer reads the whole buffer (and no further)."""
    B, L, H, S, Dk, v_dim = 3, 12, 2, 2, 40, 32
    q, kv = inputs(B, L, H, S, Dk, torch.float32, device)
    lens = torch.tensor([-5, 1, 1000], dtype=torch.int32, device=device)
    for parts in (1, 2):
        o, lse = mla_decode.launch(q, kv, 0.3, v_dim=v_dim, cache_seqlens=lens, return_lse=True,
                                   config={"num_parts": parts},
                                   out=(nan_empty((B, S, H, v_dim), torch.float32, device),
                                        nan_empty((B, S, H), torch.float32, device)))
        # the documented rule: the reference clamps the same way
        ref_o, ref_lse = reference.mla_decode(q, kv, 0.3, v_dim=v_dim, cache_seqlens=lens, return_lse=True)
        torch.testing.assert_close(o, ref_o)
        torch.testing.assert_close(lse, ref_lse)
        assert torch.count_nonzero(o[0]) == 0 and (lse[0] == -math.inf).all()  # no key at all
        assert torch.count_nonzero(o[1, 0]) == 0 and (lse[1, 0] == -math.inf).all()  # token 0 of a 1-key sequence
        check(o[1:2, 1:], q[1:2, 1:], kv[1:2, :1], 0.3, v_dim, name="the one key")
        check(o[2:], q[2:], kv[2:], 0.3, v_dim, name="clamped to L")


# ----------------------------------------------------------------------------- the paged cache
def _paged(B, max_blocks, num_pages, H, S, Dk, dtype, device, lens, shared=True):
    """q, a page pool whose pages sequences use in random order (NaN in every page no sequence
    uses, and in the rows past each sequence's length), the block table (int32) and the lengths.
    With ``shared``, sequence 1's first page is sequence 0's second (a shared prefix page)."""
    P = PAGE_ALIGN
    q = torch.randn(B, S, H, Dk, dtype=dtype, device=device)
    pool = torch.full((num_pages, P, Dk), float("nan"), dtype=dtype, device=device)
    table = torch.randperm(num_pages)[:B * max_blocks].view(B, max_blocks).to(torch.int32)
    if shared:
        table[1, 0] = table[0, 1]
    for b, n in enumerate(lens):
        for j in range(-(-n // P)):
            rows = min(P, n - j * P)
            page = int(table[b, j])
            if torch.isnan(pool[page, :rows].float()).any():
                pool[page, :rows] = torch.randn(rows, Dk, dtype=dtype, device=device)
    return q, pool, table.to(device), torch.tensor(lens, dtype=torch.int32, device=device)


def _gather(pool, table):
    """The contiguous cache (B, max_blocks·P, Dk) the block table describes (valid ids only)."""
    return pool[table.long()].flatten(1, 2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_matches_the_contiguous_cache(dtype, device):
    """Pages in random order, a page shared by two sequences, unused pages and slots NaN, ragged
    lengths (a full table, one key, one page + 1): the same attention as the gathered cache."""
    B, max_blocks, num_pages, H, S, Dk, v_dim = 3, 3, 12, 4, 2, 40, 32
    lens = [192, 2, 65]
    q, pool, table, seqlens = _paged(B, max_blocks, num_pages, H, S, Dk, dtype, device, lens)
    scale = Dk**-0.5
    o = mla_decode.launch(q, pool, scale, v_dim=v_dim, cache_seqlens=seqlens, block_table=table,
                          config={"num_parts": 4}, out=nan_empty((B, S, H, v_dim), dtype, device))
    check(o, q, pool, scale, v_dim, cache_seqlens=seqlens, block_table=table)
    flat = _gather(pool, table)
    for b, n in enumerate(lens):
        check(o[b:b + 1], q[b:b + 1], flat[b:b + 1, :n], scale, v_dim, name=f"sequence {b} ({n} keys)")


def test_paged_out_of_range_page_ids(device):
    """A page id outside [0, NP) holds no key (never read): its keys are skipped, as the reference
    does; ids past a sequence's used blocks are ignored even by validate=True, used ones raise."""
    B, max_blocks, num_pages, H, S, Dk, v_dim = 2, 3, 8, 2, 1, 40, 32
    lens = [192, 100]
    q, pool, table, seqlens = _paged(B, max_blocks, num_pages, H, S, Dk, torch.float32, device, lens, shared=False)
    good_table = table.clone()
    table[0, 1] = num_pages  # used, past the pool
    table[1, 0] = -7  # used, negative
    table[1, 2] = 10**9  # past sequence 1's length: never read
    o, lse = mla_decode(q, pool, 0.2, v_dim=v_dim, cache_seqlens=seqlens, block_table=table, return_lse=True)
    ref_o, ref_lse = reference.mla_decode(q, pool, 0.2, v_dim=v_dim, cache_seqlens=seqlens, block_table=table,
                                          return_lse=True)
    torch.testing.assert_close(o, ref_o)
    torch.testing.assert_close(lse, ref_lse)
    good = pool[table[0, [0, 2]].long()].flatten(0, 1)[None]  # sequence 0 without its second page
    check(o[:1], q[:1], good, 0.2, v_dim, name="sequence 0 without the bad page")
    good = pool[table[1, 1].long(), :100 - 64][None]  # sequence 1: the second page's 36 keys
    check(o[1:], q[1:], good, 0.2, v_dim, name="sequence 1 without the bad page")
    with pytest.raises(ValueError, match=r"block_table: expected page ids in \[0, 8\).*got 8 at \[0, 1\]"):
        mla_decode(q, pool, 0.2, v_dim=v_dim, cache_seqlens=seqlens, block_table=table, validate=True)
    table[0, 1], table[1, 0] = good_table[0, 1], good_table[1, 0]
    o = mla_decode(q, pool, 0.2, v_dim=v_dim, cache_seqlens=seqlens, block_table=table, validate=True)  # [1, 2] unused
    check(o, q, pool, 0.2, v_dim, cache_seqlens=seqlens, block_table=good_table)


def test_paged_without_seqlens_reads_every_block(device):
    B, max_blocks, num_pages, H, S, Dk, v_dim = 2, 2, 5, 2, 2, 40, 32
    q, pool, table, _ = _paged(B, max_blocks, num_pages, H, S, Dk, torch.bfloat16, device, [128, 128], shared=False)
    o = mla_decode(q, pool, 0.2, v_dim=v_dim, block_table=table)
    check(o, q, _gather(pool, table), 0.2, v_dim)


# ----------------------------------------------------------------------------- the FP8 cache
def _quant_error_bound(q, keys, keys8, scale, v_dim, lens):
    """How far the FP8 cache can move the attention output, from its quantization error
    δ = dequant(quant(k)) - k: per query row, |Δo| <= max_t |δv_t| + max_t |v_t| · (e^(2Δ) - 1)
    with Δ = max_t |scale · q · δk_t| over the keys the row sees (softmax's ratio bound)."""
    B, S, H, _ = q.shape
    d = (keys8.double() - keys.double())
    bound = torch.zeros(B, S, H, dtype=torch.float64)
    for b in range(B):
        n = int(lens[b])
        for i in range(S):
            seen = slice(0, n - S + i + 1)
            shift = (scale * q[b, i].double() @ d[b, seen].T).abs().amax(-1)  # (H,)
            bound[b, i] = d[b, seen, :v_dim].abs().max() + keys[b, seen, :v_dim].double().abs().max() * (
                torch.expm1(2 * shift))
    return bound


@pytest.mark.parametrize("v_dim", [128, 256])
def test_fp8_cache(v_dim, device):
    """FlashMLA's FP8 rows, ragged, NaN past the lengths: near-exact against the reference on the
    dequantized cache (its own bf16 error bound), and against the unquantized bf16 cache within
    the bound the quantization error gives."""
    B, L, H, S, R = 3, 200, 4, 2, 64
    Dk = v_dim + R
    lens = [200, 70, 2]
    q, keys = inputs(B, L, H, S, Dk, torch.bfloat16, device)
    keys8 = quant_latent(keys, v_dim)
    for b, n in enumerate(lens):
        keys8.view(torch.uint8)[b, n:] = 0x7F  # NaN bytes (values and scales) past the lengths
    assert keys8.shape[-1] == v_dim + 4 * v_dim // 128 + 2 * R
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    scale = Dk**-0.5
    o = mla_decode.launch(q, keys8, scale, v_dim=v_dim, cache_seqlens=seqlens,
                          out=nan_empty((B, S, H, v_dim), torch.bfloat16, device))
    check(o, q, keys8, scale, v_dim, cache_seqlens=seqlens)
    deq = dequant_latent(keys8, v_dim)
    exact = reference.mla_decode(q.double(), keys.double(), scale, v_dim=v_dim, cache_seqlens=seqlens)
    _, own = truths(q, keys8, scale, v_dim, cache_seqlens=seqlens)
    own_err = (own.double() - reference.mla_decode(q.double(), deq.double(), scale, v_dim=v_dim,
                                                   cache_seqlens=seqlens)).abs().amax()
    bound = _quant_error_bound(q.cpu(), keys.cpu(), deq.cpu(), scale, v_dim, lens) + 2 * own_err.cpu()
    err = (o.double() - exact).abs().amax(-1).cpu()
    assert (err <= bound).all(), f"FP8 vs bf16 cache: max error {err.max():.4g}, bound {bound[err > bound]}"
    assert bound.max() < exact.abs().max(), "the quantization bound says nothing"


def test_fp8_paged_cache(device):
    B, max_blocks, num_pages, H, S, v_dim = 2, 3, 9, 3, 1, 128
    Dk = v_dim + 64
    q, pool, table, seqlens = _paged(B, max_blocks, num_pages, H, S, Dk, torch.bfloat16, device, [130, 64])
    pool8 = quant_latent(torch.nan_to_num(pool), v_dim)
    pool8.view(torch.uint8)[torch.isnan(pool[..., 0])] = 0x7F  # unused rows: NaN bytes
    o, lse = mla_decode(q, pool8, 0.1, v_dim=v_dim, cache_seqlens=seqlens, block_table=table, return_lse=True)
    check(o, q, pool8, 0.1, v_dim, cache_seqlens=seqlens, block_table=table)
    hi, lo = truths(q, pool8, 0.1, v_dim, cache_seqlens=seqlens, block_table=table, return_lse=True)
    assert_close_derived(lse, hi[1], lo[1], name="lse")


# ----------------------------------------------------------------------------- log-sum-exp
@pytest.mark.parametrize("dtype", DTYPES)
def test_lse_and_merging_two_chunks(dtype, device):
    """lse is log Σ exp(scale · q·k) (natural log, float32) over the keys each row sees; attention
    over a cache cut in two halves, merged with the lse weights (what chunked prefill and
    speculative steps do with FlashMLA's lse), equals attention over the whole."""
    B, L, H, S, Dk, v_dim = 2, 150, 4, 1, 40, 32
    q, kv = inputs(B, L, H, S, Dk, dtype, device)
    scale = Dk**-0.5
    o, lse = mla_decode.launch(q, kv, scale, v_dim=v_dim, return_lse=True, config={"num_parts": 3},
                               out=(nan_empty((B, S, H, v_dim), dtype, device), nan_empty((B, S, H), torch.float32,
                                                                                          device)))
    assert lse.dtype == torch.float32
    ref_hi, ref_lo = truths(q, kv, scale, v_dim, return_lse=True)
    assert_close_derived(lse, ref_hi[1], ref_lo[1], factor=2.0, name="lse")
    check(o, q, kv, scale, v_dim)
    halves = [mla_decode(q, kv[:, :100], scale, v_dim=v_dim, return_lse=True),
              mla_decode(q, kv[:, 100:], scale, v_dim=v_dim, return_lse=True)]
    m = torch.maximum(halves[0][1], halves[1][1])
    w = [torch.exp(h[1] - m) for h in halves]
    merged = sum(wi[..., None] * h[0].float() for wi, h in zip(w, halves, strict=True)) / sum(w)[..., None]
    assert_close_derived(merged.to(dtype), ref_hi[0], ref_lo[0], factor=4.0, name="merged halves")
    torch.testing.assert_close(m + torch.log(sum(w)), lse, rtol=0, atol=2e-5)


# ----------------------------------------------------------------------------- errors, compile
def test_input_errors(device):
    q, kv = inputs(1, 4, 2, 1, 40, torch.bfloat16, device)
    with pytest.raises(ValueError, match="q:"):
        mla_decode(q[0], kv, 1.0, v_dim=32)
    with pytest.raises(ValueError, match="kv:"):
        mla_decode(q, kv[0], 1.0, v_dim=32)
    with pytest.raises(ValueError, match="kv:"):
        mla_decode(q, kv[..., :32], 1.0, v_dim=32)
    with pytest.raises(ValueError, match="kv:"):
        mla_decode(q, torch.cat([kv, kv]), 1.0, v_dim=32)  # batch mismatch
    with pytest.raises(TypeError, match="kv:"):
        mla_decode(q, kv.float(), 1.0, v_dim=32)
    with pytest.raises(TypeError, match="q:"):
        mla_decode(q.to(torch.int32), kv, 1.0, v_dim=32)
    with pytest.raises(ValueError, match="v_dim"):
        mla_decode(q, kv, 1.0, v_dim=41)
    with pytest.raises(ValueError, match="v_dim"):
        mla_decode(q, kv, 1.0, v_dim=0)
    with pytest.raises(TypeError, match="v_dim"):
        mla_decode(q, kv, 1.0, v_dim=32.0)
    with pytest.raises(TypeError, match="softmax_scale"):
        mla_decode(q, kv, None, v_dim=32)
    with pytest.raises(ValueError, match="S=5"):
        mla_decode(q.expand(1, 5, 2, 40), kv, 1.0, v_dim=32)
    with pytest.raises(ValueError, match="kv:"):
        mla_decode(q, kv.to("meta"), 1.0, v_dim=32)  # devices differ
    with pytest.raises(TypeError, match="return_lse"):
        mla_decode(q, kv, 1.0, v_dim=32, return_lse=1)
    with pytest.raises(ValueError, match="out:"):
        mla_decode.launch(q, kv, 1.0, v_dim=32, out=torch.empty(1, 1, 2, 40, dtype=q.dtype, device=device))
    with pytest.raises(TypeError, match="out: expected a tuple of 2"):
        mla_decode.launch(q, kv, 1.0, v_dim=32, return_lse=True, out=torch.empty(1, 1, 2, 32, dtype=q.dtype))
    with pytest.raises(ValueError, match="num_parts"):
        mla_decode.launch(q, kv, 1.0, v_dim=32, config={"num_parts": 0})
    import triton

    with pytest.raises(ValueError, match="config: expected BLOCK_H"):
        mla_decode.launch(q, kv, 1.0, v_dim=32, config={"config": triton.Config({"BLOCK_H": 16, "BLOCK_N": 128})})


def test_paged_and_fp8_errors(device):
    q, kv = inputs(2, 64, 2, 1, 192, torch.bfloat16, device)
    table = torch.zeros(2, 1, dtype=torch.int32, device=device)
    with pytest.raises(TypeError, match="block_table: expected dtype int32"):
        mla_decode(q, kv, 1.0, v_dim=128, block_table=table.long())
    with pytest.raises(ValueError, match=r"block_table: expected shape \(2, max_blocks\)"):
        mla_decode(q, kv, 1.0, v_dim=128, block_table=table[:1])
    with pytest.raises(ValueError, match="kv: the Triton mla_decode kernel takes pages of a multiple of 64"):
        mla_decode(q, kv[:, :32], 1.0, v_dim=128, block_table=table)
    reference.mla_decode(q, kv[:, :32], 1.0, v_dim=128, block_table=table)  # the reference takes any page size
    kv8 = quant_latent(kv, 128)
    with pytest.raises(TypeError, match="q: an FP8 cache .* takes bfloat16 queries"):
        mla_decode(q.half(), kv8, 1.0, v_dim=128)
    with pytest.raises(ValueError, match="v_dim: an FP8 cache needs a multiple of 128"):
        mla_decode(q, kv8[..., :-8], 1.0, v_dim=120)
    with pytest.raises(ValueError, match=r"kv: expected shape \(2, L, 260\)"):
        mla_decode(q, kv8[..., :-2], 1.0, v_dim=128)
    with pytest.raises(ValueError, match="kv: the Triton mla_decode kernel reads FP8 rows"):
        raw = kv8.view(torch.uint8)
        mla_decode(q, torch.cat([raw, raw[..., :2]], -1).view(torch.float8_e4m3fn)[..., :-2], 1.0, v_dim=128)
    with pytest.raises(ValueError, match="kv: the Triton mla_decode kernel reads FP8 rows 4-byte aligned"):
        shifted = torch.cat([raw, raw[..., :4]], -1).view(torch.float8_e4m3fn)[..., 2:-2]  # rows start 2 bytes in
        mla_decode(q, shifted, 1.0, v_dim=128)


def test_empty(device):
    q, kv = inputs(0, 4, 2, 1, 40, torch.bfloat16, device)
    assert mla_decode(q, kv, 1.0, v_dim=32).shape == (0, 1, 2, 32)
    q, kv = inputs(2, 4, 0, 1, 40, torch.bfloat16, device)
    o, lse = mla_decode(q, kv, 1.0, v_dim=32, return_lse=True)
    assert o.shape == (2, 1, 0, 32) and lse.shape == (2, 1, 0)


def test_opcheck_and_torch_compile(device):
    B, L, H, S, Dk, v_dim = 2, 64, 4, 2, 40, 32
    q, kv = inputs(B, L, H, S, Dk, torch.float32, device)
    lens = torch.tensor([5, 64], dtype=torch.int32, device=device)
    table = torch.tensor([[1], [0]], dtype=torch.int32, device=device)
    for args in ((q, kv, 0.2, 32, lens, None, False, False), (q, kv, 0.2, 32, None, table, True, False)):
        torch.library.opcheck(torch.ops.moela.mla_decode.default, args, test_utils=("test_schema", "test_faketensor"))
    q = q.bfloat16()
    kv8 = quant_latent(torch.randn(B, L, 192, dtype=torch.bfloat16, device=device), 128)
    q8 = torch.randn(B, S, H, 192, dtype=torch.bfloat16, device=device)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(q, kv, q8, kv8, lens, table):
        o = mla_decode(q, kv.bfloat16(), Dk**-0.5, v_dim=v_dim) * 2
        o8, lse = mla_decode(q8, kv8, 0.1, v_dim=128, cache_seqlens=lens, block_table=table, return_lse=True)
        return o, o8, lse

    got = f(q, kv, q8, kv8, lens, table)
    want = (mla_decode(q, kv.bfloat16(), Dk**-0.5, v_dim=v_dim) * 2,
            *mla_decode(q8, kv8, 0.1, v_dim=128, cache_seqlens=lens, block_table=table, return_lse=True))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


# ----------------------------------------------------------------------------- GPU
FLASHMLA = [
    pytest.param(FLASHMLA_DECODE["batch"], L, H, S, id=f"B{FLASHMLA_DECODE['batch']}-L{L}-H{H}-S{S}")
    for S in FLASHMLA_DECODE["q_tokens"] for H in FLASHMLA_DECODE["heads"] for L in FLASHMLA_DECODE["cache_len"]
] + [
    pytest.param(2, 8192, 128, 1, id="B2-L8192-H128-S1-split"),
    pytest.param(4, 4096, 16, 2, id="B4-L4096-H16-S2-split"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("B,L,H,S", FLASHMLA)
def test_flashmla_shapes(B, L, H, S, device):
    Dk, v_dim = FLASHMLA_DECODE["head_dim"], FLASHMLA_DECODE["v_dim"]
    q, kv = inputs(B, L, H, S, Dk, torch.bfloat16, device)
    out = nan_empty((B, S, H, v_dim), torch.bfloat16, device)
    check(mla_decode.launch(q, kv, Dk**-0.5, v_dim=v_dim, out=out), q, kv, Dk**-0.5, v_dim)


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_gpu_paged_ragged_in_one_cuda_graph(fp8):
    """FlashMLA's serving shape: a page pool, ragged lengths and the block table read on the
    device; one captured graph replays for new lengths; no host sync."""
    B, max_blocks, H, S = 8, 64, 16, 1
    Dk, v_dim = FLASHMLA_DECODE["head_dim"], FLASHMLA_DECODE["v_dim"]
    lens = [1, 100, 4096, 2000, 129, 3000, 64, 4095]
    q, pool, table, seqlens = _paged(B, max_blocks, B * max_blocks + 3, H, S, Dk, torch.bfloat16, "cuda", lens)
    kv = quant_latent(torch.nan_to_num(pool), v_dim) if fp8 else pool
    scale = Dk**-0.5
    o = mla_decode(q, kv, scale, v_dim=v_dim, cache_seqlens=seqlens, block_table=table)
    check(o, q, kv, scale, v_dim, cache_seqlens=seqlens, block_table=table)
    torch.cuda.set_sync_debug_mode("error")
    try:
        mla_decode(q, kv, scale, v_dim=v_dim, cache_seqlens=seqlens, block_table=table)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_o, static_lse = mla_decode(q, kv, scale, v_dim=v_dim, cache_seqlens=seqlens, block_table=table,
                                          return_lse=True)
    shorter = torch.tensor([1, 50, 4000, 1, 128, 2999, 64, 2048], dtype=torch.int32)
    seqlens.copy_(shorter)
    graph.replay()
    check(static_o, q, kv, scale, v_dim, cache_seqlens=seqlens, block_table=table, name="replayed")
