"""k-grouped FP8 wgrad: ``dW[e] = dy[tokens of e]ᵀ · x[tokens of e]`` for every expert in one launch.

Legend: M tokens (expert rows, grouped by expert: the reduction), N output features, K input
features, E experts, B the scale block (128), Mb = ceil(M/B).

    dy_t (N, M) e4m3,  dy_t_s (N, Mb) f32    ``quant_act_t`` of the expert rows' output gradient
    x_t  (K, M) e4m3,  x_t_s  (K, Mb) f32    ``quant_act_t`` of the expert rows' input
    offsets (E,) int32/int64                 cumulative token ends
    dw (E, N, K) float32 (default) / bf16 / fp16

DeepGEMM's ``k_grouped_fp8_gemm_tn_contiguous``: the MoE weight gradient, where each expert's
GEMM reduces over its own tokens. Token blocks are global (scales per block ``token // B``); each
expert takes only its own tokens [offsets[e-1], offsets[e]) (``tl_helpers.group_rows`` reads them
on the device: clamped into [0, M], made non-decreasing; ``validate=True`` raises on malformed
offsets instead), so a block shared with a neighbour counts its tokens under the block's scale
(``moela.reference.fp8_grouped_wgrad``); with ``make_routing(..., align=B)`` every block is the
expert's own. Experts without tokens get zeros. Two kernels, one rule (``fp8_mainloop.fp8_path``,
as for ``fp8_wgrad``):

- ``_fp8_grouped_wgrad_tma_kernel`` (Hopper, sm_90+, block 128, dy_t and x_t TMA-readable: M a
  multiple of 16 when contiguous): persistent, ``min(units, SMs)`` programs walk the (expert,
  BLOCK_M × BLOCK_N tile of dW[e]) units, expert by expert, GROUP_M super-rows inside one. Per
  unit, in token order into one float32 accumulator: a leading block the range only partly
  covers, then the whole blocks in pairs through ``fp8_mainloop.fp8_tma_tile`` (B_ROW_SCALES;
  TMA boxes at multiples of 128 tokens of the whole tensors, unmasked), then an odd whole block
  and a trailing partial block. The blocks outside the pairs are TMA-loaded whole, x_t's tokens
  outside the range zeroed in registers, and promoted with their block's scales as the main loop
  promotes (``fp8_mainloop.row_promoted``). Operands, scales (``fp8_wgrad.tma_scales``) and
  descriptors as ``fp8_wgrad``'s Hopper kernel; pipelined schedule only (64-column tiles: wider
  ones spill at sm_90 here, and Triton 3.6 cannot warp-specialise the loop between the edge
  blocks).
- ``_fp8_grouped_wgrad_kernel`` (pointer loads): pre-Hopper GPUs, blocks other than 128, odd M.
  One program per (expert, tile), ``grid = E × N-tiles × K-tiles``; it reduces over the global
  blocks that meet the range (``tl_helpers.fp8_scaled_range_tile``), tokens outside it masked to
  zero.

The Hopper kernel rounds the scale product as ``p · (a_s · b_s)``, the reference as
``(p · a_s) · b_s`` (near exact, not bit for bit). Configs: the Hopper list
(``fp8_grouped_wgrad_tma_configs``) pruned and ordered by the wave model, keyed on (N, K, E, M's
bucket); the pointer list keyed on (N, K, M's bucket). ``MOELA_FP8_GROUPED_WGRAD_TMA_CONFIG`` /
``MOELA_FP8_GROUPED_WGRAD_CONFIG`` pin one; an explicit ``config=`` names the keys of the kernel the
rule picks (BLOCK_M, BLOCK_N, GROUP_M for the Hopper kernel; BLOCK_N, BLOCK_K, GROUP_N for the
pointer kernel).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from moela.reference.fp8_train import check_fp8_grouped_wgrad
from moela.reference.grouped_gemm import check_offsets

from ._common import (
    autotune,
    cdiv,
    device_capability,
    ensure_tma_allocator,
    kernel_rows,
    m_bucket,
    next_power_of_2,
    num_sms,
)
from .factory import kernel_op
from .fp8_mainloop import (
    HOPPER_CONFIG_KEYS,
    check_config_keys,
    fp8_path,
    fp8_tma_tile,
    hopper_meta,
    hopper_tuner,
    row_promoted,
    tma_config,
    tma_pruner,
)
from .fp8_wgrad import POINTER_CONFIG_KEYS, tma_scales
from .tl_helpers import SMEM_BUDGET, fp8_scaled_range_tile, fp8_train_block, group_rows, grouped_tile_order

__all__ = ["fp8_grouped_wgrad", "fp8_grouped_wgrad_configs", "fp8_grouped_wgrad_tma_configs",
           "launch_fp8_grouped_wgrad", "tma_launch_args"]


@triton.jit
def _fp8_grouped_wgrad_kernel(
    a_ptr, as_ptr, b_ptr, bs_ptr, offsets_ptr, c_ptr,
    N, K, M, E,
    stride_an, stride_am, stride_asn, stride_asm,
    stride_bk, stride_bm, stride_bsk, stride_bsm,
    stride_ce, stride_cn, stride_ck,
    M_BUCKET,  # autotune key only: _common.m_bucket(M)
    SCALE_BLOCK: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr, STAGES: tl.constexpr = 3,
):
    """grid: (E * cdiv(N, BLOCK_N) * cdiv(K, BLOCK_K),); BLOCK_E = next_power_of_2(E + 1).

    Program -> (expert e, tile of dw[e]); it reduces over tokens [offsets[e-1], offsets[e]).
    """
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    num_k = tl.cdiv(K, BLOCK_K)
    e = pid // (num_n * num_k)
    pid_n, pid_k = grouped_tile_order(pid % (num_n * num_k), num_n, num_k, GROUP_N)
    start, end = group_rows(offsets_ptr, e, E, M, BLOCK_E)
    nonempty = end > start
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)
    cols = tl.minimum(offs_k, K - 1).to(tl.int64)
    acc = fp8_scaled_range_tile(
        a_ptr, as_ptr, b_ptr, bs_ptr, rows, cols, pid_k * BLOCK_K,
        tl.where(nonempty, start, 0), tl.where(nonempty, end, 0),
        stride_an, stride_am, stride_asn, stride_asm,
        stride_bk, stride_bm, stride_bsk, stride_bsm,
        BLOCK_N, BLOCK_K, SCALE_BLOCK, True, False, STAGES,
    )
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    c_ptrs = c_ptr + e.to(tl.int64) * stride_ce + offs_n.to(tl.int64)[:, None] * stride_cn + offs_k[None, :] * stride_ck
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _masked_blocks(acc, a_desc, b_desc, as_desc, bs_desc, a_row, b_row, kb_lo, kb_hi, start, end,
                   SCALE_BLOCK: tl.constexpr):
    """acc + Σ_{kb_lo <= kb < kb_hi} promote(dy_t_kb · x_t_kbᵀ) with the tokens outside [start, end)
    zeroed in x_t's tile (a block the expert shares with a neighbour, or the pipelined loop's odd
    whole block), in token order; the promotion ``fp8_mainloop.row_promoted`` with block kb's
    scales, as the main loop's."""
    for kb in tl.range(kb_lo, kb_hi, num_stages=1):
        a = a_desc.load([a_row, kb * SCALE_BLOCK])
        b = b_desc.load([b_row, kb * SCALE_BLOCK])
        tok = kb * SCALE_BLOCK + tl.arange(0, SCALE_BLOCK)
        mine = ((tok >= start) & (tok < end))[None, :]
        b = tl.where(mine, b.to(tl.uint8, bitcast=True), 0).to(b.dtype, bitcast=True)  # e4m3 0 is 0x00
        acc += row_promoted(tl.dot(a, b.T), as_desc, bs_desc, 0, a_row, b_row, kb, True)
    return acc


