"""Hopper-native kernels of the grouped GEMM: TMA loads, persistent tiles, warp specialisation.

Legend: M rows grouped by expert, K input features, N output features, E experts, ``offsets (E,)``
cumulative row ends (``kernels.grouped_gemm``'s contract: rows past ``offsets[E-1]`` give zeros).

    out[r] = x[r] · w[e]ᵀ            _grouped_gemm_tma_kernel, w[e] stored (N, K)
    dX[r]  = dY[r] · w[e]            the same kernel, w[e] stored (K, N) (W_KN: the forward's w as it is)
    dW[e]  = dY[rows e]ᵀ · x[rows e]  _grouped_gemm_dw_tma_kernel

How. A persistent grid of ``min(SMs, tiles)`` programs walks the output tiles with a stride of
the grid (``tl.range(..., warp_specialize=...)``): at ``num_warps=4`` Triton 3.6 splits the loop
into one TMA producer warpgroup and two consumer warpgroups (12 warps, ``setmaxnreg``) that each
own half of the tile, so one tile's epilogue overlaps the next tile's loads. Tiles are ordered by
an L2 swizzle (``tl_helpers.grouped_tile_order``: GROUP_M M-tiles walk the N-tiles together, so
an expert's weight tile is read from HBM about once).

- Loads: tensor descriptors. x is one (M, K) descriptor: a tile starting at a group's first row
  may read rows of the next group, whose products are never stored (out[r] depends on x[r]
  only). w is one (E, N, K) descriptor (or (E, K, N) for dX): an expert's N and K tails are
  zero-filled by TMA, never another expert's weights. dW reduces over a group's rows, so its
  dY and x descriptors are made on the device per tile with the group's end as their row
  extent: TMA zero-fills the rows past the group (a row of another group may hold inf).
- Stores: TMA from shared memory. The forward's output descriptor is made per tile with the
  group's end as its row extent, so the store clips at the group's end (the next group's rows
  belong to another tile); dW's output tile goes through a descriptor of its expert's (N, K)
  matrix, made per tile too. (Masked pointer stores of a 256×128 tile hold a 64-bit address per
  element in registers: they spill.)
- Tile lookup without a host sync: warp-specialised configs read the table of
  ``kernels.group_schedule`` (one extra single-program launch; the real number of M-tiles
  bounds their loop); the others (decode) recompute it per tile from ``offsets``
  (``tl_helpers.locate_m_tile``) and loop to the shape bound ``min(cdiv(M, BLOCK_M) + E, M)``,
  skipping the empty tiles at its end.
- SWAP_AB (decode and medium groups): the tile computes outᵀ = w[e] · xᵀ, so BLOCK_N weight rows
  fill wgmma's 64-row M and the few token rows its N (8..256); the output is stored transposed.
  Decode is weight-bandwidth bound: swap-AB reads each weight tile once per token tile with
  wgmma and TMA, while split-K would add a float32 partial-sum pass (or atomics) for no fewer
  weight bytes.

Configs come from functions per path (decode / medium / prefill, chosen by
``kernels.grouped_gemm.fwd_path``) and dW, keyed on N, K, the weight layout and M's bucket;
:func:`_pruner` keeps those within the device's shared memory and orders them by how evenly
their tiles fill the SMs (waves), best first.
"""

from __future__ import annotations

import functools

import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    autotune,
    cdiv,
    ensure_tma_allocator,
    m_bucket,
    next_power_of_2,
    num_sms,
    smem_per_block,
)
from .group_schedule import group_schedule
from .tl_helpers import grouped_tile_order, locate_m_tile, schedule_row, scheduled_m_tile

__all__ = ["TMA_FWD_PATHS", "grouped_gemm_fwd_tma", "grouped_gemm_dw_tma", "tma_configs", "config_smem",
           "wave_efficiency"]

#: Groups a warp-specialised program scans per step of its tile lookup (a reduction whose result
#: both partitions need must stay under 128 lanes).
SCHEDULE_CHUNK = tl.constexpr(64)


# ----------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------


