"""The eager fast path: public ops call their launchers directly when nothing needs the torch.library op.

``run_direct`` decides; these tests pin down both sides of that decision: plain eager inference
never enters the custom ops (the MoE layer included), and everything that needs them (autograd,
dispatch modes, fake/meta tensors, functorch, compile) still goes through them.
"""

import pytest
import torch
from torch._library.custom_ops import CustomOpDef
from torch.utils._python_dispatch import TorchDispatchMode

import moela.kernels as K
from moela.kernels._common import direct_path_probes, run_direct
from moela.model import MoE
from moela.reference import ModelArgs


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def ops_forbidden(monkeypatch):
    """Every torch.library custom op raises when called: only launchers may run."""
    def raiser(self, *args, **kwargs):
        raise AssertionError(f"{self._qualname} was called: the eager fast path was not taken")

    monkeypatch.setattr(CustomOpDef, "__call__", raiser)


def test_the_private_torch_probes_exist():
    """run_direct reads private torch state; a torch without one of the probes would silently send
    every call through the custom ops (no error, only lost speed): fail here instead."""
    assert all(direct_path_probes().values()), direct_path_probes()
    assert run_direct(torch.randn(2))


def test_every_registered_op_is_made_by_the_factory():
    """One registry: each op's public function, launch and torch.library op belong together."""
    ops = K.registered_ops()
    assert {"grouped_gemm", "route", "make_routing", "permute", "unpermute", "mla_decode", "quant_act"} <= set(ops)
    for name, op in ops.items():
        assert getattr(torch.ops.moela, name).default is not None
        assert op.public.kernel_op is op and op.public.launch is op.launch


def test_run_direct_decision():
    x = torch.randn(3, 4)
    p = torch.nn.Parameter(torch.randn(3, 4))
    assert run_direct(x, None, torch.zeros(3, dtype=torch.int32))
    with torch.no_grad():
        assert run_direct(x, p)  # a Parameter is a plain tensor; no grad mode, nothing to record
    assert not run_direct(x, p)  # grad mode and an input that requires grad: autograd needs the op
    with torch.inference_mode():
        assert run_direct(x, p)
    assert not run_direct(x.to("meta"))  # meta tensors: the op's fake implementation
    assert not run_direct(x, "not a tensor")  # the op's checks name it
    with _OpLog():
        assert not run_direct(x)  # dispatch modes (FlopCounterMode, FakeTensorMode...) must see the op
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
    assert not run_direct(fake)  # a tensor subclass
    seen = []
    torch.func.vmap(lambda t: seen.append(run_direct(t)) or t)(x)
    assert seen == [False]


def test_the_eager_moe_layer_never_enters_a_custom_op(ops_forbidden, device):
    args = ModelArgs.from_name("tiny", dim=32, moe_inter_dim=16, n_routed_experts=8, n_activated_experts=2,
                               n_expert_groups=2, n_limited_groups=1, backend="triton")
    layer = MoE(args).to(device)
    x = torch.randn(5, 32, device=device)
    with torch.no_grad():
        y = layer(x)
    assert torch.isfinite(y).all()
    with pytest.raises(AssertionError, match="fast path was not taken"):  # training: autograd needs the ops
        layer(x.requires_grad_())


def test_the_eager_fp8_layer_never_enters_a_custom_op(ops_forbidden, device):
    args = ModelArgs.from_name("tiny", dim=128, moe_inter_dim=128, n_routed_experts=4, n_activated_experts=2,
                               n_expert_groups=1, n_limited_groups=1, backend="triton", dtype="fp8")
    layer = MoE(args).to(device, torch.bfloat16)
    x = torch.randn(3, 128, dtype=torch.bfloat16, device=device)
    with torch.no_grad():
        y = layer(x)
    assert torch.isfinite(y.float()).all()


