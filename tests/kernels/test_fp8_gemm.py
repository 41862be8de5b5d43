"""kernels.fp8_gemm: the block-scaled FP8 GEMM against reference.fp8_gemm (emulated, float32 per block).

Near exact: within the bound derived in tests/fp8_testing.py (summation order of one 128-deep
block, one scale rounding, the final cast). Against the bf16 product of the unquantized inputs:
DeepGEMM's calc_diff < 1e-3. CPU: the interpreter at small shapes, both paths of the rule
``fp8_mainloop.fp8_path`` (the Hopper tensor-descriptor kernel, persistent over 3 "SMs" so each
program walks several tiles, and the pointer kernel for pre-Hopper GPUs), the default config of
each M class and explicit configs for the other code paths (BLOCK_N > block reads a vector of
weight scales, BLOCK_M = 16, the warp-specialised schedule, an odd number of K blocks). Split-K
(the decode configs of the Hopper kernel): near exact at ragged shapes and K splits without
blocks, the same bits whichever split arrives last, the counters back at 0 after each launch, and
the pruner's ranking (split-K first at decode M where column tiles are few, never at large M).
GPU tier: DeepGEMM's dense grid. The sm_90 compile of the Hopper configs: test_fp8_sm90.py.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import triton
from fp8_testing import PATHS, abs_fp8, assert_gemm_close, assert_same_bits, record_launches
from moela_testing import nan_empty

from moela import reference as ref
from moela.kernels._common import INTERPRETER_SMS, cdiv, m_bucket
from moela.kernels.fp8_gemm import fp8_gemm, fp8_gemm_tma_configs, launch_fp8_gemm, m_class
from moela.kernels.fp8_mainloop import HOPPER_SMS, fp8_path, split_chunk, tma_pruner, tma_ready, wave_cost
from moela.kernels.fp8_quant import FP8_DTYPE, quant_act, quant_weight, to_col_major
from moela.kernels.tl_helpers import SMEM_BUDGET

# the modules (moela.kernels.fp8_gemm is the op once the package exports it)
factory = importlib.import_module("moela.kernels.factory")
fp8_gemm_module = importlib.import_module("moela.kernels.fp8_gemm")
fp8_mainloop = importlib.import_module("moela.kernels.fp8_mainloop")

try:
    from moela.profiling.shapes import DEEPGEMM_DENSE
except ImportError:  # the shapes registry is optional for the kernel tests (DeepGEMM's grid)
    DEEPGEMM_DENSE = {"m": (64, 128, 4096), "nk": ((2112, 7168), (24576, 1536), (32768, 512), (7168, 16384),
                                                   (4096, 7168), (7168, 2048))}


def _operands(M, N, K, device, block=128, dtype=torch.bfloat16):
    """Quantized random operands (unquantized x, w kept for calc_diff)."""
    x = torch.randn(M, K, device=device, dtype=dtype)
    w = (torch.randn(N, K, device=device) * K**-0.5).to(dtype)
    a, a_s = ref.quant_act(x, block)
    b, b_s = ref.quant_weight(w, block)
    return x, w, a, a_s, b, b_s


def _check(out, a, a_s, b, b_s, block=128, name="out", num_kb=None):
    """Near exact against the reference; ``num_kb``: the K-block count the bound charges (default Kb)."""
    ref32 = ref.fp8_gemm(a, a_s, b, b_s, torch.float32, block)
    mag = ref.fp8_gemm(abs_fp8(a), a_s.abs(), abs_fp8(b), b_s.abs(), torch.float32, block)
    assert_gemm_close(out, ref32, mag, a.shape[1] // block if num_kb is None else num_kb, block, name)


# (M, N, K): one per M class at the class edges, N not a multiple of the tile (masked), K several blocks.
SHAPES = {
    "decode-M1": (1, 128, 256),
    "small-ragged-N": (5, 200, 384),
    "small-edge-M64": (64, 96, 256),
    "medium-M65": (65, 64, 256),
    "medium-M300": (300, 48, 128),
    "large-M520": (520, 40, 128),
}


@pytest.mark.parametrize("case", list(SHAPES))
def test_fp8_gemm_near_exact_against_reference(case, device):
    M, N, K = SHAPES[case]
    _, _, a, a_s, b, b_s = _operands(M, N, K, device)
    out = nan_empty((M, N), torch.float32, device)
    assert fp8_gemm.launch(a, a_s, b, b_s, torch.float32, out=out) is out
    _check(out, a, a_s, b, b_s)


@pytest.mark.parametrize("case", ["decode-M1", "small-ragged-N", "medium-M65", "large-M520"])
def test_fp8_gemm_pointer_path_near_exact(case, device):
    """The pre-Hopper path (the rule given sm_89) on the same shapes."""
    M, N, K = SHAPES[case]
    _, _, a, a_s, b, b_s = _operands(M, N, K, device)
    out = nan_empty((M, N), torch.float32, device)
    launch_fp8_gemm(out, a, a_s, b, b_s, 128, None, None, capability=PATHS["pointer"])
    _check(out, a, a_s, b, b_s)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fp8_gemm_16bit_outputs_and_column_major_scales(out_dtype, device):
    _, _, a, a_s, b, b_s = _operands(24, 160, 256, device)
    out = fp8_gemm(a, to_col_major(a_s), b, b_s, out_dtype)  # the public op
    assert out.dtype == out_dtype and out.shape == (24, 160)
    _check(out, a, a_s, b, b_s)


CONFIGS = {  # the code paths a single default config cannot reach: path, config, (M, N, K)
    "vector-b-scales": ("pointer", dict(BLOCK_M=16, BLOCK_N=256, GROUP_M=1, num_warps=4), (70, 200, 256)),
    "scalar-b-scales-32": ("pointer", dict(BLOCK_M=32, BLOCK_N=32, GROUP_M=2, num_warps=4), (70, 200, 256)),
    "tall-tiles": ("pointer", dict(BLOCK_M=64, BLOCK_N=16, GROUP_M=4, num_warps=4), (70, 100, 256)),
    "decode-16x16": ("pointer", dict(BLOCK_M=16, BLOCK_N=16, GROUP_M=1, num_warps=1, num_stages=8), (20, 72, 256)),
    "tma-vector-b-scales": ("tma", dict(BLOCK_M=64, BLOCK_N=256, GROUP_M=1, num_warps=4, num_stages=2), (70, 300, 256)),
    "tma-warp-specialized": ("tma", dict(BLOCK_M=128, BLOCK_N=64, WARP_SPECIALIZE=True, num_warps=4, num_stages=4),
                             (130, 72, 384)),
    "tma-decode-64x16-odd-kb": ("tma", dict(BLOCK_M=64, BLOCK_N=16, GROUP_M=2, num_warps=4, num_stages=8),
                                (3, 80, 640)),
}


@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_fp8_gemm_configs(cfg, device):
    path, config, (M, N, K) = CONFIGS[cfg]
    _, _, a, a_s, b, b_s = _operands(M, N, K, device)
    out = nan_empty((M, N), device=device)
    launch_fp8_gemm(out, a, a_s, b, b_s, 128, None, config, capability=PATHS[path])
    _check(out, a, a_s, b, b_s)


WS = dict(BLOCK_M=128, BLOCK_N=64, WARP_SPECIALIZE=True, num_warps=4, num_stages=4)


@pytest.mark.parametrize("K, padded", [(1536, False), (768, True)])
def test_fp8_gemm_warp_specialized_scales_through_descriptors(K, padded, monkeypatch, device):
    """Column-major activation scales (column stride padded to 16 bytes): the warp-specialised
    schedule reads both scales through descriptors (SCALE_TMA); two weight-scale rows (N > 128), a
    ragged M, Kb = 12 (the weight scale's (1, 4) box at columns 0, 4 and 8) or Kb = 6 with the
    weight scales a view of a NaN-padded (N/B, 8) buffer (the box at column 4 reaches past Kb:
    zero-filled, never the padding)."""
    M, N = 130, 200
    _, _, a, a_s, b, b_s = _operands(M, N, K, device)
    if padded:
        buf = torch.full((b_s.shape[0], 8), float("nan"), device=device)
        buf[:, :b_s.shape[1]] = b_s
        b_s = buf[:, :b_s.shape[1]]
    out = nan_empty((M, N), device=device)
    col = to_col_major(a_s)
    assert fp8_gemm_module.tma_launch_args(out, a, col, b, b_s, 128, None)[1]["SCALE_TMA"]
    assert not fp8_gemm_module.tma_launch_args(out, a, a_s, b, b_s, 128, None)[1]["SCALE_TMA"]  # row-major
    monkeypatch.setenv("MOELA_SCALE_TMA", "0")
    assert not fp8_gemm_module.tma_launch_args(out, a, col, b, b_s, 128, None)[1]["SCALE_TMA"]
    monkeypatch.delenv("MOELA_SCALE_TMA")
    launch_fp8_gemm(out, a, col, b, b_s, 128, None, WS, capability=PATHS["tma"])
    _check(out, a, a_s, b, b_s)


def test_fp8_gemm_wide_warp_specialized_config_keeps_pointer_scales(device):
    """An explicit warp-specialised config wider than a scale block (BLOCK_N = 256: two weight
    scales per K block) with column-major scales: the kernel keeps the pointer scale loads (the
    descriptors take one weight scale per tile) and computes the same product."""
    M, N, K = 130, 200, 512
    _, _, a, a_s, b, b_s = _operands(M, N, K, device)
    out = nan_empty((M, N), device=device)
    wide = dict(WS, BLOCK_N=256)
    launch_fp8_gemm(out, a, to_col_major(a_s), b, b_s, 128, None, wide, capability=PATHS["tma"])
    _check(out, a, a_s, b, b_s)


# ------------------------------------------------------------------------------------ split-K


def _split_num_kb(num_kb: int, split_k: int) -> int:
    """The K-block count the derived bound charges a split-K result: a split adds at most
    ``split_chunk`` promoted blocks, the reducer the split_k partials, so each element is at most
    chunk + split_k - 1 float32 additions deep (the reference: num_kb); the bound charges the
    deeper of the two twice."""
    return max(num_kb, split_chunk(num_kb, split_k) + split_k - 1)


SPLITS = {  # config, (M, N, K); split s takes K blocks [s·chunk, min((s+1)·chunk, Kb)), chunk = split_chunk
    # two row tiles (M not a multiple of 64), N not a multiple of 32; Kb = 5 over 4 splits: [0, 2) [2, 4)
    # [4, 5) [5, 5): an odd Kb, Kb not a multiple of SPLIT_K, a split without a K block
    "64x32-split4-ragged": (dict(BLOCK_M=64, BLOCK_N=32, SPLIT_K=4, num_warps=4, num_stages=3), (70, 80, 640)),
    "64x16-split2-decode-M1": (dict(BLOCK_M=64, BLOCK_N=16, SPLIT_K=2, GROUP_M=2, num_warps=4, num_stages=4),
                               (1, 72, 384)),  # Kb = 3: [0, 2) [2, 3)
    "64x64-split8-more-splits-than-blocks": (dict(BLOCK_M=64, BLOCK_N=64, SPLIT_K=8, num_warps=4, num_stages=2),
                                             (5, 64, 256)),  # Kb = 2: split 0 takes both, seven none
    "64x256-split2-vector-b-scales": (dict(BLOCK_M=64, BLOCK_N=256, SPLIT_K=2, num_warps=4, num_stages=2),
                                      (9, 300, 512)),  # BLOCK_N > the block: a weight scale per column block
}


def _split_buffers(device):
    """The launcher's cached (workspace, counters) of this device's current stream."""
    dev = torch.device(device)
    return fp8_gemm_module._SPLIT_K_BUFFERS[(dev, fp8_gemm_module._stream_of(dev))]


@pytest.mark.parametrize("case", list(SPLITS))
def test_fp8_gemm_split_k_near_exact(case, device):
    config, (M, N, K) = SPLITS[case]
    _, _, a, a_s, b, b_s = _operands(M, N, K, device)
    out = nan_empty((M, N), device=device)
    launch_fp8_gemm(out, a, a_s, b, b_s, 128, None, config, capability=PATHS["tma"])
    _check(out, a, a_s, b, b_s, num_kb=_split_num_kb(K // 128, config["SPLIT_K"]))
    assert not _split_buffers(device)[1].any()  # the counters are back at 0


def test_fp8_gemm_split_k_bound_catches_a_lost_split(device):
    """The bound the split-K tests use is tight enough to see a split whose partial the reduction
    lost (the reference without split 1's K blocks)."""
    config, (M, N, K) = SPLITS["64x32-split4-ragged"]
    _, _, a, a_s, b, b_s = _operands(M, N, K, device)
    chunk = split_chunk(K // 128, config["SPLIT_K"])
    lost = a.clone()
    lost.view(torch.uint8)[:, chunk * 128:2 * chunk * 128] = 0
    with pytest.raises(AssertionError, match="exceed the derived bound"):
        _check(ref.fp8_gemm(lost, a_s, b, b_s, torch.float32), a, a_s, b, b_s,
               num_kb=_split_num_kb(K // 128, config["SPLIT_K"]))


def test_fp8_gemm_split_k_same_bits_whichever_split_arrives_last(monkeypatch, device):
    """Launches in a row (the counters back at 0 after each) on persistent grids of 3, 3, 1, 2 and
    24 programs: a different split of a tile arrives last (3 programs: split 2 of tile 0, 1
    program: split 3), the reduction's order stays 0 .. SPLIT_K-1: the same bits. The workspace is
    NaN before each launch, so a partial read before it is written, or read from an earlier launch,
    shows."""
    config, (M, N, K) = SPLITS["64x32-split4-ragged"]
    _, _, a, a_s, b, b_s = _operands(M, N, K, device)
    outs = []
    for sms in (3, 3, 1, 2, 24):
        monkeypatch.setattr(fp8_gemm_module, "num_sms", lambda dev, sms=sms: sms)
        out = nan_empty((M, N), device=device)
        fp8_gemm_module.tma_launch_args(out, a, a_s, b, b_s, 128, None, config)  # the buffers exist ...
        ws, counters = _split_buffers(device)
        ws.fill_(float("nan"))  # ... and hold nothing a launch could reuse
        launch_fp8_gemm(out, a, a_s, b, b_s, 128, None, config, capability=PATHS["tma"])
        assert not counters.any(), sms
        outs.append(out)
    _check(outs[0], a, a_s, b, b_s, num_kb=_split_num_kb(K // 128, config["SPLIT_K"]))
    for out in outs[1:]:
        assert_same_bits(out, outs[0])


def test_fp8_gemm_split_k_bias_16bit_out_and_no_out_of_bounds_writes(device):
    config, (M, N, K) = SPLITS["64x32-split4-ragged"]
    _, _, a, a_s, b, b_s = _operands(M, N, K, device)
    guard = nan_empty((M + 4, N + 8), torch.bfloat16, device)
    out = guard[2:M + 2, 3:N + 3]  # a strided window: everything around it must stay NaN
    bias = torch.randn(N, device=device, dtype=torch.bfloat16)
    launch_fp8_gemm(out, a, a_s, b, b_s, 128, bias, config, capability=PATHS["tma"])
    inside = torch.zeros_like(guard, dtype=torch.bool)
    inside[2:M + 2, 3:N + 3] = True
    assert guard[~inside].isnan().all()
    ref32 = ref.fp8_gemm(a, a_s, b, b_s, torch.float32)
    mag = ref.fp8_gemm(abs_fp8(a), a_s.abs(), abs_fp8(b), b_s.abs(), torch.float32)
    extra = 2.0**-24 * (ref32.abs() + bias.abs().float()).double()  # the bias addition's rounding
    assert_gemm_close(out, ref32 + bias.float(), mag, _split_num_kb(K // 128, config["SPLIT_K"]), 128, "bias",
                      extra=extra)


def test_fp8_gemm_split_k_makes_no_buffers_while_capturing(monkeypatch, device):
    """Inside a CUDA-graph capture (pretended here) split_k_buffers makes and grows nothing (a
    zeroing there would only be recorded): with no buffers on the stream the launch gets
    placeholders and runs unsplit, exact; buffers made before the capture serve it, and the cache
    keeps only those."""
    config, (M, N, K) = SPLITS["64x32-split4-ragged"]
    _, _, a, a_s, b, b_s = _operands(M, N, K, device)
    dev = torch.device(device)
    key = (dev, fp8_gemm_module._stream_of(dev))
    monkeypatch.setattr(fp8_gemm_module, "_SPLIT_K_BUFFERS", {})
    monkeypatch.setattr(fp8_gemm_module, "_capturing", lambda d: True)
    ws, counters = fp8_gemm_module.split_k_buffers(dev, 10**6, 100)
    assert ws.numel() == 1 and counters.numel() == 1 and key not in fp8_gemm_module._SPLIT_K_BUFFERS
    out = nan_empty((M, N), device=device)
    launch_fp8_gemm(out, a, a_s, b, b_s, 128, None, config, capability=PATHS["tma"])
    _check(out, a, a_s, b, b_s)  # unsplit: the plain bound
    assert fp8_gemm_module._SPLIT_K_BUFFERS == {}
    monkeypatch.setattr(fp8_gemm_module, "_capturing", lambda d: False)
    before = fp8_gemm_module.split_k_buffers(dev, 4096, 16)  # made before the capture
    monkeypatch.setattr(fp8_gemm_module, "_capturing", lambda d: True)
    assert fp8_gemm_module.split_k_buffers(dev, 10**7, 10**5) == before  # too small: served as they are
    assert fp8_gemm_module._SPLIT_K_BUFFERS == {key: before}


def test_split_k_buffers_serve_every_m_of_a_bucket(monkeypatch, device):
    """The pruner ranks, and the launcher sizes the buffers, for M's power-of-two bucket (the
    autotune key): a split config chosen at the bucket's first M fits every M of the bucket, so
    no launch in it falls back to unsplit."""
    monkeypatch.setattr(fp8_mainloop, "ranking_sms", lambda dev: HOPPER_SMS)
    medium = fp8_gemm_tma_configs("medium")
    limit = fp8_gemm_module.SPLIT_K_WORKSPACE
    for N, K in ((2112, 7168), (4096, 7168)):
        kept = _pruned(medium, 257, N, K)  # the bucket of 512
        assert any(c.kwargs.get("SPLIT_K", 1) > 1 for c in kept), N
        ws, counters = fp8_gemm_module.split_k_need([c.kwargs for c in medium], m_bucket(257), N, limit)
        for M in (257, 449, 512):
            for c in kept:
                assert fp8_gemm_module._split_k_workspace(c.kwargs, M, N) <= ws, (N, M, c)
                assert cdiv(M, c.kwargs["BLOCK_M"]) * cdiv(N, c.kwargs["BLOCK_N"]) <= counters
    seen = []
    monkeypatch.setattr(fp8_gemm_module, "_class_need", lambda cls, M, N: seen.append((cls, M, N)) or (0, 0))
    _, _, a, a_s, b, b_s = _operands(257, 64, 128, device)
    fp8_gemm_module.tma_launch_args(torch.empty(257, 64, device=device), a, a_s, b, b_s, 128, None)
    assert seen == [("medium", 512, 64)]


def test_fp8_gemm_split_k_buffers_too_small_run_unsplit(monkeypatch, device):
    """Buffers smaller than a config needs (one the launcher did not size them for: a stale
    config table) are left alone: K runs unsplit, the result exact as ever."""
    config, (M, N, K) = SPLITS["64x32-split4-ragged"]
    _, _, a, a_s, b, b_s = _operands(M, N, K, device)
    ws = torch.full((64,), float("nan"), device=device)
    counters = torch.zeros(64, dtype=torch.int32, device=device)
    monkeypatch.setattr(fp8_gemm_module, "split_k_buffers", lambda dev, ws_elems, tiles: (ws, counters))
    out = nan_empty((M, N), device=device)
    launch_fp8_gemm(out, a, a_s, b, b_s, 128, None, config, capability=PATHS["tma"])
    _check(out, a, a_s, b, b_s)
    assert ws.isnan().all() and not counters.any()


def test_fp8_gemm_split_k_through_the_autotuner(monkeypatch, device):
    """An M class whose (autotuned) config splits K: the grid counts units, the buffers are sized
    from the class's configs (``split_k_need``)."""
    config, (M, N, K) = SPLITS["64x16-split2-decode-M1"]
    meta = {k: v for k, v in config.items() if not k.startswith("num_")}
    tuned = triton.Config({**meta, "WARP_SPECIALIZE": False, "STAGES": 4}, num_warps=4, num_stages=4)
    tuner = triton.autotune([tuned], key=["N"])(fp8_gemm_module._fp8_gemm_tma_kernel)
    monkeypatch.setitem(fp8_gemm_module._TMA_TUNED, "small", tuner)
    fp8_gemm_module._class_need.cache_clear()
    try:
        assert fp8_gemm_module._class_need("small", M, N) == (5 * 2 * 64 * 16, 5)  # 72 columns: 5 tiles of 16
        _, _, a, a_s, b, b_s = _operands(M, N, K, device)
        out = nan_empty((M, N), device=device)
        launch_fp8_gemm(out, a, a_s, b, b_s, 128, None, None, capability=PATHS["tma"])
        _check(out, a, a_s, b, b_s, num_kb=_split_num_kb(K // 128, 2))
    finally:
        fp8_gemm_module._class_need.cache_clear()


@pytest.mark.parametrize("bad", [dict(SPLIT_K=0), dict(SPLIT_K=17),
                                 dict(SPLIT_K=2, BLOCK_M=128, WARP_SPECIALIZE=True)])
def test_fp8_gemm_split_k_bad_configs_raise(bad, device):
    _, _, a, a_s, b, b_s = _operands(4, 64, 256, device)
    config = {**dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3), **bad}
    with pytest.raises(ValueError, match="config: SPLIT_K takes 1 to 16"):
        launch_fp8_gemm(nan_empty((4, 64), device=device), a, a_s, b, b_s, 128, None, config, capability=PATHS["tma"])


@pytest.mark.parametrize("num_kb", [1, 2, 3, 5, 12, 56, 57])
@pytest.mark.parametrize("split_k", [1, 2, 3, 4, 8])
def test_split_chunk_partitions_k(num_kb, split_k):
    """The splits' K ranges tile [0, Kb) in order; every range but the one ending at Kb is even."""
    chunk = split_chunk(num_kb, split_k)
    ranges = [(min(s * chunk, num_kb), min((s + 1) * chunk, num_kb)) for s in range(split_k)]
    assert ranges[0][0] == 0 and ranges[-1][1] == num_kb
    assert all(r[1] == n[0] for r, n in zip(ranges, ranges[1:], strict=False))
    assert all((hi - lo) % 2 == 0 for lo, hi in ranges if hi < num_kb)
    assert chunk * (split_k - 1) < num_kb + 2 * split_k  # no split count is wasted far past Kb


#: (N, K) pairs of DeepGEMM's dense grid where a decode M has few column tiles to spread over the
#: SMs: split-K's wider tiles read a fewer times. (32768, 512): thousands of tiles and a short K.
_SPLIT_FIRST = [(2112, 7168), (7168, 16384), (4096, 7168)]


def _ranked_first(configs, M, N, K):
    return _pruned(configs, M, N, K)[0].kwargs


def _pruned(configs, M, N, K):
    """What the Hopper kernel's pruner keeps (the workspace limit, then the wave model)."""
    prune = fp8_gemm_module._tma_prune(tma_pruner(fp8_gemm_module._dense_tiles, SMEM_BUDGET, "a_ptr"))
    return prune(configs, dict(M=M, N=N, K=K, M_BUCKET=m_bucket(M), a_ptr=torch.empty(0), SCALE_BLOCK=128))


@pytest.mark.parametrize("M", [1, 16, 64])
def test_pruner_ranks_split_k_first_at_decode(M, monkeypatch):
    """The wave model (132 SMs) puts a split-K config first at decode M where the column tiles
    are few, and not where there are thousands (N 32768, K 512)."""
    monkeypatch.setattr(fp8_mainloop, "ranking_sms", lambda dev: HOPPER_SMS)
    small = fp8_gemm_tma_configs("small")
    for N, K in _SPLIT_FIRST:
        assert _ranked_first(small, M, N, K).get("SPLIT_K", 1) > 1, (M, N, K)
    assert _ranked_first(small, M, 32768, 512).get("SPLIT_K", 1) == 1
    if M == 64:  # 64x2112x7168: 33 tiles of 64x64, split 4: 132 units, a read 33 times (64x16 tiles: 132)
        first = _ranked_first(small, M, 2112, 7168)
        assert (first["BLOCK_N"], first["SPLIT_K"]) == (64, 4)


def test_split_k_workspace_stays_within_its_limit(monkeypatch):
    """A split config whose float32 partials would exceed SPLIT_K_WORKSPACE at a shape is pruned
    there, and the buffers the launcher sizes for a class stay within the limit: at M = 64,
    N = 24576 splits of 2 fit and splits of 4 and 8 do not; a 129280-column vocabulary projection
    takes no split config at all; at N = 2112 nothing is cut."""
    monkeypatch.setattr(fp8_mainloop, "ranking_sms", lambda dev: HOPPER_SMS)
    limit = fp8_gemm_module.SPLIT_K_WORKSPACE
    small = fp8_gemm_tma_configs("small")
    kwargs = [c.kwargs for c in small]
    for N, K in ((24576, 1536), (129280, 7168)):
        kept = _pruned(small, 64, N, K)
        assert kept and all(fp8_gemm_module._split_k_workspace(c.kwargs, 64, N) <= limit for c in kept)
        assert fp8_gemm_module.split_k_need(kwargs, 64, N)[0] > limit  # what the limit cuts
    assert {c.kwargs.get("SPLIT_K", 1) for c in small
            if fp8_gemm_module._split_k_workspace(c.kwargs, 64, 24576) <= limit} == {1, 2}
    ws, counters = fp8_gemm_module.split_k_need(kwargs, 64, 24576, limit)
    assert 0 < ws <= limit and counters > 0
    assert fp8_gemm_module.split_k_need(kwargs, 64, 129280, limit) == (0, 0)
    assert fp8_gemm_module.split_k_need(kwargs, 64, 2112, limit) == fp8_gemm_module.split_k_need(kwargs, 64, 2112)


@pytest.mark.parametrize("M", [512, 4096])
def test_pruner_never_splits_k_at_large_m(M, monkeypatch):
    """Every Hopper config in one list, ranked at prefill M: the unsplit ones win at every DeepGEMM (N, K)."""
    monkeypatch.setattr(fp8_mainloop, "ranking_sms", lambda dev: HOPPER_SMS)
    every = [c for cls in ("small", "medium", "large") for c in fp8_gemm_tma_configs(cls)]
    for N, K in DEEPGEMM_DENSE["nk"]:
        assert _ranked_first(every, M, N, K).get("SPLIT_K", 1) == 1, (M, N, K)


def test_wave_cost_unsplit_is_the_tile_model():
    """SPLIT_K absent or 1: the model other kernels rank by, unchanged."""
    assert wave_cost(128, 64, 300, 128, 132) == 3 * (2 * 128 * 64 / 150 + 128 + 64)
    assert wave_cost(128, 64, 300, 128, 132, 1, 56) == wave_cost(128, 64, 300, 128, 132)


def test_path_rule():
    """One rule picks the kernel: Hopper's when the GPU has TMA and a, b are TMA-readable."""
    a = torch.zeros(8, 256, dtype=FP8_DTYPE)
    b = torch.zeros(32, 256, dtype=FP8_DTYPE)
    assert fp8_path((9, 0), 128, a, b) == "tma"
    assert fp8_path((10, 0), 128, a, b) == "tma"
    assert fp8_path((8, 9), 128, a, b) == "pointer"  # Ada: FP8 but no TMA / wgmma
    assert fp8_path((9, 0), 64, a, b) == "pointer"  # the Hopper configs are sized for 128-blocks
    assert not tma_ready(a[:, 1:129]) and fp8_path((9, 0), 128, a[:, 1:129], b) == "pointer"  # base not aligned
    assert fp8_path((9, 0), 128, torch.zeros(8, 272, dtype=FP8_DTYPE)[:, :256], b) == "tma"  # row stride 272
    assert fp8_path((9, 0), 128, torch.zeros(8, 264, dtype=FP8_DTYPE)[:, :256], b) == "pointer"  # 264: not 16·n
    assert fp8_path((9, 0), 128, a.t().contiguous().t(), b) == "pointer"  # column-major values
    assert fp8_path((9, 0), 128, a[:, :0], b[:, :0]) == "pointer"  # K = 0
    assert fp8_path((9, 0), 128, a, None) == "pointer"  # no 2-D view (grouped weights)


@pytest.mark.parametrize("path", list(PATHS))
def test_launcher_follows_the_rule_and_the_persistent_grid(path, monkeypatch, device):
    """The launcher runs the kernel the rule names; the Hopper kernel's grid is min(tiles, SMs)."""
    launched = record_launches(monkeypatch, fp8_gemm_module, ("_fp8_gemm_kernel", "_fp8_gemm_tma_kernel"))
    M, N, K = 70, 200, 256
    _, _, a, a_s, b, b_s = _operands(M, N, K, device)
    out = nan_empty((M, N), device=device)
    config = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4)
    launch_fp8_gemm(out, a, a_s, b, b_s, 128, None, config, capability=PATHS[path])
    tiles = 2 * 4
    if path == "tma":
        assert launched == [("_fp8_gemm_tma_kernel", (min(tiles, INTERPRETER_SMS),))]
    else:
        assert launched == [("_fp8_gemm_kernel", (tiles,))]
    _check(out, a, a_s, b, b_s)


@pytest.mark.parametrize("block", [32, 64])
def test_fp8_gemm_other_scale_blocks(block, device):
    _, _, a, a_s, b, b_s = _operands(9, 80, 2 * block, device, block)
    _check(fp8_gemm(a, a_s, b, b_s, torch.float32, block), a, a_s, b, b_s, block)


def test_fp8_gemm_matches_bf16_product_of_unquantized_inputs(device):
    """DeepGEMM's acceptance test: calc_diff against the bf16 GEMM of x and w before quantization."""
    x, w, _, _, _, _ = _operands(48, 256, 512, device)
    a, a_s = quant_act(x)  # the kernel quantizers, end to end
    b, b_s = quant_weight(w)
    out = fp8_gemm(a, a_s, b, b_s)
    assert ref.calc_diff(out, x @ w.T) < 1e-3
    assert ref.calc_diff(out, x.float() @ w.float().T) < 1e-3


@pytest.mark.parametrize("path", list(PATHS))
def test_fp8_gemm_bias_strided_out_and_no_out_of_bounds_writes(path, device):
    _, _, a, a_s, b, b_s = _operands(20, 72, 128, device)
    guard = nan_empty((24, 80), torch.float32, device)
    out = guard[2:22, 3:75]  # a strided window: everything around it must stay NaN
    bias = torch.randn(72, 2, device=device, dtype=torch.bfloat16)[:, 0]  # strided: the kernel reads it flat
    launch_fp8_gemm(out, a, a_s, b, b_s, 128, bias, None, capability=PATHS[path])
    inside = torch.zeros_like(guard, dtype=torch.bool)
    inside[2:22, 3:75] = True
    assert guard[~inside].isnan().all()
    ref32 = ref.fp8_gemm(a, a_s, b, b_s, torch.float32)
    mag = ref.fp8_gemm(abs_fp8(a), a_s.abs(), abs_fp8(b), b_s.abs(), torch.float32)
    # The bias is added to the float32 accumulator: one more rounding of |result|.
    extra = 2.0**-24 * (ref32.abs() + bias.abs().float()).double()
    assert_gemm_close(out, ref32 + bias.float(), mag, 1, 128, "bias", extra=extra)


@pytest.mark.parametrize("path", list(PATHS))
def test_fp8_gemm_empty_and_special_values(path, device):
    _, _, a, a_s, b, b_s = _operands(6, 64, 384, device)
    assert fp8_gemm(a[:0], a_s[:0], b, b_s).shape == (0, 64)
    assert fp8_gemm(a, a_s, b[:0], b_s[:0]).shape == (6, 0)
    z = fp8_gemm(a[:, :0], a_s[:, :0], b[:, :0], b_s[:, :0], torch.float32)
    assert torch.equal(z, torch.zeros(6, 64, device=device))  # K = 0: the empty sum
    a_s = a_s.clone()
    a_s[1, 1] = float("nan")  # a NaN block scale poisons its row (never a silent number)
    a_s[3, 0] = float("inf")
    a_s[4, 2] = float("inf")  # the last of an odd number of blocks (the Hopper loop's unpaired one)
    out = nan_empty((6, 64), device=device)
    launch_fp8_gemm(out, a, a_s, b, b_s, 128, None, None, capability=PATHS[path])
    ref32 = ref.fp8_gemm(a, a_s, b, b_s, torch.float32)
    assert out[1].isnan().all() and torch.equal(out.isnan(), ref32.isnan())
    assert torch.equal(out.isinf(), ref32.isinf())


def test_m_class_boundaries():
    classes = [m_class(m) for m in (1, 64, 65, 512, 513, 16384)]
    assert classes == ["small", "small", "medium", "medium", "large", "large"]


def test_bad_inputs_raise_naming_the_argument(device):
    _, _, a, a_s, b, b_s = _operands(4, 64, 256, device)
    with pytest.raises(TypeError, match="a: expected dtype float8_e4m3fn"):
        fp8_gemm(a.float(), a_s, b, b_s)
    with pytest.raises(ValueError, match="b: expected a 2-D tensor"):
        fp8_gemm(a, a_s, b[None], b_s)
    with pytest.raises(ValueError, match="b: expected K=256 columns"):
        fp8_gemm(a, a_s, b[:, :128], b_s)
    with pytest.raises(ValueError, match="a: the Triton fp8_gemm kernel takes K .* multiple of block=128, got K=200"):
        fp8_gemm(a[:, :200], a_s, b[:, :200], b_s)
    with pytest.raises(ValueError, match=r"a_s: expected shape \(4, 2\)"):
        fp8_gemm(a, a_s[:, :1], b, b_s)
    with pytest.raises(TypeError, match="a_s: expected dtype float32"):
        fp8_gemm(a, a_s.double(), b, b_s)
    with pytest.raises(ValueError, match=r"b_s: expected shape \(1, 2\)"):
        fp8_gemm(a, a_s, b, b_s.repeat(2, 1))
    with pytest.raises(TypeError, match="out_dtype"):
        fp8_gemm(a, a_s, b, b_s, torch.float64)
    with pytest.raises(ValueError, match="block: the Triton fp8_gemm kernel takes one of"):
        fp8_gemm(a, a_s[:, :1], b, b_s[:, :1], torch.bfloat16, 512)  # scale shapes that fit block 512
    with pytest.raises(ValueError, match="b: expected device"):
        fp8_gemm.launch(a, a_s, b.to("meta"), b_s)
    with pytest.raises(ValueError, match=r"out: expected shape \(4, 64\)"):
        fp8_gemm.launch(a, a_s, b, b_s, out=torch.empty(4, 63, dtype=torch.bfloat16, device=device))


def test_launcher_checks_the_fp8_capability(monkeypatch, device):
    def refuse(name, dev):
        raise RuntimeError(f"{name}: old GPU")

    monkeypatch.setattr(factory, "check_fp8_capability", refuse)
    factory.forget_checked()  # signatures checked before this test were checked with the real capability
    _, _, a, a_s, b, b_s = _operands(4, 64, 128, device)
    with pytest.raises(RuntimeError, match="fp8_gemm: old GPU"):
        fp8_gemm(a, a_s, b, b_s)


def test_fake_implementation(device):
    _, _, a, a_s, b, b_s = _operands(4, 64, 128, device)
    torch.library.opcheck(torch.ops.moela.fp8_gemm.default, (a, a_s, b, b_s, torch.bfloat16, 128),
                          test_utils=("test_faketensor",))


# ------------------------------------------------------------------------------------ GPU tier

GPU_SHAPES = [(m, n, k) for n, k in DEEPGEMM_DENSE["nk"] for m in DEEPGEMM_DENSE["m"]]
GPU_SHAPES += [(1, 2112, 7168), (77, 4096, 7168)]  # decode M = 1, an M no tile divides


@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K", GPU_SHAPES, ids=[f"m{m}-n{n}-k{k}" for m, n, k in GPU_SHAPES])
def test_gpu_fp8_gemm_deepgemm_grid(M, N, K):
    x, w, _, _, _, _ = _operands(M, N, K, "cuda")
    a, a_s = quant_act(x)
    b, b_s = quant_weight(w)
    out = fp8_gemm.launch(a, to_col_major(a_s), b, b_s, torch.bfloat16, out=nan_empty((M, N), torch.bfloat16, "cuda"))
    _check(out, a, a_s, b, b_s)
    assert ref.calc_diff(out, x @ w.T) < 1e-3


GPU_SPLITS = [c for c in fp8_gemm_tma_configs("small") if c.kwargs.get("SPLIT_K", 1) > 1]


@pytest.mark.gpu
@pytest.mark.parametrize("config", GPU_SPLITS, ids=lambda c: f"{c.kwargs['BLOCK_N']}-split{c.kwargs['SPLIT_K']}")
def test_gpu_fp8_gemm_split_k_configs(config):
    """Each split-K config at the decode shape 64x2112x7168 on the GPU: near exact; 20 launches in
    a row with the same bits and the counters back at 0 (the acquire-release fixup across SMs); a
    CUDA graph captured after a warm-up replays the same bits."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("the Hopper kernels need sm_90")
    M, N, K = 64, 2112, 7168
    x, w, _, _, _, _ = _operands(M, N, K, "cuda")
    a, a_s = quant_act(x)
    b, b_s = quant_weight(w)
    a_s = to_col_major(a_s)
    cfg = {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
    first = fp8_gemm.launch(a, a_s, b, b_s, torch.bfloat16, out=nan_empty((M, N), torch.bfloat16, "cuda"), config=cfg)
    _check(first, a, a_s, b, b_s, num_kb=_split_num_kb(K // 128, cfg["SPLIT_K"]))
    ws, counters = _split_buffers(a.device)
    for _ in range(20):
        ws.fill_(float("nan"))
        assert_same_bits(fp8_gemm.launch(a, a_s, b, b_s, torch.bfloat16, config=cfg), first)
    assert not counters.any()
    out = torch.empty_like(first)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fp8_gemm.launch(a, a_s, b, b_s, torch.bfloat16, out=out, config=cfg)  # warm up: the stream's buffers
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        fp8_gemm.launch(a, a_s, b, b_s, torch.bfloat16, out=out, config=cfg)
    for _ in range(3):
        out.fill_(float("nan"))
        graph.replay()
        assert_same_bits(out, first)


@pytest.mark.gpu
def test_gpu_fp8_gemm_rejects_pre_ada_gpus_cleanly():
    if torch.cuda.get_device_capability() >= (8, 9):
        pytest.skip("this GPU supports FP8")
    a = torch.zeros(4, 128, device="cuda").to(FP8_DTYPE)
    s = torch.ones(4, 1, device="cuda")
    with pytest.raises(RuntimeError, match="compute capability >= 8.9"):
        fp8_gemm(a, s, a, s[:1])
