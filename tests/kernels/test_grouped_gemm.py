"""kernels.grouped_gemm: forward, dX and dW against the reference; edge cases; checks; compile.

CPU tests run the kernels through the Triton interpreter at small shapes, with the default
configs (the ones the autotuner starts from) and with 16×16×16 blocks that give several
tiles and K steps. Both kernel families run: the pointer kernels (``SMALL`` configs, odd N/K,
float32) and the Hopper-native TMA kernels (``TMA`` configs and every default call whose
operands TMA takes: the interpreter counts as compute capability 9.0); ``_common.tma_path``,
the rule between them, is tested with explicit capabilities. Their sm_90 compiles (no spills,
shared memory, wgmma, TMA, warp specialisation, no synchronous load in the main loop) are
checked by ``profiling audit`` (tests/profiling/test_audit.py). Tolerances are derived: the kernel's error
against the float64 reference within 2× the error of the reference run in the inputs' dtype
(float32 accumulation and one rounding, what the kernel must match). The GPU tier runs DeepSeek
shapes.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import triton
from hypothesis import given, settings
from hypothesis import strategies as st
from moela_testing import assert_close_derived, nan_empty

from moela import reference
from moela.kernels import _common
from moela.kernels._common import uses_tma
from moela.kernels.group_schedule import group_schedule
from moela.kernels.grouped_gemm import FWD_PATHS, fwd_path, grouped_gemm, grouped_gemm_dw
from moela.kernels.grouped_gemm_tma import TMA_FWD_PATHS, config_smem, tma_configs, wave_efficiency
from moela.kernels.tl_helpers import SCHEDULE_BLOCK_M, SMEM_BUDGET, dot_precision
from moela.reference.grouped_gemm import group_ends

# triton 3.6's interpreter turns a runtime loop bound (here: group row ranges read from the
# device) into a Python int through a 1-element array, which numpy 2.3 deprecates.

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
DTYPE_IDS = ["bf16", "fp16", "fp32"]
SMALL = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}, num_warps=4, num_stages=2)
SMALL_DW = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_N": 2}, num_warps=4, num_stages=2)

# (group sizes, rows past the last group, N, K); N, K primes or not multiples of the blocks.
CASES = {
    "ragged-tail": ([3, 0, 5, 1], 2, 13, 17),
    "leading-empty": ([0, 0, 7], 0, 20, 33),
    "single": ([19], 0, 16, 32),
    "middle-only": ([0, 4, 0], 3, 13, 17),
    "prime-E": ([2, 3, 5, 7, 11], 0, 13, 17),
    "long-group": ([37, 2], 1, 31, 47),  # several M-tiles in one group
    "one-row-groups": ([1, 1, 0, 1, 1], 1, 13, 17),  # as many tiles as rows: the grid bound is tight
    "all-empty": ([0, 0, 0], 5, 13, 17),  # every row is in the tail
    "no-rows": ([0, 0], 0, 13, 17),  # M = 0
    "no-experts": ([], 4, 13, 17),  # E = 0: every row is in the tail
}


def _offsets(sizes, device) -> torch.Tensor:
    return torch.tensor(sizes, dtype=torch.int64).cumsum(0).to(device=device, dtype=torch.int32)


def _inputs(sizes, tail, N, K, dtype, device):
    M, E = sum(sizes) + tail, len(sizes)
    xs = torch.randn(M, K, dtype=dtype, device=device)
    w = torch.randn(E, N, K, dtype=dtype, device=device) * K**-0.5
    return xs, w, _offsets(sizes, device)


def _check_forward(out, xs, w, offsets, name="out"):
    ref_hi = reference.grouped_gemm(xs.double(), w.double(), offsets)
    ref_lo = reference.grouped_gemm(xs, w, offsets)
    assert out.dtype == xs.dtype and out.shape == ref_hi.shape
    assert_close_derived(out, ref_hi, ref_lo, name=name)
    end = int(offsets[-1]) if offsets.numel() else 0
    assert (out[end:] == 0).all(), "rows past offsets[-1] must be zero"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_forward_small_blocks(case, dtype, device):
    sizes, tail, N, K = CASES[case]
    xs, w, offsets = _inputs(sizes, tail, N, K, dtype, device)
    out = nan_empty((xs.shape[0], N), dtype, device)  # every element must be written
    assert grouped_gemm.launch(xs, w, offsets, out=out, config=SMALL) is out
    _check_forward(out, xs, w, offsets)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "sizes, tail, N, K",
    [
        # decode (<= 16 rows/expert): 16-row tiles, one group longer than a tile, 2 N-tiles, K tail
        ([1, 0, 3, 20, 2, 0], 1, 70, 130),
        # medium (<= 128 rows/expert): 64-row tiles, a group longer than a tile, K tail
        ([40, 0, 150], 3, 13, 70),
        # prefill: 128-row tiles, a group longer than a tile
        ([300], 2, 20, 64),
    ],
    ids=["decode", "medium", "prefill"],
)
def test_forward_default_configs(sizes, tail, N, K, dtype, device, request):
    xs, w, offsets = _inputs(sizes, tail, N, K, dtype, device)
    path = fwd_path(xs.shape[0], len(sizes))
    assert request.node.callspec.id.startswith(path), "the case must take the path it is named after"
    out = nan_empty((xs.shape[0], N), dtype, device)
    grouped_gemm.launch(xs, w, offsets, out=out)
    _check_forward(out, xs, w, offsets)


def test_strided_inputs_and_int64_offsets(device):
    sizes, N, K = [5, 0, 12, 3], 21, 19
    M, E = sum(sizes) + 2, len(sizes)
    xs = torch.randn(K + 3, M, dtype=torch.bfloat16, device=device)[:K].T  # (M, K), column-major
    w = torch.randn(E, K, N, dtype=torch.bfloat16, device=device).transpose(1, 2)  # (E, N, K), K-stride N
    out = nan_empty((M, N + 4), torch.bfloat16, device)[:, 2 : N + 2]  # a strided output view
    # a strided int64 view (the kernels index offsets flat: the launchers make them contiguous)
    offsets = torch.stack([_offsets(sizes, device).long(), torch.full((E,), M, device=device)], 1)[:, 0]
    assert offsets.stride() == (2,)
    grouped_gemm.launch(xs, w, offsets, out=out, config=SMALL)
    _check_forward(out, xs, w, offsets)
    dy = torch.randn(N + 1, M, dtype=torch.bfloat16, device=device)[:N].T  # (M, N), column-major
    dw = nan_empty((E, N, K), torch.bfloat16, device)
    grouped_gemm_dw.launch(xs, dy, offsets, out=dw, config=SMALL_DW)
    _check_grads(None, dw, xs, w, offsets, dy, sizes)


def test_public_op_and_validate(device):
    xs, w, offsets = _inputs([4, 0, 9], 1, 24, 40, torch.bfloat16, device)
    out = grouped_gemm(xs, w, offsets, validate=True)
    _check_forward(out, xs, w, offsets)
    assert torch.equal(torch.ops.moela.grouped_gemm(xs, w, offsets), out)


@given(sizes=st.lists(st.integers(0, 20), min_size=1, max_size=6), tail=st.integers(0, 3),
       N=st.integers(1, 40), K=st.integers(1, 40))
@settings(max_examples=8)
def test_forward_properties(sizes, tail, N, K):
    xs, w, offsets = _inputs(sizes, tail, N, K, torch.bfloat16, "cuda" if torch.cuda.is_available() else "cpu")
    out = grouped_gemm.launch(xs, w, offsets, config=SMALL)
    _check_forward(out, xs, w, offsets)


# ----------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------


def _reference_grads(xs, w, offsets, dy, dtype):
    """(dX, dW) of the reference by autograd, its inputs cast to ``dtype``."""
    x = xs.detach().to(dtype).requires_grad_()
    ww = w.detach().to(dtype).requires_grad_()
    reference.grouped_gemm(x, ww, offsets).backward(dy.to(dtype))
    return x.grad, ww.grad


def _check_grads(dx, dw, xs, w, offsets, dy, sizes):
    dx_hi, dw_hi = _reference_grads(xs, w, offsets, dy, torch.float64)
    dx_lo, dw_lo = _reference_grads(xs, w, offsets, dy, xs.dtype)
    if dx is not None:
        assert dx.dtype == xs.dtype
        assert_close_derived(dx, dx_hi, dx_lo, name="dX")
        assert (dx[sum(sizes):] == 0).all(), "rows of no group get zero gradient"
    assert dw.dtype == w.dtype
    assert_close_derived(dw, dw_hi, dw_lo, name="dW")
    for e, n in enumerate(sizes):
        if n == 0:
            assert (dw[e] == 0).all(), f"empty group {e} must get a zero gradient"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "sizes, tail, N, K",
    [([3, 0, 70, 1], 2, 13, 17), ([0, 0, 7], 0, 20, 33), ([0, 0], 3, 13, 17)],
    ids=["ragged-long-group", "leading-empty", "all-tail"],
)
def test_autograd_matches_reference(sizes, tail, N, K, dtype, device):
    xs, w, offsets = _inputs(sizes, tail, N, K, dtype, device)
    xs.requires_grad_()
    w.requires_grad_()
    dy = torch.randn(xs.shape[0], N, dtype=dtype, device=device)
    out = grouped_gemm(xs, w, offsets)
    _check_forward(out.detach(), xs.detach(), w.detach(), offsets)
    out.backward(dy)
    _check_grads(xs.grad, w.grad, xs.detach(), w.detach(), offsets, dy, sizes)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dw_small_blocks(dtype, device):
    sizes, N, K = [3, 0, 37, 1, 0, 20], 29, 35  # several N/K tiles, several row steps per group
    xs, w, offsets = _inputs(sizes, 2, N, K, dtype, device)
    dy = torch.randn(xs.shape[0], N, dtype=dtype, device=device)
    dw = nan_empty(w.shape, dtype, device)
    assert grouped_gemm_dw.launch(xs, dy, offsets, out=dw, config=SMALL_DW) is dw
    _check_grads(None, dw, xs, w, offsets, dy, sizes)


def test_dw_ignores_nonfinite_rows_of_other_groups(device):
    """dW[e] reduces over group e's rows only: inf in another group's (or the tail's) dY stays there."""
    sizes, N, K = [5, 0, 9], 20, 24
    xs, w, offsets = _inputs(sizes, 3, N, K, torch.bfloat16, device)
    dy = torch.randn(xs.shape[0], N, dtype=torch.bfloat16, device=device)
    dy[5:] = float("inf")  # group 2 and the tail
    xs[5:] = float("nan")
    dw = grouped_gemm_dw.launch(xs, dy, offsets, config=SMALL_DW)
    assert torch.isfinite(dw[0]).all() and (dw[1] == 0).all()
    _, dw_hi = _reference_grads(xs[:5], w, _offsets([5, 0, 0], device), dy[:5], torch.float64)
    _, dw_lo = _reference_grads(xs[:5], w, _offsets([5, 0, 0], device), dy[:5], torch.bfloat16)
    assert_close_derived(dw[0], dw_hi[0], dw_lo[0], name="dW[0]")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy's inf - inf, discarded
def test_dw_fp32_overflow_stays_inf(device):
    """The fp32 dW's compensated sum: a sum that overflows (an inf row, or finite rows whose sum
    passes float32's range) is inf, as the plain sum is, never inf - inf = NaN."""
    sizes, N, K = [40, 32], 16, 16  # several row blocks (16 rows) of SMALL_DW per group
    xs, _, offsets = _inputs(sizes, 0, N, K, torch.float32, device)
    xs = xs.abs() + 0.5
    dy = torch.rand(xs.shape[0], N, device=device) + 0.5
    dy[3] = float("inf")  # group 0: inf from its first row block on
    xs[40:], dy[40:] = 1.0, 1.5e37  # group 1: each 16-row block sums to 2.4e38, the two to inf
    dw = nan_empty((len(sizes), N, K), torch.float32, device)
    grouped_gemm_dw.launch(xs, dy, offsets, out=dw, config=SMALL_DW)
    assert torch.isposinf(dw).all(), f"{int(torch.isnan(dw).sum())} NaN, {int(torch.isfinite(dw).sum())} finite"


def test_backward_with_expanded_grad(device):
    """out.sum().backward() hands the op an expanded (stride 0) gradient."""
    sizes = [4, 6]
    xs, w, offsets = _inputs(sizes, 1, 12, 20, torch.float32, device)
    xs.requires_grad_()
    w.requires_grad_()
    grouped_gemm(xs, w, offsets).sum().backward()
    _check_grads(xs.grad, w.grad, xs.detach(), w.detach(), offsets, torch.ones(xs.shape[0], 12, device=device), sizes)


def _assert_tf32_close(out, exact, mag, n, name):
    """TF32 keeps 10 of float32's 23 mantissa bits (rounded or truncated: each operand within
    2**-10 relative), so each product is within 2**-9 + 2**-20 of exact (and exact in float32);
    float32 accumulation of n of them adds γ_n = n·u / (1 - n·u), u = 2**-24, of Σ|a·b| = mag."""
    gamma = n * 2.0**-24 / (1 - n * 2.0**-24)
    bound = ((2.0**-9 + 2.0**-20) * (1 + gamma) + gamma) * mag
    err = (out.detach().double() - exact).abs()
    assert not out.isnan().any(), f"{name}: NaN"
    assert (err <= bound).all(), f"{name}: max error {float(err.max()):.3g} past the TF32 bound"


@pytest.mark.parametrize("precision", ["tf32", "ieee"])
def test_fp32_follows_torch_fp32_precision_api(precision, device):
    """torch >= 2.9's ``torch.backends.cuda.matmul.fp32_precision``: once it is set, reading the
    legacy ``allow_tf32`` raises ("mix of the legacy and new APIs"), so the launchers read the new
    flag; the kernels use TF32 exactly when torch's matmuls may. "ieee": the usual derived check;
    "tf32": within the TF32 error bound (exact fp32 under the interpreter, which ignores it)."""
    matmul = torch.backends.cuda.matmul
    try:
        previous = matmul.fp32_precision
    except AttributeError:
        pytest.skip("torch < 2.9 has no fp32_precision API")
    sizes, N, K = [3, 0, 5], 13, 17
    xs, w, offsets = _inputs(sizes, 1, N, K, torch.float32, device)
    xs.requires_grad_()
    w.requires_grad_()
    dy = torch.randn(xs.shape[0], N, device=device)
    matmul.fp32_precision = precision
    try:
        assert dot_precision(torch.float32) == precision
        assert dot_precision(torch.bfloat16) == "tf32"  # Triton's default, ignored for 16-bit dots
        out = grouped_gemm(xs, w, offsets)
        out.backward(dy)
    finally:
        matmul.fp32_precision = previous
    x0, w0 = xs.detach(), w.detach()
    if precision == "ieee":
        _check_forward(out.detach(), x0, w0, offsets)
        _check_grads(xs.grad, w.grad, x0, w0, offsets, dy, sizes)
        return
    x64, w64, dy64 = x0.double(), w0.double(), dy.double()
    n = max(xs.shape[0], N, K)  # the longest reduction (K forward, N for dX, a group's rows for dW)
    _assert_tf32_close(out, reference.grouped_gemm(x64, w64, offsets),
                       reference.grouped_gemm(x64.abs(), w64.abs(), offsets), n, "out")
    _assert_tf32_close(xs.grad, reference.grouped_gemm(dy64, w64.transpose(1, 2), offsets),
                       reference.grouped_gemm(dy64.abs(), w64.abs().transpose(1, 2), offsets), n, "dX")
    _assert_tf32_close(w.grad, reference.grouped_gemm_dw(x64, dy64, offsets),
                       reference.grouped_gemm_dw(x64.abs(), dy64.abs(), offsets), n, "dW")


def test_torch_compile_fullgraph_forward_and_backward(device):
    """custom_op + explicit fakes trace whole (dynamo + AOTAutograd). On CPU the aot_eager
    backend keeps this test short (inductor's C++ build takes ~40 s here); the GPU tier
    compiles with inductor."""
    xs, w, offsets = _inputs([3, 0, 6], 1, 20, 24, torch.bfloat16, device)
    xs.requires_grad_()
    w.requires_grad_()

    def loss(xs, w, offsets):
        return grouped_gemm(xs, w, offsets).float().square().sum()

    backend = "inductor" if device == "cuda" else "aot_eager"
    compiled = torch.compile(loss, fullgraph=True, backend=backend)
    compiled(xs, w, offsets).backward()
    dx, dw = xs.grad, w.grad
    xs.grad = w.grad = None
    loss(xs, w, offsets).backward()
    torch.testing.assert_close(dx, xs.grad, rtol=0, atol=0)
    torch.testing.assert_close(dw, w.grad, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------


def test_rejects_bad_input(device):
    xs, w, off = _inputs([2, 3], 0, 3, 8, torch.float32, device)
    cases = [
        (TypeError, "xs", lambda: grouped_gemm(xs.tolist(), w, off)),
        (ValueError, "xs", lambda: grouped_gemm(xs[:, :7], w, off)),  # K mismatch
        (ValueError, "xs", lambda: grouped_gemm(xs[0], w, off)),  # rank
        (TypeError, "xs", lambda: grouped_gemm(xs.double(), w.double(), off)),  # fp64: no kernel
        (TypeError, "w", lambda: grouped_gemm(xs, w.half(), off)),
        (ValueError, "w", lambda: grouped_gemm(xs, w[0], off)),
        (ValueError, "offsets", lambda: grouped_gemm(xs, w, off[:1])),  # wrong length
        (ValueError, "offsets", lambda: grouped_gemm(xs, w, off[None])),  # wrong rank
        (TypeError, "offsets", lambda: grouped_gemm(xs, w, off.float())),
        (TypeError, "offsets", lambda: grouped_gemm(xs, w, off.short())),
        (ValueError, "offsets", lambda: grouped_gemm(xs, w, off.to("meta"))),  # wrong device
        (ValueError, "w", lambda: grouped_gemm(xs, w.to("meta"), off)),
        (ValueError, "out", lambda: grouped_gemm.launch(xs, w, off, out=torch.empty(5, 4, device=device))),
        (TypeError, "out", lambda: grouped_gemm.launch(xs, w, off, out=torch.empty(5, 3, device=device).half())),
        (TypeError, "dy", lambda: grouped_gemm_dw(xs, torch.randn(5, 3, device=device).half(), off)),
        (ValueError, "dy", lambda: grouped_gemm_dw(xs, torch.randn(4, 3, device=device), off)),
    ]
    for exc, name, call in cases:
        with pytest.raises(exc, match=name):
            call()


@pytest.mark.parametrize(
    "bad", [[3, 2], [2, 6], [-1, 5]], ids=["decreasing", "past-M", "negative"]
)
def test_validate_checks_offset_values(bad, device):
    xs, w, _ = _inputs([2, 3], 0, 3, 8, torch.float32, device)
    off = torch.tensor(bad, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="offsets"):
        grouped_gemm(xs, w, off, validate=True)
    with pytest.raises(ValueError, match="offsets"):
        grouped_gemm.launch(xs, w, off, validate=True)
    with pytest.raises(ValueError, match="offsets"):
        reference.grouped_gemm(xs, w, off, validate=True)
    # Without validate nothing is read on the host; the kernel stays in bounds and computes the
    # documented rule (offsets clamped into [0, M], running max), as the reference does.
    out = grouped_gemm.launch(xs, w, off, out=nan_empty((5, 3), torch.float32, device), config=SMALL)
    torch.testing.assert_close(out, reference.grouped_gemm(xs, w, off), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------
# GPU tier: DeepSeek shapes (skipped without CUDA)
# ----------------------------------------------------------------------------------------


def _gpu_problems() -> list[tuple[str, list[int], int, int]]:
    """(name, group sizes, N, K): DeepGEMM's grouped shapes and V3 expert GEMMs, from the
    profiling registry when it exists, else from the V3 config."""
    try:
        from moela.profiling.shapes import DEEPGEMM_GROUPED, V3, expert_gemms, group_sizes, moe_dims, routing_ids
    except ImportError:
        from moela.reference import ModelArgs

        args = ModelArgs.from_name("deepseek-v3")
        D, I, k = args.dim, args.moe_inter_dim, args.n_activated_experts
        E = 32  # the experts one GPU holds at 8-way expert parallelism
        gen = torch.Generator().manual_seed(0)
        probs = torch.full((E,), 1.0 / E)
        out = [("deepgemm 4x8192", [8192] * 4, 4096, 7168), ("deepgemm masked 4x256", [256] * 4, 7168, 2048)]
        for T in (16, 4096):
            ids = torch.multinomial(probs.expand(T, E), k, generator=gen)
            sizes = torch.bincount(ids.flatten(), minlength=E).tolist()
            out += [(f"v3 up T={T}", sizes, 2 * I, D), (f"v3 down T={T}", sizes, D, I)]
        return out
    dims = moe_dims(V3, "v3")
    out = [(label, [rows] * groups, n, k) for label, groups, rows, n, k in DEEPGEMM_GROUPED]
    E = 32  # the experts one GPU holds at 8-way expert parallelism (keeps the fp64 reference small)
    for T in (16, 4096):
        for load in ("balanced", "zipf"):
            sizes = group_sizes(routing_ids(T, E, dims.topk, load), E)
            out += [(f"v3 {label} T={T} {load}", sizes, n, k) for label, n, k in expert_gemms(dims)]
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("problem", _gpu_problems() if torch.cuda.is_available() else [], ids=lambda p: p[0])
def test_gpu_forward_deepseek_shapes(problem):
    _, sizes, N, K = problem
    xs, w, offsets = _inputs(sizes, 0, N, K, torch.bfloat16, "cuda")
    out = nan_empty((xs.shape[0], N), torch.bfloat16, "cuda")
    grouped_gemm.launch(xs, w, offsets, out=out)
    _check_forward(out, xs, w, offsets)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_gpu_gradients(dtype):
    sizes, N, K = [0, 1000, 37, 0, 2500, 5], 2048, 1536
    xs, w, offsets = _inputs(sizes, 7, N, K, dtype, "cuda")
    xs.requires_grad_()
    w.requires_grad_()
    dy = torch.randn(xs.shape[0], N, dtype=dtype, device="cuda")
    grouped_gemm(xs, w, offsets).backward(dy)
    _check_grads(xs.grad, w.grad, xs.detach(), w.detach(), offsets, dy, sizes)


@pytest.mark.gpu
def test_gpu_no_host_sync_and_cuda_graph():
    sizes, N, K = [3, 0, 200, 17], 512, 256
    xs, w, offsets = _inputs(sizes, 4, N, K, torch.bfloat16, "cuda")
    xs.requires_grad_()
    w.requires_grad_()
    dy = torch.randn(xs.shape[0], N, dtype=torch.bfloat16, device="cuda")
    grouped_gemm(xs, w, offsets).backward(dy)  # warm-up: autotuning syncs, once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        grouped_gemm(xs, w, offsets).backward(dy)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = grouped_gemm.launch(xs.detach(), w.detach(), offsets)
    offsets.copy_(_offsets([0, 100, 100, 20], "cuda"))  # new group sizes (224 rows), same graph
    graph.replay()
    _check_forward(out, xs.detach(), w.detach(), offsets)


def test_config_lists_and_pruning():
    """The GPU autotuner's candidates: each list pruned for 16-bit and fp32 inputs keeps configs
    that fit in shared memory (the interpreter never prunes: it runs configs[0])."""
    gg = importlib.import_module("moela.kernels.grouped_gemm")  # the package exports the op under that name

    class _Arg:  # what the pruner reads of x_ptr
        def __init__(self, size):
            self.size = size

        def element_size(self):
            return self.size

    mn, nk = ("BLOCK_M", "BLOCK_N"), ("BLOCK_N", "BLOCK_K")
    lists = [
        *((configs(), gg._pruner("BLOCK_K", mn, 64), "BLOCK_K", mn) for _, _, configs in FWD_PATHS),
        (gg._dw_configs(), gg._pruner("BLOCK_M", nk, 32), "BLOCK_M", nk),
    ]
    for configs, prune, red, (a, b) in lists:
        assert len({str(c) for c in configs}) == len(configs), "duplicate configs"
        for size in (2, 4):
            kept = prune(configs, {"x_ptr": _Arg(size)})
            assert kept
            for c in kept:
                k = c.kwargs
                assert c.num_stages * k[red] * (k[a] + k[b]) * size <= SMEM_BUDGET
                if size == 4:
                    assert k[a] * k[b] <= 64 * 32 * c.num_warps  # fp32: no register spills
    assert all(c.kwargs["BLOCK_M"] == 16 for c in gg._fwd_decode_configs())


# ----------------------------------------------------------------------------------------
# Hopper-native (TMA) kernels through the interpreter, and the rule that picks them
# ----------------------------------------------------------------------------------------


def _tma(bm=16, bn=16, bk=16, *, swap=False, ws=True) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 2, "SWAP_AB": swap,
                          "WARP_SPECIALIZE": ws}, num_warps=4, num_stages=2)


# Each TMA config at small blocks: warp-specialised (schedule table), swap-AB with and without it,
# and the in-kernel tile lookup (locate_m_tile).
TMA = {"ws": _tma(), "swap-ws": _tma(swap=True), "swap": _tma(bn=32, swap=True, ws=False), "plain": _tma(ws=False)}
TMA_DW = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_N": 2, "WARP_SPECIALIZE": True},
                       num_warps=4, num_stages=2)