def test_every_public_op_takes_the_direct_path_in_eager_inference(ops_forbidden, device):
    """The ops the MoE layers above do not call: each with plain tensors, no grad."""
    x = torch.randn(4, 256, dtype=torch.bfloat16, device=device)
    w = torch.randn(128, 256, dtype=torch.bfloat16, device=device)
    q, s = K.quant_act(x)
    wq, ws = K.quant_weight(w)
    assert K.dequant(wq, ws, out_dtype=torch.bfloat16).shape == w.shape
    assert K.fp8_gemm(q, s, wq, ws).shape == (4, 128)
    assert K.fp8_linear(x, wq, ws).shape == (4, 128)
    o = K.mla_decode(torch.randn(2, 1, 2, 40, device=device), torch.randn(2, 5, 40, device=device), 0.2, v_dim=32,
                     cache_seqlens=torch.tensor([3, 5], dtype=torch.int32, device=device))
    assert o.shape == (2, 1, 2, 32)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_tracing_and_function_modes_take_the_op(device):
    x = torch.randn(3, 4)
    with torch.device("cpu"):  # a TorchFunctionMode
        assert not run_direct(x)
    seen = []

    def f(t):
        seen.append(run_direct(t))
        return t * 2

    torch.jit.trace(f, (x,), check_trace=False)
    assert seen == [False]
    xs = torch.randn(9, 32, device=device)
    w = torch.randn(3, 16, 32, device=device)
    offsets = torch.tensor([4, 4, 8], dtype=torch.int32, device=device)
    traced = torch.jit.trace(lambda a, b, c: K.grouped_gemm(a, b, c), (xs, w, offsets))
    assert "moela::grouped_gemm" in str(traced.graph)


def test_direct_and_op_paths_give_the_same_bits(device):
    """The op path (forced by a dispatch mode) and the direct path run the same launcher."""
    xs = torch.randn(9, 32, dtype=torch.bfloat16, device=device)
    w = torch.randn(3, 16, 32, dtype=torch.bfloat16, device=device)
    offsets = torch.tensor([4, 4, 8], dtype=torch.int32, device=device)
    out = K.grouped_gemm(xs, w, offsets)  # the direct path
    log = _OpLog()
    with log:
        via_op = K.grouped_gemm(xs, w, offsets)
    assert "moela.grouped_gemm.default" in log.names
    assert torch.equal(out, via_op)
    q, s = K.quant_act(xs.float())
    with log:
        q_op, s_op = K.quant_act(xs.float())
    assert "moela.quant_act.default" in log.names
    assert torch.equal(q.view(torch.uint8), q_op.view(torch.uint8)) and torch.equal(s, s_op)


def test_meta_tensors_still_get_shapes():
    """The fp8 ops and swiglu accept meta tensors (their fake implementations); the fast path must not take them."""
    q, s = K.quant_act(torch.empty(4, 256, device="meta"))
    assert q.shape == (4, 256) and s.shape == (4, 2) and q.device.type == "meta"
    g = torch.empty(4, 256, device="meta", dtype=torch.bfloat16)
    assert K.swiglu(g, g).shape == (4, 256)
    q, s = K.swiglu(g, g, fp8=True)
    assert q.shape == (4, 256) and s.shape == (4, 2) and q.device.type == "meta"


@pytest.mark.parametrize("T, k, E", [(3, 8, 64), (1, 3, 5)])  # 5 and 3 int32: padded to 16-byte starts
def test_direct_path_packs_same_dtype_outputs_into_aligned_disjoint_views(T, k, E, device):
    """make_routing's five int32 outputs with grad mode off: on the direct path views of one
    block, each starting 16-byte aligned, none overlapping another (each filled with its own value
    and read back); through the custom op (a dispatch mode) five separate tensors, which its
    aliasing rule wants. The plans are equal either way."""
    ids = torch.randint(0, E, (T, k), dtype=torch.int32, device=device)
    with torch.no_grad():
        plan = K.make_routing(ids, E)
        with _OpLog() as log:
            via_op = K.make_routing(ids, E)
    storages = {t.untyped_storage().data_ptr() for t in plan}
    assert len(storages) == 1
    assert all(t.data_ptr() % 16 == 0 and t.is_contiguous() for t in plan)
    copy = [t.clone() for t in plan]
    for i, t in enumerate(plan):
        t.fill_(i + 100)
    assert all(bool((t == i + 100).all()) for i, t in enumerate(plan))
    assert "moela.make_routing.default" in log.names
    assert len({t.untyped_storage().data_ptr() for t in via_op}) == 5
    assert all(torch.equal(a, b) for a, b in zip(copy, via_op, strict=True))


def test_grad_mode_outputs_are_separate_tensors(device):
    """With grad mode on the direct path allocates each output alone: views of one block share an
    autograd version counter, so an in-place write to one plan tensor would fail the backward of
    permute, which saved two others."""
    ids = torch.randint(0, 6, (4, 2), dtype=torch.int32, device=device)
    plan = K.make_routing(ids, 6)
    assert len({t.untyped_storage().data_ptr() for t in plan}) == 5
    x = torch.randn(4, 32, device=device, requires_grad=True)
    xs = K.permute(x, plan)
    plan.tokens_per_expert.add_(0)
    xs.sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 2.0))
