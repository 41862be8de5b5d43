"""Shared pieces of the op modules: random inputs, comparisons, torch-native capability checks."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from moela.reference import FP8_DTYPE

from ..registry import Check, Unavailable

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BLOCK = 128


# ------------------------------------------------------------------ random inputs
def generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def randn(shape: Sequence[int], dtype: torch.dtype, device: torch.device, gen: torch.Generator,
          std: float = 1.0) -> torch.Tensor:
    """Normal random values (never zeros) made on the device, in chunks along dim 0."""
    out = torch.empty(tuple(shape), dtype=dtype, device=device)
    if out.numel() == 0:
        return out
    rows_per_chunk = max(1, (1 << 27) // max(1, out[0].numel())) if out.ndim > 1 else out.shape[0]
    for r in range(0, out.shape[0], rows_per_chunk):
        chunk = out[r: r + rows_per_chunk]
        chunk.copy_(torch.randn(chunk.shape, dtype=torch.float32, device=device, generator=gen).mul_(std))
    return out


def rand_fp8(shape: Sequence[int], device: torch.device, gen: torch.Generator) -> torch.Tensor:
    """e4m3 values spread over the format's range, as a quantizer produces (|x| up to 448)."""
    out = torch.empty(tuple(shape), dtype=FP8_DTYPE, device=device)
    if out.numel() == 0:
        return out
    rows_per_chunk = max(1, (1 << 27) // max(1, out[0].numel())) if out.ndim > 1 else out.shape[0]
    for r in range(0, out.shape[0], rows_per_chunk):
        chunk = out[r: r + rows_per_chunk]
        x = torch.randn(chunk.shape, dtype=torch.float32, device=device, generator=gen).mul_(448 / 4)
        chunk.copy_(x.clamp_(-448, 448).to(FP8_DTYPE))
    return out


def rand_scale(shape: Sequence[int], device: torch.device, gen: torch.Generator, typical: float) -> torch.Tensor:
    """Positive float32 block scales around ``typical`` (0.5x..1.5x)."""
    return (torch.rand(tuple(shape), dtype=torch.float32, device=device, generator=gen) + 0.5) * typical


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def offsets_of(sizes: Sequence[int], device: torch.device) -> torch.Tensor:
    """(E,) int32 cumulative row ends of groups of ``sizes`` rows."""
    ends = torch.tensor(sizes, dtype=torch.int64).cumsum(0)
    return ends.to(torch.int32).to(device)


# ------------------------------------------------------------------ comparisons
def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for item in x for t in _tensors(item)]
    raise TypeError(f"expected tensors or tuples of tensors, got {type(x).__name__}")


def _shape_problem(out: list[torch.Tensor], ref: list[torch.Tensor]) -> str:
    if len(out) != len(ref):
        return f"{len(out)} outputs, expected {len(ref)}"
    for i, (o, r) in enumerate(zip(out, ref, strict=True)):
        if tuple(o.shape) != tuple(r.shape):
            return f"output {i}: shape {tuple(o.shape)}, expected {tuple(r.shape)}"
    return ""


#: Elements per float64 chunk of :func:`chunked_calc_diff` (a few hundred MB of temporaries).
CHUNK_ELEMENTS = 1 << 24


def chunked_calc_diff(o: torch.Tensor, r: torch.Tensor, chunk: int = CHUNK_ELEMENTS) -> tuple[float, int]:
    """``(calc_diff over the elements where r is finite, count of non-finite o where r is finite)``,
    accumulated chunk by chunk in float64: a (256, 4096, 7168) dW compares in place of the 56 GB
    that two whole float64 copies would take."""
    o, r = o.detach().reshape(-1), r.detach().reshape(-1)
    num = den = 0.0
    nonfinite = 0
    for start in range(0, o.numel(), chunk):
        o64, r64 = o[start:start + chunk].double(), r[start:start + chunk].double()
        finite = torch.isfinite(r64)
        nonfinite += int((~torch.isfinite(o64) & finite).sum())
        o64, r64 = o64[finite], r64[finite]
        num += float((o64 * r64).sum())
        den += float((o64 * o64 + r64 * r64).sum())
    return (0.0 if den == 0 else 1 - 2 * num / den), nonfinite


