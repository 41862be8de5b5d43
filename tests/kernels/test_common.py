"""kernels._common: config pinning and the one-config rule."""

import pytest
import torch
import triton
import triton.language as tl
import triton.testing

from moela.kernels import _common
from moela.kernels._common import (
    autotune,
    autotune_configs,
    cdiv,
    check_kernel_device,
    m_bucket,
    next_power_of_2,
    parse_config,
)

CONFIGS = [triton.Config({"BLOCK_M": 64}, num_warps=4), triton.Config({"BLOCK_M": 128}, num_warps=8)]


def test_one_config_under_the_interpreter(monkeypatch):
    monkeypatch.delenv("MOELA_AUTOTUNE", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert autotune_configs("foo", CONFIGS) == CONFIGS[:1]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert autotune_configs("foo", CONFIGS) == CONFIGS
    monkeypatch.setenv("MOELA_AUTOTUNE", "0")  # handled by autotune(): the pruner still chooses
    assert autotune_configs("foo", CONFIGS) == CONFIGS


@triton.jit
def _noop(x_ptr, N, M_BUCKET, BLOCK_M: tl.constexpr):
    pass


def _tuner(monkeypatch, name, **kwargs):
    """An autotuner of _noop with both CONFIGS (the interpreter would keep one: pretend a GPU)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    tuner = autotune(name, CONFIGS, key=["N", "M_BUCKET"], **kwargs)(_noop)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return tuner


def test_autotune_off_runs_the_first_config_the_pruner_keeps(monkeypatch):
    def too_big_for_fp32(configs, named_args, **kwargs):  # a kernel's pruner: drops BLOCK_M=64 here
        return [c for c in configs if c.kwargs["BLOCK_M"] != named_args["drop"]]

    monkeypatch.setenv("MOELA_AUTOTUNE", "0")
    tuner = _tuner(monkeypatch, "test_off_pruned", prune_configs_by={"early_config_prune": too_big_for_fp32})
    assert tuner.do_bench(lambda: 1 / 0, (0.5, 0.2)) == [0.0, 0.0]  # untimed: never runs the call
    assert tuner.early_config_prune(CONFIGS, {"drop": 64}) == [CONFIGS[1]]
    assert tuner.early_config_prune(CONFIGS, {"drop": 0}) == [CONFIGS[0]]
    plain = _tuner(monkeypatch, "test_off_plain")
    assert plain.early_config_prune(CONFIGS, {}) == [CONFIGS[0]]
    monkeypatch.delenv("MOELA_AUTOTUNE")
    tuned = _tuner(monkeypatch, "test_on", prune_configs_by={"early_config_prune": too_big_for_fp32})
    assert tuned.early_config_prune is too_big_for_fp32
    seen = []
    monkeypatch.setattr(_common, "_tuning_bench", lambda call, q: seen.append(call()) or [1.0] * len(q))
    assert tuned.do_bench(lambda: "timed", (0.5,)) == [1.0] and seen == ["timed"]
    with pytest.raises(ValueError, match="exists already"):
        _tuner(monkeypatch, "test_on")


def test_config_tables_are_used_before_autotuning(monkeypatch, tmp_path):
    """A tabled key skips tuning (the nearest M bucket's config, run untimed); other keys tune."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from moela.kernels import config_tables as ct

    big = triton.Config({"BLOCK_M": 256}, num_warps=8, num_stages=3)
    entries = [ct.entry("test_tabled", {"N": 64, "M_BUCKET": m}, ["torch.bfloat16"], cfg)
               for m, cfg in ((16, CONFIGS[0]), (4096, big))]
    path = ct.write_table(ct.table_path("Test GPU 9000", tmp_path), entries, {"device": "Test GPU 9000"})
    assert path.name == "test-gpu-9000.json"
    monkeypatch.setattr(ct, "TABLE_DIR", tmp_path)
    assert ct.lookup("test_tabled", {"N": 64, "M_BUCKET": 64}, ("torch.bfloat16",), "Test GPU 9000").kwargs == \
        {"BLOCK_M": 64}  # log2 distance 2 vs 6
    assert ct.lookup("test_tabled", {"N": 64, "M_BUCKET": 2048}, ("torch.bfloat16",), "Test GPU 9000").kwargs == \
        {"BLOCK_M": 256}
    assert ct.lookup("test_tabled", {"N": 32, "M_BUCKET": 64}, ("torch.bfloat16",), "Test GPU 9000") is None
    assert ct.lookup("test_tabled", {"N": 64, "M_BUCKET": 64}, ("torch.float16",), "Test GPU 9000") is None

    tuner = _tuner(monkeypatch, "test_tabled")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU 9000")
    with FakeTensorMode():
        x = torch.empty(8, device="cuda", dtype=torch.bfloat16)
    tuner.nargs = {"x_ptr": x, "N": 64, "M_BUCKET": 8192}
    (cfg,) = tuner.prune_configs({})
    assert cfg.kwargs == {"BLOCK_M": 256} and tuner.do_bench(lambda: 1 / 0, (0.5,)) == [0.0]
    assert tuner.source_of(cfg) == "table"
    tuner.nargs = {"x_ptr": x, "N": 128, "M_BUCKET": 8192}  # no entry: the candidates, timed
    assert tuner.prune_configs({}) == CONFIGS and tuner.source_of(CONFIGS[0]) == "tuned"
    monkeypatch.setenv("MOELA_CONFIG_TABLES", "0")
    tuner.nargs = {"x_ptr": x, "N": 64, "M_BUCKET": 8192}
    assert tuner.prune_configs({}) == CONFIGS  # tables off (what `tune` measures with)


def test_env_pins_one_config(monkeypatch):
    monkeypatch.setenv("MOELA_FOO_CONFIG", "BLOCK_M=32, BLOCK_N=16,num_warps=2,num_stages=3")
    (cfg,) = autotune_configs("foo", CONFIGS)
    assert cfg.kwargs == {"BLOCK_M": 32, "BLOCK_N": 16} and cfg.num_warps == 2 and cfg.num_stages == 3
    monkeypatch.setenv("MOELA_FOO_CONFIG", "BLOCK_M=big")
    with pytest.raises(ValueError, match="MOELA_FOO_CONFIG"):
        autotune_configs("foo", CONFIGS)
    with pytest.raises(ValueError, match="no block sizes"):
        parse_config("num_warps=4")


def test_small_math_and_device_check(monkeypatch):
    assert [cdiv(a, 4) for a in (0, 1, 4, 5)] == [0, 1, 1, 2]
    assert [next_power_of_2(n) for n in (0, 1, 2, 3, 64, 65)] == [1, 1, 2, 4, 64, 128]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="x: expected a CUDA tensor"):
        check_kernel_device("x", torch.zeros(1))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    check_kernel_device("x", torch.zeros(1))


def test_autotune_times_configs_with_moela_short_bench(monkeypatch):
    """Every tuned kernel gets moela's do_bench: warm-up and repetitions from the environment."""
    monkeypatch.delenv("MOELA_AUTOTUNE", raising=False)
    tuner = _tuner(monkeypatch, "test_short_bench")
    assert tuner.configs == CONFIGS

    seen = {}

    def fake_do_bench(fn, warmup, rep, quantiles):
        seen.update(warmup=warmup, rep=rep, quantiles=quantiles, result=fn())
        return [1.0, 1.0, 1.0]

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    assert _common._tuning_bench(lambda: "ran", (0.5, 0.2, 0.8)) == [1.0, 1.0, 1.0]
    assert seen == {"warmup": 5.0, "rep": 25.0, "quantiles": (0.5, 0.2, 0.8), "result": "ran"}
    monkeypatch.setenv("MOELA_AUTOTUNE_WARMUP_MS", "2")
    monkeypatch.setenv("MOELA_AUTOTUNE_REP_MS", "10.5")
    _common._tuning_bench(lambda: None, (0.5,))
    assert (seen["warmup"], seen["rep"]) == (2.0, 10.5)
    for bad in ("fast", "0", "-3"):
        monkeypatch.setenv("MOELA_AUTOTUNE_REP_MS", bad)
        with pytest.raises(ValueError, match=f"MOELA_AUTOTUNE_REP_MS.*{bad}"):
            _common._tuning_bench(lambda: None, (0.5,))


def test_m_bucket_and_the_grouped_gemm_keys():
    """The grouped GEMMs tune per power-of-two bucket of M (>= 16: one Triton specialization)."""
    import importlib

    assert [m_bucket(m) for m in (0, 1, 15, 16, 17, 1024, 1025)] == [16, 16, 16, 16, 32, 1024, 2048]
    gg = importlib.import_module("moela.kernels.grouped_gemm")
    fg = importlib.import_module("moela.kernels.fp8_grouped_gemm")
    assert all("M_BUCKET" in tuner.keys for tuner in gg._fwd_tuned.values())
    assert all("M_BUCKET" in tuner.keys for tuner in fg._TUNED.values())


def test_launchers_run_on_their_tensors_gpu(monkeypatch):
    """A launch given a cuda:0 tensor while cuda:1 is current runs under torch.cuda.device(cuda:0);
    on the current device, or on the CPU, it runs as called. (A recorded torch.cuda stands in
    for two GPUs.) Every op the factory makes launches through that guard."""
    from contextlib import contextmanager

    from moela.kernels import factory, registered_ops

    entered, during, current = [], [], [1]

    @contextmanager
    def device(d):
        entered.append(torch.device(d))
        yield

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(factory, "_several_gpus", lambda: True)

    def launcher(*args, k=1):
        during.append(list(entered))

    factory._launch_on(torch.device("cuda:0"), launcher, 1, k=3)
    assert entered == [torch.device("cuda:0")] and during == [[torch.device("cuda:0")]]
    current[0] = 0
    factory._launch_on(torch.device("cuda:0"), launcher)
    factory._launch_on(torch.device("cpu"), launcher)
    assert len(entered) == 1 and len(during) == 3
    monkeypatch.setattr(factory, "_several_gpus", lambda: False)  # one GPU: nothing to switch, nothing asked
    current[0] = 1
    factory._launch_on(torch.device("cuda:0"), launcher)
    assert len(entered) == 1 and len(during) == 4
    ops = registered_ops()
    assert len(ops) >= 18
    for name, op in ops.items():
        assert "_launch_on" in op.launch.__code__.co_names, name


def test_remembered_signatures_never_skip_a_failing_check(device):
    """The factory remembers argument signatures whose checks passed; any change the checks can
    see (dtype, shape, stride, device, scalar) is a new signature and is checked again."""
    import moela.kernels as K
    from moela.kernels import factory
    from moela.kernels.interpreter import compat_disabled

    xs, w = torch.randn(6, 32, device=device), torch.randn(2, 8, 32, device=device)
    off = torch.tensor([3, 6], dtype=torch.int32, device=device)
    for _ in range(2):
        K.grouped_gemm(xs, w, off)
    op = K.registered_ops()["grouped_gemm"]
    assert any(sig[0][1] == torch.float32 for sig in op.launch.__globals__["_checked"])
    with pytest.raises(TypeError, match="w: expected dtype float32"):
        K.grouped_gemm(xs, w.double(), off)
    with pytest.raises(TypeError, match="offsets"):
        K.grouped_gemm(xs, w, off.float())
    with pytest.raises(ValueError, match="xs: expected K=32"):
        K.grouped_gemm(xs[:, :16], w, off)
    with pytest.raises(TypeError, match="validate"):
        K.grouped_gemm(xs, w, off, validate="yes")
    with pytest.raises(TypeError, match="xs: expected a torch.Tensor"):
        K.grouped_gemm([[1.0]], w, off)  # unhashable: checked, not remembered
    if device == "cpu":  # the compatibility layer is checked on every call, remembered or not
        with compat_disabled(), pytest.raises(RuntimeError, match="install_compat"):
            K.grouped_gemm(xs, w, off)
    factory.forget_checked()
    assert not op.launch.__globals__["_checked"]


def test_remembered_signatures_tell_scalar_types_apart(device):
    """2, 2.0 and True are equal and hash alike in Python: a remembered int must not let a float
    or a bool through the contract."""
    import moela.kernels as K

    logits = torch.randn(3, 8, device=device)
    K.route(logits, None, topk=2)
    with pytest.raises(TypeError, match="topk"):
        K.route(logits, None, topk=2.0)
    with pytest.raises(TypeError, match="topk"):
        K.route(logits, None, topk=True)


def test_the_fast_autotune_path_finds_the_key_tritons_path_stored(monkeypatch):
    """TunedAutotuner.run builds its cache key without Triton's dict of every argument; it must be
    Triton's key (key arguments positional or by keyword, then every argument's dtype), or a tuned
    kernel would tune again on every call."""
    monkeypatch.delenv("MOELA_AUTOTUNE", raising=False)
    monkeypatch.setattr(_common, "_tuning_bench", lambda call, q: [1.0] * len(q))
    tuner = _tuner(monkeypatch, "test_fast_key")
    x = torch.zeros(4)
    calls = []
    monkeypatch.setattr(triton.runtime.Autotuner, "run",
                        lambda self, *a, **k: calls.append(a) or (_ for _ in ()).throw(AssertionError("slow path")))
    with pytest.raises(AssertionError, match="slow path"):  # a new key: Triton's own path
        tuner[(1,)](x, 7, 16)
    monkeypatch.undo()
    monkeypatch.setattr(_common, "_tuning_bench", lambda call, q: [1.0] * len(q))
    for args, kwargs in (((x, 7, 16), {}), ((x, 7), {"M_BUCKET": 16}), ((x,), {"N": 7, "M_BUCKET": 16})):
        tuner.cache.clear()
        tuner[(1,)](*args, **kwargs)  # Triton's path stores the key
        (stored,) = tuner.cache
        assert stored == (7, 16, "torch.float32")
        monkeypatch.setattr(triton.runtime.Autotuner, "run", lambda self, *a, **k: pytest.fail("tuned again"))
        tuner[(1,)](*args, **kwargs)  # the fast path finds it
        monkeypatch.undo()
        monkeypatch.setattr(_common, "_tuning_bench", lambda call, q: [1.0] * len(q))
    assert calls


@triton.jit
def _store_flag(out_ptr, K, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    tl.store(out_ptr, EVEN_K)


def test_heuristics_read_arguments_by_name():
    """_common.heuristics: a heuristic reads positional and keyword arguments (and an autotuner's
    config values) by name, as with triton.heuristics."""
    kernel = _common.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})(_store_flag)
    out = torch.full((1,), -1, dtype=torch.int32)
    for K, block, expected in ((64, 32, 1), (48, 32, 0)):
        kernel[(1,)](out, K, BLOCK_K=block)
        assert out.item() == expected
        out.fill_(-1)
        kernel[(1,)](out, K=K, BLOCK_K=block)
        assert out.item() == expected
    with pytest.raises(KeyError, match="BLOCK_K"):
        kernel[(1,)](out, 64)