# (group sizes, rows past the last group, N, K): N, K multiples of 8 (16-byte bf16 rows); N and K
# tails inside a block, groups that end inside a tile, empty groups.
TMA_CASES = {
    "ragged-tail": ([3, 0, 5, 1], 2, 24, 40),
    "leading-empty": ([0, 0, 7], 0, 40, 24),
    "long-group": ([37, 2], 1, 16, 24),
    "one-row-groups": ([1, 1, 0, 1, 1], 1, 24, 16),
    "all-tail": ([0, 0, 0], 5, 16, 16),
}


@pytest.mark.parametrize("config", list(TMA), ids=list(TMA))
@pytest.mark.parametrize("case", list(TMA_CASES), ids=list(TMA_CASES))
def test_tma_forward(case, config, device):
    sizes, tail, N, K = TMA_CASES[case]
    xs, w, offsets = _inputs(sizes, tail, N, K, torch.bfloat16, device)
    assert uses_tma(xs, w, xs.new_empty(xs.shape[0], N), config=TMA[config])
    out = nan_empty((xs.shape[0], N), torch.bfloat16, device)  # every element must be written
    assert grouped_gemm.launch(xs, w, offsets, out=out, config=TMA[config]) is out
    _check_forward(out, xs, w, offsets)


@pytest.mark.parametrize("config", list(TMA), ids=list(TMA))
def test_tma_forward_fp16_and_dx(config, device):
    """fp16, and dX: the forward kernel reading w as stored, (K, N) per expert (W_KN)."""
    sizes, tail, N, K = [3, 0, 21, 1], 2, 24, 40
    xs, w, offsets = _inputs(sizes, tail, N, K, torch.float16, device)
    out = grouped_gemm.launch(xs, w, offsets, out=nan_empty((xs.shape[0], N), torch.float16, device),
                              config=TMA[config])
    _check_forward(out, xs, w, offsets)
    dy = torch.randn(xs.shape[0], N, dtype=torch.float16, device=device)
    dx = grouped_gemm.launch(dy, w.transpose(1, 2), offsets, out=nan_empty(xs.shape, torch.float16, device),
                             config=TMA[config])
    _check_forward(dx, dy, w.transpose(1, 2), offsets, name="dX")