@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _fp8_grouped_wgrad_tma_kernel(
    a_ptr, as_ptr, b_ptr, bs_ptr, offsets_ptr, c_ptr,
    N, K, M, E,
    stride_an, stride_asm, stride_bk, stride_bsk, stride_ce, stride_cn, stride_ck,
    M_BUCKET,  # autotune key only: _common.m_bucket(M)
    SCALE_BLOCK: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
    STAGES: tl.constexpr,
):
    """dw[e] over expert e's tokens on Hopper: tensor descriptors, persistent (expert, tile) units.
    BLOCK_M: rows of dw[e] (of N), BLOCK_N: columns (of K); BLOCK_E = next_power_of_2(E + 1).

    grid: (min(E * cdiv(N, BLOCK_M) * cdiv(K, BLOCK_N), SMs),). Unit u -> expert u // tiles, its
    tile in GROUP_M super-rows. The expert's tokens [start, end) (``group_rows``) meet the global
    token blocks kb_s .. kb_e - 1: a leading block the range only partly covers, then the whole
    blocks in pairs through ``fp8_mainloop.fp8_tma_tile`` (unmasked: boxes at multiples of
    SCALE_BLOCK tokens), then an odd whole block and a trailing partial one (``_masked_blocks``),
    all into one accumulator in token order. Descriptors and scale views as
    ``fp8_wgrad._fp8_wgrad_tma_kernel``'s: dy_t (N, M), x_t (K, M), dy_t_sᵀ (Mb, N), x_t_s (K, Mb).
    """
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[N, M], strides=[stride_an, 1], block_shape=[BLOCK_M, SCALE_BLOCK])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[K, M], strides=[stride_bk, 1], block_shape=[BLOCK_N, SCALE_BLOCK])
    num_pid_m = tl.cdiv(N, BLOCK_M)
    num_pid_n = tl.cdiv(K, BLOCK_N)
    num_kb = tl.cdiv(M, SCALE_BLOCK)
    as_desc = tl.make_tensor_descriptor(as_ptr, shape=[num_kb, N], strides=[stride_asm, 1], block_shape=[1, BLOCK_M])
    bs_desc = tl.make_tensor_descriptor(bs_ptr, shape=[K, num_kb], strides=[stride_bsk, 1], block_shape=[BLOCK_N, 4])
    tiles = num_pid_m * num_pid_n
    for unit in tl.range(tl.program_id(0), E * tiles, tl.num_programs(0), flatten=False):
        e = unit // tiles
        pid_m, pid_n = grouped_tile_order(unit % tiles, num_pid_m, num_pid_n, GROUP_M)
        start, end = group_rows(offsets_ptr, e, E, M, BLOCK_E)
        kb_s = start // SCALE_BLOCK
        kb_e = tl.where(end > start, tl.cdiv(end, SCALE_BLOCK), kb_s)
        whole0 = tl.minimum(tl.cdiv(start, SCALE_BLOCK), kb_e)  # the first block wholly the expert's
        pairs = tl.maximum(end // SCALE_BLOCK - whole0, 0) // 2 * 2  # whole blocks the main loop takes
        row0 = pid_m * BLOCK_M
        col0 = pid_n * BLOCK_N
        acc = _masked_blocks(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), a_desc, b_desc, as_desc, bs_desc,
                             row0, col0, kb_s, whole0, start, end, SCALE_BLOCK)
        acc = fp8_tma_tile(a_desc, b_desc, row0, col0, as_ptr, bs_ptr, 0, 0, whole0, pairs,
                           as_desc, bs_desc, 0, row0, col0,
                           BLOCK_M, BLOCK_N, SCALE_BLOCK, WARP_SPECIALIZE, STAGES, True, True, acc)
        acc = _masked_blocks(acc, a_desc, b_desc, as_desc, bs_desc, row0, col0, whole0 + pairs, kb_e, start, end,
                             SCALE_BLOCK)
        offs_m = row0 + tl.arange(0, BLOCK_M)
        offs_n = col0 + tl.arange(0, BLOCK_N)
        mask = (offs_m < N)[:, None] & (offs_n < K)[None, :]
        c_ptrs = (c_ptr + e.to(tl.int64) * stride_ce + offs_m.to(tl.int64)[:, None] * stride_cn
                  + offs_n[None, :] * stride_ck)
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


