"""kernels.fp8_grouped_dgrad: the MoE input gradient, dy · w[e] per group of rows, against
reference.fp8_grouped_dgrad.

Ragged groups (empty ones, a tail past offsets[-1], no experts), int32/int64 offsets, a ragged
reduction, malformed offsets (the clamping rule, no writes outside the output; validate=True
raises), outputs pre-filled with NaN. Near exact within tests/fp8_testing.py's bound; calc_diff
< 1e-3 against the bf16 product of the unquantized inputs. GPU tier: DeepSeek-V3's expert shapes.
"""

from __future__ import annotations

import pytest
import torch
from fp8_testing import abs_fp8, assert_gemm_close
from moela_testing import nan_empty

from moela import reference as ref
from moela.kernels import fp8_grouped_dgrad, quant_act, quant_weight


def _operands(sizes, tail, N, K, device, offsets_dtype=torch.int32):
    M, E = sum(sizes) + tail, len(sizes)
    dy = torch.randn(M, N, device=device, dtype=torch.bfloat16)
    w = (torch.randn(E, N, K, device=device) * N**-0.5).to(torch.bfloat16)
    offsets = torch.tensor(sizes, dtype=torch.int64).cumsum(0).to(device=device, dtype=offsets_dtype)
    dq, ds = ref.quant_act(dy)
    wq, ws = ref.quant_weight(w)
    return dy, w, dq, ds, wq, ws, offsets


def _check(out, dq, ds, wq, ws, offsets, name="dx"):
    ref32 = ref.fp8_grouped_dgrad(dq, ds, wq, ws, offsets, torch.float32)
    mag = ref.fp8_grouped_dgrad(abs_fp8(dq), ds.abs(), abs_fp8(wq), ws.abs(), offsets, torch.float32)
    assert_gemm_close(out, ref32, mag, -(-dq.shape[1] // 128), 128, name)


CASES = {  # (group sizes, rows past the last group, N: the reduction, K)
    "ragged-tail": ([5, 0, 15, 13], 7, 256, 128),
    "ragged-reduction": ([9, 30], 0, 200, 96),
    "one-of-many": ([0, 0, 9, 0, 0], 2, 128, 64),
    "no-experts": ([], 5, 128, 32),
    "multi-tile-group": ([70, 3], 1, 128, 40),
}


@pytest.mark.parametrize("case,offsets_dtype", [(c, torch.int32) for c in CASES] + [("ragged-tail", torch.int64)],
                         ids=[*CASES, "ragged-tail-int64"])
def test_fp8_grouped_dgrad_near_exact_against_reference(case, offsets_dtype, device):
    sizes, tail, N, K = CASES[case]
    _, _, dq, ds, wq, ws, offsets = _operands(sizes, tail, N, K, device, offsets_dtype)
    out = nan_empty((dq.shape[0], K), torch.float32, device)
    assert fp8_grouped_dgrad.launch(dq, ds, wq, ws, offsets, torch.float32, out=out) is out
    _check(out, dq, ds, wq, ws, offsets)
    assert (out[sum(sizes):] == 0).all()  # rows of no group


def test_fp8_grouped_dgrad_config_transposed_copy_and_calc_diff(device):
    dy, w, _, _, _, _, offsets = _operands([20, 0, 44], 3, 256, 160, device)
    dq, ds = quant_act(dy)  # the kernel quantizers, end to end
    wq, ws = quant_weight(w)
    out = fp8_grouped_dgrad(dq, ds, wq.transpose(1, 2).contiguous().transpose(1, 2), ws, offsets)
    _check(out, dq, ds, wq, ws, offsets)
    assert ref.calc_diff(out, ref.grouped_gemm(dy, w.transpose(1, 2), offsets)) < 1e-3
    config = dict(BLOCK_M=16, BLOCK_K=256, GROUP_M=2, num_warps=4)  # a vector of weight scales per step
    out = fp8_grouped_dgrad.launch(dq, ds, wq, ws, offsets, torch.float32, config=config,
                                   out=nan_empty(out.shape, device=device))
    _check(out, dq, ds, wq, ws, offsets)


def test_fp8_grouped_dgrad_malformed_offsets_validate_or_stay_in_bounds(device):
    _, _, dq, ds, wq, ws, _ = _operands([6, 6, 6], 2, 128, 32, device)
    M = dq.shape[0]
    for bad in ([4, 2, 20], [-3, 5, 10], [5, 10, M + 7]):
        offsets = torch.tensor(bad, dtype=torch.int32, device=device)
        for op in (fp8_grouped_dgrad, ref.fp8_grouped_dgrad):
            with pytest.raises(ValueError, match="offsets: expected non-decreasing cumulative row ends"):
                op(dq, ds, wq, ws, offsets, validate=True)
        guard = nan_empty((M + 4, 40), torch.float32, device)
        out = fp8_grouped_dgrad.launch(dq, ds, wq, ws, offsets, torch.float32, out=guard[2:M + 2, 4:36])
        inside = torch.zeros_like(guard, dtype=torch.bool)
        inside[2:M + 2, 4:36] = True
        assert guard[~inside].isnan().all(), f"offsets {bad}: wrote outside the output"
        _check(out, dq, ds, wq, ws, offsets)  # the documented clamped result, as the reference


def test_fp8_grouped_dgrad_bad_inputs_raise_naming_the_argument(device):
    _, _, dq, ds, wq, ws, offsets = _operands([3, 5], 0, 256, 128, device)
    for op in (fp8_grouped_dgrad, ref.fp8_grouped_dgrad):
        with pytest.raises(ValueError, match="w: expected a 3-D tensor"):
            op(dq, ds, wq[0], ws, offsets)
        with pytest.raises(ValueError, match=r"w: expected N=256 rows"):
            op(dq, ds, wq.transpose(1, 2), ws, offsets)
        with pytest.raises(ValueError, match=r"offsets: expected shape \(2\)"):
            op(dq, ds, wq, ws, offsets[:1])
        with pytest.raises(TypeError, match="offsets: expected dtype int32/int64"):
            op(dq, ds, wq, ws, offsets.float())
    torch.library.opcheck(torch.ops.moela.fp8_grouped_dgrad.default, (dq, ds, wq, ws, offsets),
                          test_utils=("test_faketensor",))


@pytest.mark.gpu
@pytest.mark.parametrize("N,K", [(2048, 7168), (4096, 7168), (7168, 2048)], ids=["down-dx", "up-dx", "x"])
def test_gpu_fp8_grouped_dgrad_v3_experts(N, K):
    """V3 prefill (T=4096, top-8 of 256 experts): dX of the down projection (reduction D=7168 -> I)
    and of up/gate (reduction 2I=4096 -> D)."""
    sizes = torch.bincount(torch.randint(0, 256, (4096 * 8,)), minlength=256).tolist()
    dy, w, dq, ds, wq, ws, offsets = _operands(sizes, 0, N, K, "cuda")
    out = fp8_grouped_dgrad.launch(dq, ds, wq, ws, offsets, torch.float32,
                                   out=nan_empty((dq.shape[0], K), torch.float32, "cuda"))
    _check(out, dq, ds, wq, ws, offsets)
    assert ref.calc_diff(out, ref.grouped_gemm(dy, w.transpose(1, 2), offsets)) < 1e-3