@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")  # group 2's own NaN
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_tma_dw(dtype, device):
    """dW on descriptors whose row extent ends at the group's end: the inf and NaN rows of the
    next group and of the tail never reach a sum; empty groups give zeros."""
    sizes, N, K = [3, 0, 37, 1, 0, 20], 24, 24  # N, K tails inside a block, several row steps
    xs, w, offsets = _inputs(sizes, 3, N, K, dtype, device)
    dy = torch.randn(xs.shape[0], N, dtype=dtype, device=device)
    dw = nan_empty(w.shape, dtype, device)
    assert grouped_gemm_dw.launch(xs, dy, offsets, out=dw, config=TMA_DW) is dw
    _check_grads(None, dw, xs, w, offsets, dy, sizes)
    dy[3:] = float("inf")  # group 2 onwards and the tail
    xs[3:] = float("nan")
    dw = grouped_gemm_dw.launch(xs, dy, offsets, out=nan_empty(w.shape, dtype, device), config=TMA_DW)
    assert torch.isfinite(dw[0]).all() and (dw[1] == 0).all()


def test_tma_default_configs_and_autograd(device):
    """Default calls on operands TMA takes run the TMA kernels (the interpreter counts as sm_90):
    forward (decode path: swap-AB), dX and dW through autograd."""
    sizes, tail, N, K = [3, 0, 9, 1], 2, 16, 32
    xs, w, offsets = _inputs(sizes, tail, N, K, torch.bfloat16, device)
    assert uses_tma(xs, w, xs.new_empty(xs.shape[0], N)) and fwd_path(xs.shape[0], len(sizes)) == "decode"
    xs.requires_grad_()
    w.requires_grad_()
    out = grouped_gemm(xs, w, offsets)
    _check_forward(out.detach(), xs.detach(), w.detach(), offsets)
    dy = torch.randn(xs.shape[0], N, dtype=torch.bfloat16, device=device)
    out.backward(dy)
    _check_grads(xs.grad, w.grad, xs.detach(), w.detach(), offsets, dy, sizes)