def _cfg(bn: int, bk: int, warps: int, stages: int, group: int = 8) -> triton.Config:
    return triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "GROUP_N": group, "STAGES": stages},
                         num_warps=warps, num_stages=stages)


def fp8_grouped_wgrad_configs() -> list[triton.Config]:
    """As ``fp8_wgrad``'s, without the 128-row tiles: a group's partial edge blocks (done outside
    the pipelined loop) leave no registers for them (sm_90 ptxas: 128×128 tiles spill)."""
    return [_cfg(64, 128, 4, 4), _cfg(64, 128, 4, 3), _cfg(128, 64, 8, 4), _cfg(64, 256, 8, 3), _cfg(64, 64, 4, 5)]


def fp8_grouped_wgrad_tma_configs() -> list[triton.Config]:
    """The Hopper kernel's configs (BLOCK_M rows of dW[e], BLOCK_N columns; ``tma_pruner`` orders
    them by the wave model over E × tiles units): pipelined, 64 columns (the main loop's
    four-tile promotion). ``fp8_wgrad_tma_configs``' 128-column tiles spill at sm_90 in this
    kernel (64×128 and 128×128: up to 96 bytes; 8 to 32 even without the edge blocks: the
    expert's range beside a main loop already at 241 registers in ``fp8_wgrad``), and Triton
    3.6's warp specialisation pass fails on a ``warp_specialize`` loop between the edge blocks.
    None of these spills (``profiling audit --kernels fp8_grouped_wgrad_tma``)."""
    c = tma_config
    return [c(128, 64, 8, 4), c(128, 64, 8, 3), c(64, 64, 4, 4), c(64, 64, 4, 6)]


