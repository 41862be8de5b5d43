"""moela.kernels.mla_decode against moela.reference.mla_decode in float64 (derived tolerances).

Legend: B batch, S new tokens, H heads, L cache length, Dk key width, Dv value width.
"""

from __future__ import annotations

import pytest
import torch
from moela_testing import assert_close_derived, nan_empty

from moela import reference
from moela.kernels.mla_decode import mla_decode, num_splits_for
from moela.profiling.shapes import FLASHMLA_DECODE


def attend(q: torch.Tensor, kv: torch.Tensor, scale: float, v_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """The reference at ``dtype``: float64 is the truth, the input dtype what torch itself makes."""
    return reference.mla_decode(q.to(dtype), kv.to(dtype), scale, v_dim=v_dim)


def check(o: torch.Tensor, q: torch.Tensor, kv: torch.Tensor, scale: float, v_dim: int, name: str = "o") -> None:
    ref_hi = attend(q, kv, scale, v_dim, torch.float64)
    ref_lo = attend(q, kv, scale, v_dim, q.dtype)
    assert o.dtype == q.dtype and o.shape == ref_hi.shape
    assert_close_derived(o, ref_hi, ref_lo, factor=2.0, name=name)


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


@pytest.mark.parametrize("dtype", DTYPES)
def test_split_k(dtype, device):
    """Flash-decoding splits (combine kernel) agree with one pass: both within the derived bound."""
    B, L, H, S, Dk, v_dim = 2, 300, 4, 2, 40, 32
    q, kv = inputs(B, L, H, S, Dk, dtype, device)
    scale = Dk**-0.5
    one = mla_decode.launch(q, kv, scale, v_dim=v_dim, config={"num_splits": 1},
                            out=nan_empty((B, S, H, v_dim), dtype, device))
    three = mla_decode.launch(q, kv, scale, v_dim=v_dim, config={"num_splits": 3},
                              out=nan_empty((B, S, H, v_dim), dtype, device))
    check(one, q, kv, scale, v_dim, name="1 split")
    check(three, q, kv, scale, v_dim, name="3 splits")
    # the default splits these 2 tiles over the 300 keys
    assert num_splits_for(B, S * H, L) == 3
    check(mla_decode(q, kv, scale, v_dim=v_dim), q, kv, scale, v_dim, name="default")


def _ragged(B, L, H, S, Dk, dtype, device, lens):
    """q, a fixed-size cache buffer whose slots past each sequence's length hold NaN (never read),
    and the lengths as an int32 tensor."""
    q, kv = inputs(B, L, H, S, Dk, dtype, device)
    for b, n in enumerate(lens):
        kv[b, n:] = float("nan")
    return q, kv, torch.tensor(lens, dtype=torch.int32, device=device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_cache_seqlens_attend_to_each_sequences_prefix(num_splits, dtype, device):
    """Each sequence b sees its first cache_seqlens[b] keys; the rest of the buffer is never read
    (NaN there); the splits come from the buffer's length, so trailing splits are empty."""
    B, L, H, S, Dk, v_dim = 4, 300, 3, 2, 40, 32
    lens = [2, 45, 300, 129]  # S (only the new tokens), mid-split, the whole buffer, a split boundary
    q, kv, seqlens = _ragged(B, L, H, S, Dk, dtype, device, lens)
    scale = Dk**-0.5
    o = mla_decode.launch(q, kv, scale, v_dim=v_dim, cache_seqlens=seqlens, config={"num_splits": num_splits},
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
    """Without validation, lengths are clamped into [0, L]: a row that sees no key gets zeros,
    a length past the buffer reads the whole buffer (and no further)."""
    B, L, H, S, Dk, v_dim = 3, 12, 2, 2, 40, 32
    q, kv = inputs(B, L, H, S, Dk, torch.float32, device)
    lens = torch.tensor([-5, 1, 1000], dtype=torch.int32, device=device)
    for splits in (1, 2):
        o = mla_decode.launch(q, kv, 0.3, v_dim=v_dim, cache_seqlens=lens, config={"num_splits": splits},
                              out=nan_empty((B, S, H, v_dim), torch.float32, device))
        # the documented rule: the reference clamps the same way
        torch.testing.assert_close(o, reference.mla_decode(q, kv, 0.3, v_dim=v_dim, cache_seqlens=lens))
        assert torch.count_nonzero(o[0]) == 0  # no key at all
        assert torch.count_nonzero(o[1, 0]) == 0  # token 0 of a 1-key sequence sees nothing
        check(o[1:2, 1:], q[1:2, 1:], kv[1:2, :1], 0.3, v_dim, name="the one key")
        check(o[2:], q[2:], kv[2:], 0.3, v_dim, name="clamped to L")


def test_cache_seqlens_opcheck(device):
    q, kv, seqlens = _ragged(2, 9, 2, 1, 40, torch.float32, device, [4, 9])
    kv = torch.nan_to_num(kv)  # opcheck compares runs: no NaN outputs wanted, slots past ends are unread anyway
    torch.library.opcheck(torch.ops.moela.mla_decode.default, (q, kv, 0.2, 32, seqlens, False),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.moela.mla_decode.default, (q, kv, 0.2, 32, None, False),
                          test_utils=("test_schema", "test_faketensor"))


def test_cache_seqlens_errors(device):
    q, kv = inputs(2, 4, 2, 1, 40, torch.bfloat16, device)
    with pytest.raises(TypeError, match="cache_seqlens"):
        mla_decode(q, kv, 1.0, v_dim=32, cache_seqlens=torch.ones(2, device=device))
    with pytest.raises(ValueError, match="cache_seqlens"):
        mla_decode(q, kv, 1.0, v_dim=32, cache_seqlens=torch.ones(3, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="cache_seqlens"):
        mla_decode(q, kv, 1.0, v_dim=32, cache_seqlens=torch.ones(2, dtype=torch.int32, device="meta"))
    with pytest.raises(TypeError, match="cache_seqlens"):
        mla_decode(q, kv, 1.0, v_dim=32, cache_seqlens=[4, 4])


def test_split_heuristic_invariants():
    """Shapes only; no split when the tiles fill the SMs or the cache is short; bounded."""
    F = FLASHMLA_DECODE
    for L in F["cache_len"]:
        for H in F["heads"]:
            for S in F["q_tokens"]:
                assert num_splits_for(F["batch"], S * H, L) == 1  # >= 128 tiles on 132 SMs
    assert num_splits_for(1, 16, 64) == 1  # one block of keys
    assert num_splits_for(1, 16, 8192) == 64  # one tile: cap
    assert num_splits_for(16, 32, 8192) == 8  # 128 tiles: 97% of a wave
    for B in (1, 3, 7, 64):
        for L in (1, 129, 4096, 100000):
            s = num_splits_for(B, 128, L)
            assert 1 <= s <= min(64, -(-L // 128))


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
    with pytest.raises(ValueError, match="out:"):
        mla_decode.launch(q, kv, 1.0, v_dim=32, out=torch.empty(1, 1, 2, 40, dtype=q.dtype, device=device))
    with pytest.raises(ValueError, match="num_splits"):
        mla_decode.launch(q, kv, 1.0, v_dim=32, config={"num_splits": 0})


def test_empty(device):
    q, kv = inputs(0, 4, 2, 1, 40, torch.bfloat16, device)
    assert mla_decode(q, kv, 1.0, v_dim=32).shape == (0, 1, 2, 32)
    q, kv = inputs(2, 4, 0, 1, 40, torch.bfloat16, device)
    assert mla_decode(q, kv, 1.0, v_dim=32).shape == (2, 1, 0, 32)


def test_torch_compile(device):
    B, L, H, S, Dk, v_dim = 2, 17, 4, 2, 40, 32
    q, kv = inputs(B, L, H, S, Dk, torch.bfloat16, device)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(q, kv):
        return mla_decode(q, kv, Dk**-0.5, v_dim=v_dim) * 2

    torch.testing.assert_close(f(q, kv), mla_decode(q, kv, Dk**-0.5, v_dim=v_dim) * 2, rtol=0, atol=0)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def g(q, kv, lens):
        return mla_decode(q, kv, Dk**-0.5, v_dim=v_dim, cache_seqlens=lens)

    lens = torch.tensor([5, 17], dtype=torch.int32, device=device)
    torch.testing.assert_close(g(q, kv, lens), mla_decode(q, kv, Dk**-0.5, v_dim=v_dim, cache_seqlens=lens),
                               rtol=0, atol=0)


FLASHMLA = [
    pytest.param(FLASHMLA_DECODE["batch"], L, H, S, id=f"B{FLASHMLA_DECODE['batch']}-L{L}-H{H}-S{S}")
    for S in FLASHMLA_DECODE["q_tokens"] for H in FLASHMLA_DECODE["heads"] for L in FLASHMLA_DECODE["cache_len"]
] + [
    pytest.param(2, 8192, 128, 1, id="B2-L8192-H128-S1-split"),  # 4 tiles: 29 splits
    pytest.param(4, 4096, 16, 2, id="B4-L4096-H16-S2-split"),  # 4 tiles: 29 splits
]


@pytest.mark.gpu
@pytest.mark.parametrize("B,L,H,S", FLASHMLA)
def test_flashmla_shapes(B, L, H, S, device):
    Dk, v_dim = FLASHMLA_DECODE["head_dim"], FLASHMLA_DECODE["v_dim"]
    q, kv = inputs(B, L, H, S, Dk, torch.bfloat16, device)
    out = nan_empty((B, S, H, v_dim), torch.bfloat16, device)
    check(mla_decode.launch(q, kv, Dk**-0.5, v_dim=v_dim, out=out), q, kv, Dk**-0.5, v_dim)


@pytest.mark.gpu
def test_gpu_cache_seqlens_in_one_cuda_graph():
    """FlashMLA's serving shape: a fixed cache buffer, ragged lengths read on the device; one
    captured graph replays for new lengths; no host sync."""
    B, L, H, S = 8, 4096, 16, 1
    Dk, v_dim = FLASHMLA_DECODE["head_dim"], FLASHMLA_DECODE["v_dim"]
    lens = [1, 100, 4096, 2000, 129, 3000, 64, 4095]
    q, kv, seqlens = _ragged(B, L, H, S, Dk, torch.bfloat16, "cuda", lens)
    scale = Dk**-0.5
    o = mla_decode(q, kv, scale, v_dim=v_dim, cache_seqlens=seqlens)  # autotuning happens here, eagerly
    for b, n in enumerate(lens):
        check(o[b:b + 1], q[b:b + 1], kv[b:b + 1, :n], scale, v_dim, name=f"sequence {b}")
    torch.cuda.set_sync_debug_mode("error")
    try:
        mla_decode(q, kv, scale, v_dim=v_dim, cache_seqlens=seqlens)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_o = mla_decode(q, kv, scale, v_dim=v_dim, cache_seqlens=seqlens)
    shorter = [1, 50, 4000, 1, 128, 2999, 64, 2048]  # within the NaN-free prefixes
    seqlens.copy_(torch.tensor(shorter, dtype=torch.int32))
    graph.replay()
    for b, n in enumerate(shorter):
        check(static_o[b:b + 1], q[b:b + 1], kv[b:b + 1, :n], scale, v_dim, name=f"replayed sequence {b}")