def test_tma_path_rule(monkeypatch, device):
    """_common.tma_path: Hopper or later, fp16/bf16, every operand 16-byte aligned with a unit
    inner stride, nothing empty, MOELA_TMA not 0."""
    xs, w, _ = _inputs([4, 4], 0, 16, 32, torch.bfloat16, device)
    out = xs.new_empty(8, 16)
    assert _common.tma_path((9, 0), xs, w, out) and _common.tma_path((10, 0), xs, w, out)
    assert not _common.tma_path((8, 9), xs, w, out)  # Ada: no TMA
    assert not _common.tma_path((9, 0), xs.float(), w.float(), out.float())  # float32: pointer kernels
    odd_k = _inputs([4, 4], 0, 16, 17, torch.bfloat16, device)
    assert not _common.tma_path((9, 0), odd_k[0], odd_k[1], out)  # 34-byte rows
    shifted = torch.empty(8 * 32 + 1, dtype=torch.bfloat16, device=device)[1:].view(8, 32)
    assert not _common.tma_path((9, 0), shifted, w, out)  # base 2 bytes past an aligned address
    assert not _common.tma_path((9, 0), xs, w.transpose(1, 2), out)  # no unit inner stride as given...
    assert _common.tma_path((9, 0), xs, w.transpose(1, 2).transpose(1, 2), out)  # ...but as stored (dX)
    assert not _common.tma_path((9, 0), xs[:0], w, out[:0])  # empty
    monkeypatch.setenv("MOELA_TMA", "0")
    assert not _common.tma_path((9, 0), xs, w, out)
    with pytest.raises(ValueError, match="config"):
        uses_tma(xs, w, out, config=TMA["ws"])  # a TMA config where the rule says no