def _units(nargs: dict, bm: int, bn: int) -> tuple[int, int]:
    N, K, E = nargs["N"], nargs["K"], nargs["E"]
    return E * cdiv(N, bm) * cdiv(K, bn), min(bm, N)


_tuned = autotune("fp8_grouped_wgrad", fp8_grouped_wgrad_configs(), key=["N", "K", "SCALE_BLOCK", "M_BUCKET"])(
    _fp8_grouped_wgrad_kernel)
_tma_tuned = hopper_tuner(autotune(
    "fp8_grouped_wgrad_tma", fp8_grouped_wgrad_tma_configs(), key=["N", "K", "E", "SCALE_BLOCK", "M_BUCKET"],
    prune_configs_by={"early_config_prune": tma_pruner(_units, SMEM_BUDGET, "a_ptr")},
)(_fp8_grouped_wgrad_tma_kernel))


def tma_launch_args(out, dy_t, dy_t_s, x_t, x_t_s, offsets, block) -> tuple[tuple, dict]:
    """The Hopper kernel's arguments and constexprs (also what an sm_90 compile binds); the scales
    through ``fp8_wgrad.tma_scales``; ``offsets`` contiguous."""
    N, M = dy_t.shape
    K, E = x_t.shape[0], offsets.shape[0]
    a_s, b_s = tma_scales(dy_t_s, x_t_s)
    args = (dy_t, a_s, x_t, b_s, offsets, out, N, K, M, E, dy_t.stride(0), a_s.stride(0), x_t.stride(0),
            b_s.stride(0), *out.stride(), m_bucket(M))
    return args, dict(SCALE_BLOCK=block, BLOCK_E=next_power_of_2(E + 1))


def _launch_tma(out, dy_t, dy_t_s, x_t, x_t_s, offsets, block, config) -> None:
    N, K, E = dy_t.shape[0], x_t.shape[0], offsets.shape[0]
    sms = num_sms(dy_t.device)
    ensure_tma_allocator()
    args, consts = tma_launch_args(out, dy_t, dy_t_s, x_t, x_t_s, offsets, block)
    if config is None:
        _tma_tuned[lambda m: (min(E * cdiv(N, m["BLOCK_M"]) * cdiv(K, m["BLOCK_N"]), sms),)](*args, **consts)
        return
    meta = hopper_meta(check_config_keys(config, HOPPER_CONFIG_KEYS, "fp8_grouped_wgrad", "Hopper"))
    if meta["WARP_SPECIALIZE"]:
        raise ValueError(f"config: the Hopper fp8_grouped_wgrad kernel takes the pipelined schedule only "
                         f"(WARP_SPECIALIZE=False), got {dict(config)!r}")
    grid = (min(E * cdiv(N, meta["BLOCK_M"]) * cdiv(K, meta["BLOCK_N"]), sms),)
    _fp8_grouped_wgrad_tma_kernel[grid](*args, **consts, **meta)