def close(tol: float) -> Callable[[Any, Any], Check]:
    """DeepGEMM's calc_diff over all outputs (float64); NaN or inf where the reference is finite fails."""

    def compare(out: Any, ref: Any) -> Check:
        outs, refs = _tensors(out), _tensors(ref)
        bad = _shape_problem(outs, refs)
        if bad:
            return Check("calc_diff", math.nan, tol, False, bad)
        worst, detail = 0.0, ""
        for o, r in zip(outs, refs, strict=True):
            diff, nonfinite = chunked_calc_diff(o, r)
            if nonfinite:
                return Check("calc_diff", math.nan, tol, False, f"{nonfinite} non-finite values")
            worst = max(worst, diff)
        return Check("calc_diff", worst, tol, worst <= tol, detail)

    return compare


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype.itemsize == 1 and t.is_floating_point() else t


def exact() -> Callable[[Any, Any], Check]:
    """Every output element equal, bit for bit (fp8 compared as bytes, NaN equal to NaN)."""

    def compare(out: Any, ref: Any) -> Check:
        outs, refs = _tensors(out), _tensors(ref)
        bad = _shape_problem(outs, refs)
        if bad:
            return Check("mismatches", math.nan, 0, False, bad)
        mismatches = 0
        for o, r in zip(outs, refs, strict=True):
            o, r = _bits(o), _bits(r.to(o.device))
            if o.dtype != r.dtype:
                return Check("mismatches", math.nan, 0, False, f"dtype {o.dtype}, expected {r.dtype}")
            same = (o == r) | (o.isnan() & r.isnan()) if o.is_floating_point() else o == r
            mismatches += int((~same).sum())
        return Check("mismatches", float(mismatches), 0, mismatches == 0)

    return compare


def ids_and_weights(tol: float) -> Callable[[Any, Any], Check]:
    """Routing outputs ``(topk_weights, topk_ids)``: ids equal, weights within calc_diff ``tol``."""
    weights_close = close(tol)

    def compare(out: Any, ref: Any) -> Check:
        (w, ids), (w_ref, ids_ref) = out, ref
        if tuple(ids.shape) != tuple(ids_ref.shape):
            return Check("id mismatches", math.nan, 0, False, f"ids shape {tuple(ids.shape)}")
        wrong = int((ids.long() != ids_ref.long().to(ids.device)).sum())
        if wrong:
            return Check("id mismatches", float(wrong), 0, False)
        return weights_close(w, w_ref)

    return compare


# ------------------------------------------------------------------ torch capabilities
def probed(fn: Callable[[], torch.Tensor], what: str) -> Callable[[], torch.Tensor]:
    """Call a torch-native baseline once while preparing it: where this torch or this GPU does
    not support the call (a shape constraint, a recipe the backend lacks), it becomes a skip
    with torch's own message instead of an error."""
    try:
        fn()
    except (RuntimeError, ValueError, NotImplementedError, TypeError) as e:
        text = str(e).strip().splitlines()
        raise Unavailable(f"{what}: {type(e).__name__}: {text[0] if text else ''}"[:300]) from e
    return fn


def cuda_capability(device: torch.device) -> tuple[int, int] | None:
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_capability(device)


def need_cuda(device: torch.device, at_least: tuple[int, int] = (0, 0), what: str = "this baseline",
              exactly: tuple[int, int] | None = None) -> None:
    """Raise :class:`Unavailable` unless ``device`` is a CUDA GPU of the given capability."""
    cc = cuda_capability(device)
    if cc is None:
        raise Unavailable(f"{what} needs a CUDA GPU")
    if exactly is not None and cc != exactly:
        raise Unavailable(f"{what} needs sm_{exactly[0]}{exactly[1]} (this GPU is sm_{cc[0]}{cc[1]})")
    if cc < at_least:
        raise Unavailable(f"{what} needs sm_{at_least[0]}{at_least[1]} or newer (this GPU is sm_{cc[0]}{cc[1]})")


def grouped_mm() -> tuple[Callable[..., torch.Tensor], str]:
    """torch's grouped GEMM: ``F.grouped_mm`` (newer torch) or ``torch._grouped_mm``."""
    fn = getattr(F, "grouped_mm", None)
    if fn is not None:
        return fn, "F.grouped_mm"
    fn = getattr(torch, "_grouped_mm", None)
    if fn is not None:
        return fn, "torch._grouped_mm"
    raise Unavailable(f"torch {torch.__version__} has neither F.grouped_mm nor torch._grouped_mm")