@pytest.mark.parametrize("force", ["capability", "knob", "unaligned"])
def test_pointer_path_when_the_rule_says_so(force, monkeypatch, device):
    """Default calls take the pointer kernels on a pre-Hopper capability, with MOELA_TMA=0 and on
    operands TMA cannot take; the TMA launchers are never reached."""
    gg = importlib.import_module("moela.kernels.grouped_gemm")

    def refuse(*args, **kwargs):
        raise AssertionError("the TMA kernels ran")

    monkeypatch.setattr(gg, "grouped_gemm_fwd_tma", refuse)
    monkeypatch.setattr(gg, "grouped_gemm_dw_tma", refuse)
    K = 17 if force == "unaligned" else 32
    if force == "capability":
        monkeypatch.setattr(_common, "device_capability", lambda device: (8, 0))
    if force == "knob":
        monkeypatch.setenv("MOELA_TMA", "0")
    sizes = [3, 0, 6]
    xs, w, offsets = _inputs(sizes, 1, 16, K, torch.bfloat16, device)
    xs.requires_grad_()
    w.requires_grad_()
    out = grouped_gemm(xs, w, offsets)
    _check_forward(out.detach(), xs.detach(), w.detach(), offsets)
    dy = torch.randn(xs.shape[0], 16, dtype=torch.bfloat16, device=device)
    out.backward(dy)
    _check_grads(xs.grad, w.grad, xs.detach(), w.detach(), offsets, dy, sizes)