def _launch_pointer(out, dy_t, dy_t_s, x_t, x_t_s, offsets, block, config) -> None:
    N, M = dy_t.shape
    K, E = x_t.shape[0], offsets.shape[0]
    args = (dy_t, dy_t_s, x_t, x_t_s, offsets, out, N, K, M, E, *dy_t.stride(), *dy_t_s.stride(), *x_t.stride(),
            *x_t_s.stride(), *out.stride(), m_bucket(M))
    consts = dict(SCALE_BLOCK=block, BLOCK_E=next_power_of_2(E + 1))
    kernel, meta = (_tuned, {}) if config is None else (
        _fp8_grouped_wgrad_kernel, {"GROUP_N": 8, **check_config_keys(config, POINTER_CONFIG_KEYS, "fp8_grouped_wgrad",
                                                                      "pointer")})
    kernel[lambda m: (E * cdiv(N, m["BLOCK_N"]) * cdiv(K, m["BLOCK_K"]),)](*args, **consts, **meta)


def launch_fp8_grouped_wgrad(out, dy_t, dy_t_s, x_t, x_t_s, offsets, block, config, capability=None) -> None:
    """dW into ``out`` (E, N, K), any strides, ``offsets`` contiguous: the kernel
    ``fp8_mainloop.fp8_path`` picks for ``capability`` (default: the device's) and the operands."""
    if out.numel() == 0:
        return
    cap = device_capability(dy_t.device) if capability is None else capability
    if fp8_path(cap, block, dy_t, x_t) == "tma":
        _launch_tma(out, dy_t, dy_t_s, x_t, x_t_s, offsets, block, config)
    else:
        _launch_pointer(out, dy_t, dy_t_s, x_t, x_t_s, offsets, block, config)


def _domain(dy_t, dy_t_s, x_t, x_t_s, offsets, out_dtype=torch.float32, block=128, *, validate=False) -> None:
    fp8_train_block("fp8_grouped_wgrad", block)
    kernel_rows("fp8_grouped_wgrad", "dy_t", dy_t.shape[1])


@kernel_op("fp8_grouped_wgrad", contract=check_fp8_grouped_wgrad, domain=_domain, fp8=True)
def fp8_grouped_wgrad(out, dy_t: Tensor, dy_t_s: Tensor, x_t: Tensor, x_t_s: Tensor, offsets: Tensor,
                      out_dtype: torch.dtype = torch.float32, block: int = 128, *, validate: bool = False,
                      config=None) -> Tensor:
    """The k-grouped weight gradient in FP8 (``moela.reference.fp8_grouped_wgrad``), without a host sync.

    Args:
        dy_t: (N, M), x_t: (K, M) float8_e4m3fn with (N, ceil(M/block)), (K, ceil(M/block)) float32
            scales: ``quant_act_t`` of the expert rows' output gradient and input.
        offsets: (E,) int32/int64 cumulative token ends (malformed values: the module docstring).
        validate: check the offsets' values (synchronises) and raise ValueError if malformed.
        config: an explicit config for the kernel the path rule picks (module docstring).
    Returns:
        (E, N, K) in out_dtype.

    Example::

        plan = make_routing(ids, E, align=128)            # expert segments start at block edges
        dw13 = fp8_grouped_wgrad(*quant_act_t(dh), *quant_act_t(xs), plan.offsets)  # (E, 2I, D)
    """
    if validate:
        check_offsets(offsets, dy_t.shape[1])
    launch_fp8_grouped_wgrad(out, dy_t, dy_t_s, x_t, x_t_s, offsets.contiguous(), block, config)
