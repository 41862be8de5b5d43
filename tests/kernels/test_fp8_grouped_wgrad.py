"""kernels.fp8_grouped_wgrad: the k-grouped MoE weight gradient dW[e] = dy[tokens of e]ᵀ · x[tokens of e]
in FP8, against reference.fp8_grouped_wgrad.

Groups aligned to the block (DeepGEMM's layout: each expert's own scale blocks, the same numbers as
``fp8_wgrad`` on the expert's slice) and unaligned (blocks shared by neighbours), empty experts,
tokens past offsets[-1], int64 offsets, malformed offsets (clamping rule, no writes outside the
output; validate=True raises), outputs pre-filled with NaN. Near exact within tests/fp8_testing.py's
bound; calc_diff < 1e-3 per expert against the unquantized product. Both kernels of the path rule
``fp8_mainloop.fp8_path``: the Hopper kernel (M a multiple of 16, persistent over 3 "SMs") with
groups that start and end mid-block, a group inside one block, an expert without a whole block
(its main loop empty), empty first / middle / last experts, ``make_routing(align=128)`` groups, a
tail past offsets[-1], M not a multiple of 128, strided bf16 outputs, infinite scales staying in
their experts; the pointer kernel for odd M, pre-Hopper and ``MOELA_TMA=0``. The Hopper kernel is
not bit for bit the pointer kernel (the scale product rounds in another order). GPU tier:
DeepSeek-V3's experts, and each Hopper config with unaligned groups. The sm_90 compile: ``profiling
audit --kernels fp8_grouped_wgrad_tma``.
"""

from __future__ import annotations

import importlib
import random

import pytest
import torch
from fp8_testing import PATHS, abs_fp8, assert_gemm_close, record_launches
from moela_testing import nan_empty

from moela import reference as ref
from moela.kernels import fp8_grouped_wgrad, fp8_wgrad, quant_act_t
from moela.kernels.fp8_mainloop import fp8_path

grouped_module = importlib.import_module("moela.kernels.fp8_grouped_wgrad")  # the module (the package exports the op)


def _offsets(sizes, device, dtype=torch.int32):
    return torch.tensor(sizes, dtype=torch.int64).cumsum(0).to(device=device, dtype=dtype)


def _operands(M, N, K, device):
    dy = torch.randn(M, N, device=device, dtype=torch.bfloat16)
    x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
    return dy, x, *ref.quant_act_t(dy), *ref.quant_act_t(x)