def _cfg(bm: int, bn: int, bk: int, *, swap: bool = False, ws: bool = True, warps: int = 4, stages: int = 3,
         group: int = 8, group_name: str = "GROUP_M") -> triton.Config:
    kw = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, group_name: group, "WARP_SPECIALIZE": ws}
    if group_name == "GROUP_M":
        kw["SWAP_AB"] = swap
    return triton.Config(kw, num_warps=warps, num_stages=stages)


def _prefill_configs() -> list[triton.Config]:
    """Compute-bound tiles. Warp-specialised configs run at num_warps=4 (Triton adds the two
    consumer warpgroups); 8-warp ones are the cooperative (non-specialised) alternative."""
    return [
        _cfg(128, 256, 64),  # DeepGEMM/CUTLASS's H100 tile: two consumers of 64×256 (128 acc regs each)
        _cfg(128, 128, 64, stages=4),
        _cfg(256, 128, 64),
        _cfg(64, 128, 64, stages=4),  # small or ragged groups, and problems with few tiles (waves)
        _cfg(128, 64, 64, stages=4),
        _cfg(128, 256, 64, ws=False, warps=8),
        _cfg(128, 128, 64, ws=False, warps=8, stages=4),
    ]


def _medium_configs() -> list[triton.Config]:
    """17-128 rows per expert: weight-bandwidth bound (a weight byte feeds at most ~128 FLOP,
    under the H200's ~200 FLOP/B ridge): tiles that cover a whole group, each weight tile read once."""
    return [
        _cfg(64, 128, 128, swap=True, stages=4),  # 64 token rows as wgmma's N, 128 weight rows as its M
        _cfg(64, 128, 64, stages=4),
        _cfg(128, 128, 64, swap=True, stages=4),
        _cfg(128, 128, 64, stages=4),
        _cfg(32, 128, 128, swap=True, ws=False, stages=4),
    ]


def _decode_configs() -> list[triton.Config]:
    """At most 16 rows per expert: streaming weights. Swap-AB (16 or 32 token rows as wgmma's N),
    long TMA K steps, deep pipelines; not warp-specialised, so no schedule launch precedes them."""
    return [
        _cfg(16, 128, 128, swap=True, ws=False, stages=4),
        _cfg(16, 64, 128, swap=True, ws=False, stages=4),  # 82 KB: two CTAs per SM
        _cfg(16, 128, 128, swap=True, ws=False, stages=6),
        _cfg(16, 64, 256, swap=True, ws=False, stages=4),
        _cfg(32, 128, 128, swap=True, ws=False, stages=4),
    ]


def _dw_configs() -> list[triton.Config]:
    """dW tiles (BLOCK_N × BLOCK_K of dw[e]) reducing over BLOCK_M rows per step. 256×128 tiles read
    dY K/128 times and x N/256 times: ~25 % less L2 traffic than 128×128 at DeepSeek's shapes."""
    return [
        _cfg(64, 256, 128, group_name="GROUP_N"),  # two consumers of 128×128
        _cfg(64, 128, 128, stages=4, group_name="GROUP_N"),
        _cfg(32, 256, 128, stages=4, group_name="GROUP_N"),  # small groups
        _cfg(64, 256, 128, ws=False, warps=8, group_name="GROUP_N"),
    ]


#: Forward paths (names of ``kernels.grouped_gemm.FWD_PATHS``) -> config lists.
TMA_FWD_PATHS = {"decode": _decode_configs, "medium": _medium_configs, "prefill": _prefill_configs}


def tma_configs(name: str) -> list[triton.Config]:
    """The config list of a forward path, or ``"dw"``."""
    return _dw_configs() if name == "dw" else TMA_FWD_PATHS[name]()


def config_smem(c: triton.Config, size: int, dw: bool = False) -> int:
    """Shared memory of a config: its TMA pipeline (num_stages buffers of both operand tiles) and
    the epilogue's staging tile."""
    k = c.kwargs
    if dw:
        return (c.num_stages * k["BLOCK_M"] * (k["BLOCK_N"] + k["BLOCK_K"]) + k["BLOCK_N"] * k["BLOCK_K"]) * size
    return (c.num_stages * k["BLOCK_K"] * (k["BLOCK_M"] + k["BLOCK_N"]) + k["BLOCK_M"] * k["BLOCK_N"]) * size