@pytest.mark.parametrize("offsets", [[3, 3, 40, 41], [-5, 7, 2, 99], [0, 0, 0, 0], [2**40, 1, 2, 3]],
                         ids=["ragged", "malformed", "all-empty", "huge-int64"])
def test_group_schedule_table(offsets, device):
    """The table: clamped, running-max group bounds (the tail last) and cumulative tile counts."""
    M = 50
    off = torch.tensor(offsets, dtype=torch.int64, device=device)
    table = group_schedule(off, M).cpu()
    ends = group_ends(off, M) + [M]
    starts = [0, *ends[:-1]]
    assert table[0].tolist() == starts and table[1].tolist() == ends
    for i, bm in enumerate(SCHEDULE_BLOCK_M):
        tiles = torch.tensor([-(-(e - s) // bm) for s, e in zip(starts, ends, strict=True)])
        assert table[2 + i].tolist() == tiles.cumsum(0).tolist(), bm


def test_tma_config_lists():
    """Warp specialisation only at num_warps=4 (Triton 3.6 ignores it elsewhere); every config fits
    Hopper's shared memory; swap-AB tiles are wgmma-shaped; the path names match."""
    assert tuple(TMA_FWD_PATHS) == tuple(name for name, _, _ in FWD_PATHS)
    for name in (*TMA_FWD_PATHS, "dw"):
        configs = tma_configs(name)
        assert len({str(c) for c in configs}) == len(configs), f"{name}: duplicate configs"
        for c in configs:
            k = c.kwargs
            assert not k["WARP_SPECIALIZE"] or c.num_warps == 4, c
            assert config_smem(c, 2, dw=name == "dw") <= 227 * 1024 - 2048, c
            if k.get("SWAP_AB"):
                assert k["BLOCK_N"] >= 64 and k["BLOCK_M"] % 8 == 0, c
            if k["WARP_SPECIALIZE"] and name != "dw":
                assert k["BLOCK_M"] in SCHEDULE_BLOCK_M, c
    assert all(c.kwargs["SWAP_AB"] and not c.kwargs["WARP_SPECIALIZE"] for c in tma_configs("decode"))
    assert wave_efficiency(264, 132) == 1.0 and wave_efficiency(133, 132) == pytest.approx(133 / 264)