def _check(out, a, a_s, b, b_s, offsets, name="dw"):
    ref32 = ref.fp8_grouped_wgrad(a, a_s, b, b_s, offsets, torch.float32)
    mag = ref.fp8_grouped_wgrad(abs_fp8(a), a_s.abs(), abs_fp8(b), b_s.abs(), offsets, torch.float32)
    assert_gemm_close(out, ref32, mag, -(-a.shape[1] // 128), 128, name)


CASES = {  # (tokens per expert, tokens past the last expert, N, K)
    "unaligned-ragged": ([50, 0, 120, 90], 10, 64, 96),
    "aligned": ([128, 0, 256], 0, 48, 72),
    "one-expert-many-blocks": ([300], 0, 40, 40),
    "no-experts": ([], 20, 16, 16),
}


@pytest.mark.parametrize("case,offsets_dtype", [(c, torch.int32) for c in CASES] + [("aligned", torch.int64)],
                         ids=[*CASES, "aligned-int64"])
def test_fp8_grouped_wgrad_near_exact_against_reference(case, offsets_dtype, device):
    sizes, tail, N, K = CASES[case]
    _, _, a, a_s, b, b_s = _operands(sum(sizes) + tail, N, K, device)
    offsets = _offsets(sizes, device, offsets_dtype)
    out = nan_empty((len(sizes), N, K), torch.float32, device)
    assert fp8_grouped_wgrad.launch(a, a_s, b, b_s, offsets, out=out) is out
    _check(out, a, a_s, b, b_s, offsets)
    for e, n in enumerate(sizes):
        if n == 0:
            assert (out[e] == 0).all()  # experts without tokens


def test_aligned_groups_are_per_expert_wgrads(monkeypatch, device):
    """With block-aligned groups each expert owns its scale blocks: the grouped result is
    ``fp8_wgrad`` of the expert's own token slice bit for bit (its pointer kernel, whose arithmetic
    the grouped kernel shares: ``MOELA_TMA=0``; the Hopper kernel rounds the scale product in
    another order), and within calc_diff 1e-3 of its unquantized dy[e]ᵀ · x[e] (DeepGEMM's
    k-grouped layout)."""
    monkeypatch.setenv("MOELA_TMA", "0")
    sizes = [128, 256, 0, 128]
    dy, x, *_ = _operands(sum(sizes), 64, 96, device)
    offsets = _offsets(sizes, device)
    q_dy, s_dy = quant_act_t(dy)  # the kernel quantizer, end to end
    q_x, s_x = quant_act_t(x)
    out = fp8_grouped_wgrad(q_dy, s_dy, q_x, s_x, offsets)
    start = 0
    for e, n in enumerate(sizes):
        if n:
            mb = slice(start // 128, (start + n) // 128)
            own = fp8_wgrad(q_dy[:, start:start + n], s_dy[:, mb], q_x[:, start:start + n], s_x[:, mb])
            assert torch.equal(out[e], own)
            assert ref.calc_diff(out[e], dy[start:start + n].float().T @ x[start:start + n].float()) < 1e-3
        start += n


def test_bf16_output_and_config(device):
    sizes = [40, 150]
    _, _, a, a_s, b, b_s = _operands(sum(sizes), 100, 70, device)
    offsets = _offsets(sizes, device)
    out = fp8_grouped_wgrad(a, a_s, b, b_s, offsets, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 100, 70)
    _check(out, a, a_s, b, b_s, offsets)
    config = dict(BLOCK_N=16, BLOCK_K=128, GROUP_N=2, num_warps=4)
    out = fp8_grouped_wgrad.launch(a, a_s, b, b_s, offsets, config=config, out=nan_empty((2, 100, 70), device=device))
    _check(out, a, a_s, b, b_s, offsets)


def test_malformed_offsets_validate_or_stay_in_bounds(device):
    _, _, a, a_s, b, b_s = _operands(140, 24, 40, device)
    for bad in ([40, 20, 100], [-3, 50, 90], [50, 60, 180]):
        offsets = torch.tensor(bad, dtype=torch.int32, device=device)
        for op in (fp8_grouped_wgrad, ref.fp8_grouped_wgrad):
            with pytest.raises(ValueError, match="offsets: expected non-decreasing cumulative row ends"):
                op(a, a_s, b, b_s, offsets, validate=True)
        guard = nan_empty((4, 28, 44), torch.float32, device)
        out = fp8_grouped_wgrad.launch(a, a_s, b, b_s, offsets, out=guard[1:4, 2:26, 2:42])
        inside = torch.zeros_like(guard, dtype=torch.bool)
        inside[1:4, 2:26, 2:42] = True
        assert guard[~inside].isnan().all(), f"offsets {bad}: wrote outside the output"
        _check(out, a, a_s, b, b_s, offsets)


def test_bad_inputs_raise_naming_the_argument(device):
    _, _, a, a_s, b, b_s = _operands(256, 32, 16, device)
    offsets = _offsets([100, 156], device)
    for op in (fp8_grouped_wgrad, ref.fp8_grouped_wgrad):
        with pytest.raises(ValueError, match="offsets: expected a 1-D tensor"):
            op(a, a_s, b, b_s, offsets[None])
        with pytest.raises(TypeError, match="offsets: expected dtype int32/int64"):
            op(a, a_s, b, b_s, offsets.float())
        with pytest.raises(ValueError, match=r"x_t: expected M=256 columns"):
            op(a, a_s, b[:, :100], b_s, offsets)
    torch.library.opcheck(torch.ops.moela.fp8_grouped_wgrad.default, (a, a_s, b, b_s, offsets),
                          test_utils=("test_faketensor",))


@pytest.mark.gpu
@pytest.mark.parametrize("N,K", [(4096, 7168), (7168, 2048)], ids=["up-gate", "down"])
def test_gpu_fp8_grouped_wgrad_v3_experts(N, K):
    """V3 prefill (T=4096, top-8 of 256 experts), groups aligned to 128 as make_routing(align=128) pads them."""
    counts = torch.bincount(torch.randint(0, 256, (4096 * 8,)), minlength=256)
    sizes = ((counts + 127) // 128 * 128).tolist()
    dy, x, a, a_s, b, b_s = _operands(sum(sizes), N, K, "cuda")
    offsets = _offsets(sizes, "cuda")
    out = fp8_grouped_wgrad.launch(a, a_s, b, b_s, offsets, out=nan_empty((256, N, K), torch.float32, "cuda"))
    _check(out, a, a_s, b, b_s, offsets)
    assert ref.calc_diff(out, ref.grouped_gemm_dw(x.float(), dy.float(), offsets)) < 1e-3


# ------------------------------------------------------------------------------------ the Hopper kernel

TMA_CASES = {  # (tokens per expert, tokens past the last expert, N, K): M a multiple of 16
    # M = 608 (not of 128): expert 1 [40, 540) has a leading partial block, whole blocks 1-3 (a pair
    # and an odd one) and a trailing partial block; expert 2 [540, 600) lies inside block 4; the
    # last expert is empty; 8 tokens past offsets[-1].
    "edges-pairs-odd": ([40, 500, 60, 0], 8, 72, 136),
    # M = 480: empty first and middle experts, expert 1 two whole blocks then a partial one, expert 3
    # a partial block and the last block (partial by M's end: TMA zero-fills past M).
    "empty-first-middle": ([0, 300, 0, 180], 0, 64, 40),
    "inside-one-block": ([16, 32, 48], 32, 40, 72),  # M = 128: three experts in block 0
    "one-expert-whole-block": ([128, 80], 0, 24, 40),  # expert 1 has no whole block: no main loop
}


def _launch(a, a_s, b, b_s, offsets, out, path="tma", config=None):
    grouped_module.launch_fp8_grouped_wgrad(out, a, a_s, b, b_s, offsets, 128, config, capability=PATHS[path])
    return out


@pytest.mark.parametrize("case", list(TMA_CASES))
def test_fp8_grouped_wgrad_tma_near_exact(case, device):
    sizes, tail, N, K = TMA_CASES[case]
    _, _, a, a_s, b, b_s = _operands(sum(sizes) + tail, N, K, device)
    offsets = _offsets(sizes, device)
    assert fp8_path(PATHS["tma"], 128, a, b) == "tma"
    out = _launch(a, a_s, b, b_s, offsets, nan_empty((len(sizes), N, K), torch.float32, device))
    _check(out, a, a_s, b, b_s, offsets)
    for e, n in enumerate(sizes):
        if n == 0:
            assert (out[e] == 0).all()


def test_fp8_grouped_wgrad_tma_malformed_offsets_follow_the_clamping_rule(device):
    """Offsets past M, decreasing and negative on the Hopper path: each expert reduces over the
    range ``group_rows`` clamps them to, as the reference does (nothing read out of bounds)."""
    _, _, a, a_s, b, b_s = _operands(320, 40, 48, device)
    offsets = torch.tensor([-7, 200, 150, 500, 260], dtype=torch.int32, device=device)
    out = _launch(a, a_s, b, b_s, offsets, nan_empty((5, 40, 48), torch.float32, device))
    _check(out, a, a_s, b, b_s, offsets)


@pytest.mark.parametrize("seed", [0, 1])
def test_fp8_grouped_wgrad_tma_random_layouts(seed, device):
    """Seeded random group layouts on the Hopper path: random cuts (empty experts, a tail), cuts
    at or next to block edges (a range inside one block, exactly one whole block, a start on an
    edge), near exact against the reference with both tile widths."""
    rng = random.Random(seed)
    configs = [dict(BLOCK_M=64, BLOCK_N=64, GROUP_M=2, num_warps=4, num_stages=3),
               dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=4)]
    for _ in range(6):
        M, E = 16 * rng.randint(1, 30), rng.randint(1, 5)
        N, K = rng.choice([8, 24, 40]), rng.choice([16, 48])
        if rng.random() < 0.5:
            cuts = sorted(rng.randint(0, M) for _ in range(E))
        else:
            cuts = sorted(min(M, max(0, 128 * rng.randint(0, 4) + rng.choice([0, -1, 1, 64]))) for _ in range(E))
        _, _, a, a_s, b, b_s = _operands(M, N, K, device)
        offsets = torch.tensor(cuts, dtype=torch.int32, device=device)
        out = _launch(a, a_s, b, b_s, offsets, nan_empty((E, N, K), torch.float32, device), config=rng.choice(configs))
        _check(out, a, a_s, b, b_s, offsets, name=f"dw (M={M}, cuts={cuts})")


def test_fp8_grouped_wgrad_tma_aligned_routing(device):
    """``make_routing(align=128)``: every group starts at a block edge (no edge blocks), odd and
    even numbers of whole blocks, an empty expert; calc_diff < 1e-3 against the unquantized
    per-expert products."""
    ids = torch.tensor([0] * 130 + [1] * 7 + [3] * 300, device=device).view(-1, 1)
    plan = ref.make_routing(ids, 4, align=128)
    assert plan.offsets.tolist() == [256, 384, 384, 768]
    M = 768
    dy, x, a, a_s, b, b_s = _operands(M, 48, 72, device)
    out = _launch(a, a_s, b, b_s, plan.offsets, nan_empty((4, 48, 72), torch.float32, device))
    _check(out, a, a_s, b, b_s, plan.offsets)
    assert (out[2] == 0).all()
    assert ref.calc_diff(out, ref.grouped_gemm_dw(x.float(), dy.float(), plan.offsets)) < 1e-3


TMA_CONFIGS = {  # explicit configs: several tiles per expert, units walked by 3 programs
    "pipelined-64x64": dict(BLOCK_M=64, BLOCK_N=64, GROUP_M=2, num_warps=4, num_stages=3),
    "pipelined-128x64": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=4),
}


@pytest.mark.parametrize("cfg", list(TMA_CONFIGS))
def test_fp8_grouped_wgrad_tma_configs_and_strided_bf16_out(cfg, device):
    sizes, tail, N, K = TMA_CASES["edges-pairs-odd"]
    _, _, a, a_s, b, b_s = _operands(sum(sizes) + tail, N, K, device)
    offsets = _offsets(sizes, device)
    guard = nan_empty((len(sizes) + 1, N + 4, 2 * K + 4), torch.bfloat16, device)
    out = guard[1:, 2:N + 2, 1:2 * K + 1:2]
    _launch(a, a_s, b, b_s, offsets, out, config=TMA_CONFIGS[cfg])
    inside = torch.zeros_like(guard, dtype=torch.bool)
    inside[1:, 2:N + 2, 1:2 * K + 1:2] = True
    assert guard[~inside].isnan().all(), "wrote outside the output"
    _check(out, a, a_s, b, b_s, offsets)


@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")  # 0 · inf, as the reference
def test_fp8_grouped_wgrad_tma_scales_stay_in_their_expert(device):
    """An infinite scale of a block wholly expert 0's poisons only expert 0 (the reference's rule):
    expert 1 [128, 208) has no whole block, and its empty main loop promotes nothing (not block 0's
    scales times zeros, which would be NaN); an infinite scale of the shared block poisons both."""
    sizes = [128, 80]
    _, _, a, a_s, b, b_s = _operands(208, 40, 24, device)
    offsets = _offsets(sizes, device)
    a_s = a_s.clone()
    a_s[3, 0] = float("inf")
    out = _launch(a, a_s, b, b_s, offsets, nan_empty((2, 40, 24), device=device))
    assert not out[1].isnan().any() and not out[1].isinf().any()
    _check(out, a, a_s, b, b_s, offsets)
    sizes = [100, 108]  # block 0 shared
    offsets = _offsets(sizes, device)
    out = _launch(a, a_s, b, b_s, offsets, nan_empty((2, 40, 24), device=device))
    assert out[:, 3].isinf().any(dim=-1).all()
    _check(out, a, a_s, b, b_s, offsets)


def test_launcher_follows_the_path_rule(monkeypatch, device):
    """Hopper's kernel when the rule says so (M a multiple of 16, block 128, sm_90+), the pointer
    kernel for odd M, pre-Hopper GPUs and MOELA_TMA=0; both within the bound."""
    launched = record_launches(monkeypatch, grouped_module, ("_tuned", "_tma_tuned"))
    for sizes, path in (([40, 136], "tma"), ([40, 130], "tma"), ([40, 136], "pointer")):
        _, _, a, a_s, b, b_s = _operands(sum(sizes), 24, 40, device)
        offsets = _offsets(sizes, device)
        _check(_launch(a, a_s, b, b_s, offsets, nan_empty((2, 24, 40), device=device), path), a, a_s, b, b_s, offsets)
    monkeypatch.setenv("MOELA_TMA", "0")
    _, _, a, a_s, b, b_s = _operands(176, 24, 40, device)
    _check(fp8_grouped_wgrad(a, a_s, b, b_s, _offsets([40, 136], device)), a, a_s, b, b_s, _offsets([40, 136], device))
    assert [name for name, _ in launched] == ["_tma_tuned", "_tuned", "_tuned", "_tuned"]  # 170 tokens: 170-byte rows


def test_bad_tma_config_raises_naming_the_kernel(device):
    _, _, a, a_s, b, b_s = _operands(176, 24, 40, device)
    offsets = _offsets([40, 136], device)
    with pytest.raises(ValueError, match=r"the Hopper fp8_grouped_wgrad kernel .*unknown: \['BLOCK_K'\]"):
        _launch(a, a_s, b, b_s, offsets, nan_empty((2, 24, 40), device=device), config=dict(BLOCK_N=64, BLOCK_K=64))
    with pytest.raises(ValueError, match="the pipelined schedule only"):
        _launch(a, a_s, b, b_s, offsets, nan_empty((2, 24, 40), device=device),
                config=dict(BLOCK_M=128, BLOCK_N=64, WARP_SPECIALIZE=True, num_warps=4))


@pytest.mark.gpu
@pytest.mark.parametrize("index", range(len(grouped_module.fp8_grouped_wgrad_tma_configs())))
def test_gpu_fp8_grouped_wgrad_tma_configs(index):
    """Each Hopper config at V3's up projection (N = 4096, K = 7168) over 32 experts with ragged,
    unaligned groups (edge blocks everywhere), an empty expert and a tail past offsets[-1]."""
    c = grouped_module.fp8_grouped_wgrad_tma_configs()[index]
    config = {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}
    sizes = torch.randint(0, 400, (32,), generator=torch.Generator().manual_seed(index)).tolist()
    sizes[5] = 0
    tail = (-sum(sizes)) % 16 + 16
    _, _, a, a_s, b, b_s = _operands(sum(sizes) + tail, 4096, 7168, "cuda")
    offsets = _offsets(sizes, "cuda")
    out = _launch(a, a_s, b, b_s, offsets, nan_empty((32, 4096, 7168), torch.float32, "cuda"), config=config)
    _check(out, a, a_s, b, b_s, offsets)