def wave_efficiency(tiles: int, sms: int) -> float:
    """How full the persistent grid's rounds are: tiles / (SMs · rounds)."""
    return tiles / (sms * cdiv(tiles, sms)) if tiles > 0 else 1.0


def _tile_estimate(c: triton.Config, args: dict, dw: bool) -> int:
    k = c.kwargs
    if dw:
        return args["E"] * cdiv(args["N"], k["BLOCK_N"]) * cdiv(args["K"], k["BLOCK_K"])
    M, E = args["M"], args["E"]
    # cdiv(M, BLOCK_M) for groups of whole tiles; ragged groups add about half a tile each
    return min(cdiv(M, k["BLOCK_M"]) + E // 2, M) * cdiv(args["N"], k["BLOCK_N"])


def _pruner(dw: bool):
    """early_config_prune: configs within the device's shared memory (2 KB kept for barriers and
    descriptors), warp specialisation only at num_warps=4 (Triton 3.6 ignores it elsewhere), then
    ordered by wave efficiency in steps of 0.1 (stable: the list's order among equals)."""

    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        x = named_args["x_ptr"]
        budget = smem_per_block(x.device) - 2048
        sms = num_sms(x.device)
        kept = [c for c in configs if config_smem(c, x.element_size(), dw) <= budget
                and (not c.kwargs["WARP_SPECIALIZE"] or c.num_warps == 4)]
        kept = kept or [min(configs, key=lambda c: config_smem(c, x.element_size(), dw))]
        return sorted(kept, key=lambda c: -round(10 * wave_efficiency(_tile_estimate(c, named_args, dw), sms)))

    return prune


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["M"])
def _grouped_gemm_tma_kernel(
    x_ptr, w_ptr, offsets_ptr, table_ptr, out_ptr,
    M, N, K, E,
    stride_xm, stride_we, stride_wr, stride_om,
    M_BUCKET,  # autotune key only: _common.m_bucket(M)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SWAP_AB: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, W_KN: tl.constexpr,
    BLOCK_E: tl.constexpr, NUM_SMS: tl.constexpr,
):
    """out[r, :] = x[r, :] · W_eᵀ for the rows r of group e; zeros for rows of no group.

    x (M, K) and out (M, N): unit inner stride, 16-byte aligned rows. W_e is w[e] (N, K) with
    row stride stride_wr, or (W_KN) w[e] stored (K, N) — dX's weight. table: group_schedule's
    table (read only when WARP_SPECIALIZE). grid: (min(NUM_SMS, M-tile bound × N-tiles),).
    """
    num_pid_n = tl.cdiv(N, BLOCK_N)
    if WARP_SPECIALIZE:
        num_m = tl.load(table_ptr + schedule_row(BLOCK_M) * (E + 1) + E)  # the real M-tiles (group_schedule)
    else:
        num_m = tl.minimum(tl.cdiv(M, BLOCK_M) + E, M)  # a bound (kernels.grouped_gemm's docstring)
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[stride_xm, 1], block_shape=[BLOCK_M, BLOCK_K])
    if W_KN:
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[E, K, N], strides=[stride_we, stride_wr, 1],
                                           block_shape=[1, BLOCK_K, BLOCK_N])
    else:
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[E, N, K], strides=[stride_we, stride_wr, 1],
                                           block_shape=[1, BLOCK_N, BLOCK_K])
    k_steps = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_m * num_pid_n, NUM_SMS, flatten=False,
                         warp_specialize=WARP_SPECIALIZE):
        tile_m, pid_n = grouped_tile_order(tile, num_m, num_pid_n, GROUP_M)
        if WARP_SPECIALIZE:
            group, row_start, row_end = scheduled_m_tile(table_ptr, tile_m, E, BLOCK_M, SCHEDULE_CHUNK)
        else:
            group, row_start, row_end = locate_m_tile(offsets_ptr, tile_m, M, E, BLOCK_M, BLOCK_E)
        n0 = pid_n * BLOCK_N
        expert = tl.minimum(group, E - 1)
        steps = tl.where((group < E) & (row_start < row_end), k_steps, 0)  # the tail: zeros, no K step
        if SWAP_AB:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ks in range(steps):
            a = x_desc.load([row_start, ks * BLOCK_K])
            if W_KN:
                b = w_desc.load([expert, ks * BLOCK_K, n0]).reshape(BLOCK_K, BLOCK_N)
                if SWAP_AB:
                    acc = tl.dot(b.T, a.T, acc)
                else:
                    acc = tl.dot(a, b, acc)
            else:
                b = w_desc.load([expert, n0, ks * BLOCK_K]).reshape(BLOCK_N, BLOCK_K)
                if SWAP_AB:
                    acc = tl.dot(b, a.T, acc)
                else:
                    acc = tl.dot(a, b.T, acc)
        if SWAP_AB:
            res = acc.T.to(out_ptr.dtype.element_ty)
        else:
            res = acc.to(out_ptr.dtype.element_ty)
        # rows [row_start, row_end) are this tile's: the descriptor ends at the group's end
        out_desc = tl.make_tensor_descriptor(out_ptr, shape=[tl.maximum(row_end, 1), N], strides=[stride_om, 1],
                                             block_shape=[BLOCK_M, BLOCK_N])
        if WARP_SPECIALIZE:  # every scheduled tile holds rows
            out_desc.store([row_start, n0], res)
        elif row_start < row_end:  # the shape bound's tiles past the last are empty
            out_desc.store([row_start, n0], res)