def grouped_mm_runner(xs: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> Callable[[], torch.Tensor]:
    """``xs (M, K) · w[e]ᵀ`` per group through torch's grouped GEMM (w passed as (E, K, N) view)."""
    fn, name = grouped_mm()
    wt = w.transpose(-2, -1)  # (E, K, N), column-major per expert: what the CUTLASS kernel wants
    return probed(lambda: fn(xs, wt, offs=offsets), name)


def expert_loop_runner(xs: torch.Tensor, w: torch.Tensor, sizes: Sequence[int]) -> Callable[[], torch.Tensor]:
    """A per-expert loop of ``torch.matmul`` (group sizes known on the host: no sync while timed)."""
    bounds, start = [], 0
    for e, n in enumerate(sizes):
        if n:
            bounds.append((e, start, start + n))
        start += n
    M, N = xs.shape[0], w.shape[1]

    def run() -> torch.Tensor:
        out = torch.empty(M, N, dtype=xs.dtype, device=xs.device)
        if start < M:
            out[start:].zero_()
        for e, s, t in bounds:
            torch.matmul(xs[s:t], w[e].T, out=out[s:t])
        return out

    return run


def pad_rows_fp8(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero rows appended so that rows % multiple == 0 (fp8 through a byte view)."""
    pad = -x.shape[0] % multiple
    if pad == 0:
        return x
    return F.pad(x.view(torch.uint8), (0, 0, 0, pad)).view(x.dtype)


def _blockwise_operands(a: torch.Tensor, a_s: torch.Tensor, b_s: torch.Tensor):
    """cuBLAS wants the activation scales M-major with M a multiple of 4 and the weight scales'
    K blocks a multiple of 4: a and a_s zero-padded, b_s as a (Kb4, Nb) view."""
    M = a.shape[0]
    a_p = pad_rows_fp8(a, 4)
    a_s_p = F.pad(a_s, (0, 0, 0, a_p.shape[0] - M)).t().contiguous().t()  # (Mp, Kb), M-major
    kb = b_s.shape[1]
    return a_p, a_s_p, F.pad(b_s, (0, -kb % 4)).t()


def _blockwise_raw(device: torch.device, K: int, out_dtype: torch.dtype):
    """The cuBLAS block-wise FP8 call on operands padded by ``_blockwise_operands``."""
    need_cuda(device, what="cuBLAS block-wise FP8 (F.scaled_mm BlockWise1x128/128x128)", exactly=(9, 0))
    if K % BLOCK:
        raise Unavailable(f"cuBLAS block-wise FP8 needs K a multiple of {BLOCK} (K={K})")
    ScalingType = getattr(F, "ScalingType", None)
    if getattr(F, "scaled_mm", None) is not None and ScalingType is not None:
        bw1, bw128 = ScalingType.BlockWise1x128, ScalingType.BlockWise128x128
        return lambda a_p, a_s_p, b, b_s_p: F.scaled_mm(a_p, b.t(), a_s_p, bw1, b_s_p, bw128, output_dtype=out_dtype)
    if getattr(torch, "_scaled_mm", None) is None:
        raise Unavailable(f"torch {torch.__version__} has neither F.scaled_mm nor torch._scaled_mm")
    return lambda a_p, a_s_p, b, b_s_p: torch._scaled_mm(a_p, b.t(), scale_a=a_s_p, scale_b=b_s_p, out_dtype=out_dtype)


def scaled_mm_blockwise_fn(device: torch.device, K: int, out_dtype: torch.dtype
                           ) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(a, a_s, b, b_s) -> a·bᵀ`` through cuBLAS block-wise FP8 (1x128 activations x 128x128
    weights), the padding cuBLAS needs done inside the call; raises :class:`Unavailable` where
    this torch or GPU lacks it."""
    raw = _blockwise_raw(device, K, out_dtype)
    def call(a, a_s, b, b_s):
        a_p, a_s_p, b_s_p = _blockwise_operands(a, a_s, b_s)
        return raw(a_p, a_s_p, b, b_s_p)[:a.shape[0]]

    return call


def scaled_mm_blockwise_runner(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
                               out_dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    """cuBLAS block-wise FP8 GEMM of fixed operands, padded outside the timed region."""
    raw = _blockwise_raw(a.device, a.shape[1], out_dtype)
    a_p, a_s_p, b_s_p = _blockwise_operands(a, a_s, b_s)
    M = a.shape[0]
    return probed(lambda: raw(a_p, a_s_p, b, b_s_p)[:M], "F.scaled_mm block-wise")


def scaled_mm_tensorwise_runner(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    """``torch._scaled_mm`` with one scale per tensor: the fastest FP8 GEMM torch offers."""
    if a.device.type == "cuda":
        need_cuda(a.device, at_least=(8, 9), what="FP8 torch._scaled_mm")
    if getattr(torch, "_scaled_mm", None) is None:
        raise Unavailable(f"torch {torch.__version__} has no torch._scaled_mm")
    one = torch.ones((), dtype=torch.float32, device=a.device)
    return probed(lambda: torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one, out_dtype=out_dtype),
                  "torch._scaled_mm")