@triton.jit(do_not_specialize=["M"])
def _grouped_gemm_dw_tma_kernel(
    x_ptr, dy_ptr, table_ptr, dw_ptr,
    M, N, K, E,
    stride_xm, stride_dym, stride_dwe, stride_dwn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr, NUM_SMS: tl.constexpr,
):
    """dw[e] = dy[rows of e]ᵀ · x[rows of e] (zeros for an empty group).

    grid: (min(NUM_SMS, E × N-tiles × K-tiles),). Tiles are ordered expert by expert (an expert's
    dY and x slabs stay in L2 while its tiles run), GROUP_N swizzled within one. Group rows come
    from group_schedule's table (rows 0 and 1).
    """
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_k = tl.cdiv(K, BLOCK_K)
    per_expert = num_pid_n * num_pid_k
    for tile in tl.range(tl.program_id(0), E * per_expert, NUM_SMS, flatten=False,
                         warp_specialize=WARP_SPECIALIZE):
        e = tile // per_expert
        pid_n, pid_k = grouped_tile_order(tile % per_expert, num_pid_n, num_pid_k, GROUP_N)
        start = tl.load(table_ptr + e)
        end = tl.load(table_ptr + (E + 1) + e)
        # rows past the group's end read as zeros (descriptors made on the device, per tile)
        dy_desc = tl.make_tensor_descriptor(dy_ptr, shape=[tl.maximum(end, 1), N], strides=[stride_dym, 1],
                                            block_shape=[BLOCK_M, BLOCK_N])
        x_desc = tl.make_tensor_descriptor(x_ptr, shape=[tl.maximum(end, 1), K], strides=[stride_xm, 1],
                                           block_shape=[BLOCK_M, BLOCK_K])
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for m0 in range(start, end, BLOCK_M):
            dy = dy_desc.load([m0, pid_n * BLOCK_N])
            x = x_desc.load([m0, pid_k * BLOCK_K])
            acc = tl.dot(dy.T, x, acc)
        # dw[e] as its own (N, K) descriptor: the N and K tails clip there (a 3-D descriptor's store
        # needs a reshape of the accumulator that Triton 3.6's warp specialisation cannot split)
        dw_desc = tl.make_tensor_descriptor(dw_ptr + e.to(tl.int64) * stride_dwe, shape=[N, K], strides=[stride_dwn, 1],
                                            block_shape=[BLOCK_N, BLOCK_K])
        dw_desc.store([pid_n * BLOCK_N, pid_k * BLOCK_K], acc.to(dw_ptr.dtype.element_ty))


_fwd_tuned = {
    name: autotune(
        f"grouped_gemm_tma_{name}", configs(), key=["N", "K", "W_KN", "M_BUCKET"],
        prune_configs_by={"early_config_prune": _pruner(dw=False)},
    )(_grouped_gemm_tma_kernel)
    for name, configs in TMA_FWD_PATHS.items()
}
_dw_tuned = autotune(
    "grouped_gemm_dw_tma", _dw_configs(), key=["N", "K"],
    prune_configs_by={"early_config_prune": _pruner(dw=True)},
)(_grouped_gemm_dw_tma_kernel)


# ----------------------------------------------------------------------------------------
# Launchers (called by kernels.grouped_gemm after its path rule chose these kernels)
# ----------------------------------------------------------------------------------------


def _uses_ws(kernel, config: triton.Config | None) -> bool:
    """Can this launch run a warp-specialised config (which reads the group schedule)?"""
    if config is not None:
        return bool(config.kwargs.get("WARP_SPECIALIZE"))
    return _tuner_uses_ws(kernel)


@functools.cache
def _tuner_uses_ws(kernel) -> bool:
    return any(c.kwargs.get("WARP_SPECIALIZE") for c in kernel.configs)


def _grid(total_tiles):
    return lambda meta: (max(1, min(meta["NUM_SMS"], total_tiles(meta))),)


def grouped_gemm_fwd_tma(out: Tensor, xs: Tensor, w: Tensor, offsets: Tensor, path: str,
                         config: triton.Config | None = None) -> None:
    """out (M, N) = the grouped product of xs (M, K) and w (E, N, K) (any view whose per-expert
    matrix has a unit inner stride: (N, K) row-major, or the (K, N) storage of dX's transposed
    view). Operands must pass ``_common.tma_path``; M, N, K, E >= 1."""
    M, K = xs.shape
    E, N, _ = w.shape
    sw = w.stride()
    w_kn = sw[2] != 1  # dX: w[e] is stored (K, N)
    kernel = _fwd_tuned[path] if config is None else _grouped_gemm_tma_kernel
    offsets = offsets.contiguous()
    table = group_schedule(offsets, M) if _uses_ws(kernel, config) else offsets
    ensure_tma_allocator()
    sms = num_sms(xs.device)
    extra = {} if config is None else config.all_kwargs()
    kernel[_grid(lambda m: min(cdiv(M, m["BLOCK_M"]) + E, M) * cdiv(N, m["BLOCK_N"]))](
        xs, w, offsets, table, out, M, N, K, E,
        xs.stride()[0], sw[0], sw[2] if w_kn else sw[1], out.stride()[0],
        m_bucket(M), W_KN=w_kn, BLOCK_E=next_power_of_2(E + 1), NUM_SMS=sms, **extra,
    )


def grouped_gemm_dw_tma(out: Tensor, xs: Tensor, dy: Tensor, offsets: Tensor,
                        config: triton.Config | None = None) -> None:
    """out (E, N, K) = dW of the grouped product: xs (M, K), dy (M, N), offsets (E,); operands and
    out pass ``_common.tma_path``."""
    M, K = xs.shape
    N, E = dy.shape[1], offsets.shape[0]
    kernel = _dw_tuned if config is None else _grouped_gemm_dw_tma_kernel
    table = group_schedule(offsets, M)
    ensure_tma_allocator()
    extra = {} if config is None else config.all_kwargs()
    kernel[_grid(lambda m: E * cdiv(N, m["BLOCK_N"]) * cdiv(K, m["BLOCK_K"]))](
        xs, dy, table, out, M, N, K, E,
        xs.stride(0), dy.stride(0), out.stride(0), out.stride(1),
        NUM_SMS=num_sms(xs.device), **extra,
    )
