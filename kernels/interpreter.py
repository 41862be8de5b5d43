"""Make the Triton interpreter compute what an NVIDIA GPU computes (test-only patches).

Under ``TRITON_INTERPRET=1`` Triton runs kernels through numpy on the CPU. In triton 3.6 some
of its float arithmetic silently gives numbers no GPU would produce. ``install_compat()``
patches the interpreter (and only the interpreter: it does nothing on a compiled GPU run) so
that these paths go through torch's correctly rounded conversions:

=====================================  ==================================================
interpreter bug (triton 3.6)           fixed by
=====================================  ==================================================
``tl.dot`` on bf16 operands multiplies  ``InterpreterBuilder.create_dot``: bf16 and fp8
the raw uint16 bit patterns (#11584)    operands are decoded to fp32 first
fp32/fp16/bf16 -> fp8 drops the         ``_convert_float`` (module function): every
mantissa carry (31.9 -> 16), does not   float -> float conversion goes through torch,
saturate (500 -> 256 in e4m3)           rounding to nearest even; fp8 results saturate
                                        to the finite max (e4m3fn +-448, e5m2 +-57344)
                                        like PTX ``cvt.rn.satfinite``; NaN stays NaN;
                                        RTZ (``fp_downcast_rounding="rtz"``) truncates
fp32 -> bf16 truncates (#8322);         ``InterpreterBuilder.cast_impl`` (behind
fp64 -> bf16, int -> bf16 and           ``create_fp_trunc`` / ``create_fp_ext`` /
bool -> bf16 reinterpret the value      ``create_si_to_fp`` / ...): float <-> float and
as bits                                 int -> bf16 go through torch (fp64 sources are
                                        rounded to odd in fp32 first: no double rounding)
fp8 e4m3 NaN (0x7f) upcasts to 480      same ``_convert_float`` patch
bf16 ``+ - * fma``, unary minus and     ``InterpreterBuilder.binary_op`` and
``tl.sum`` add raw bit patterns         ``create_fma`` decode bf16 to fp32 and round the
(1 + 2 -> inf); ``bf16 * 2.0`` raises   result back (what a bf16 FMA unit returns);
(no ``get_bf16``)                       ``ReduceOps.sum`` sums bf16 in fp32 and rounds
                                        once; ``InterpreterBuilder.get_bf16`` is added
=====================================  ==================================================

``install_compat()`` checks the internals it replaces (names and signatures) and then probes
the patched builder (fp32 -> bf16, fp32 -> fp8 with carry and saturation, a bf16 dot); on
another triton whose internals differ it raises ``RuntimeError`` instead of silently leaving
the bugs in place. ``uninstall_compat()`` / ``compat_disabled()`` restore the originals so a
test can show that a bug exists without the layer.

Interpreter facts the layer does NOT change (measured on triton 3.6):

- fp8 e4m3 NaN reads back as 480 without the layer (in-kernel ``.to(tl.float32)`` and fp8
  ``tl.dot``); with it, NaN. Arithmetic directly on fp8 values (``x + x`` on an fp8 tensor)
  still works on the uint8 bit patterns and ``x * 2.0`` raises: convert to fp32 first.
- An unmasked out-of-bounds load reads whatever memory lies there (garbage) instead of
  faulting, and an out-of-bounds store corrupts the neighbouring buffer silently: pre-fill
  outputs with NaN (``moela_testing.nan_empty``) and check every element.
- ``tl.device_assert`` never fires; races are never detected (programs run one after
  another, so atomics and ordering bugs pass); ``num_warps`` / ``num_stages`` are ignored.
- ``triton.autotune`` with more than one config fails (``RuntimeError: 0 active drivers``):
  give the interpreter one config.
- fp32 ``tl.dot`` is exact fp32 here; the GPU default is TF32 (``input_precision``).
- ``tl.sum`` over bf16 is rounded once here; a GPU rounds partial sums to bf16. Sum in fp32
  (``tl.sum(x.to(tl.float32))``) in kernels that care.
- bf16 tensors are stored as uint16 bit patterns. bf16 ops other than the ones above are
  not patched; those measured (``tl.maximum/minimum``, ``tl.max/min``, ``tl.where``,
  ``tl.clamp``, ``tl.cumsum``, ``tl.abs``, ``/``) are right because triton promotes bf16 to
  fp32 or they only move bits. Check any other bf16 op against torch before trusting it.

Importing ``moela.kernels`` under ``TRITON_INTERPRET=1`` installs the layer, and the ops refuse
to run on CPU tensors while it is not installed: no configuration returns the interpreter's
wrong numbers. Tests use ``compat_disabled()`` to show a bug on raw kernels.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from moela import knobs

__all__ = [
    "compat_disabled",
    "compat_installed",
    "install_compat",
    "interpreter_active",
    "uninstall_compat",
]

# triton dtype name -> torch dtype, for the float formats whose conversions we take over.
# The AMD fnuz formats (fp8e4b8, fp8e5b16) and fp8e4b15 keep triton's own code.
_TORCH_FLOAT = {
    "fp64": torch.float64,
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp8e4nv": torch.float8_e4m3fn,
    "fp8e5": torch.float8_e5m2,
}
_INT_OF_BITS = {8: np.int8, 16: np.int16, 32: np.int32, 64: np.int64}
_UINT_OF_BITS = {8: np.uint8, 16: np.uint16, 32: np.uint32, 64: np.uint64}

# What install_compat() replaced: (owner, attribute) -> original value (_MISSING: added by us).
_MISSING = object()
_originals: dict[tuple[Any, str], Any] = {}


def interpreter_active() -> bool:
    """True when ``TRITON_INTERPRET`` is set to a value triton reads as true (``moela.knobs.interpret``)."""
    return knobs.interpret()


def compat_installed() -> bool:
    """True while the patches of :func:`install_compat` are in place."""
    return bool(_originals)


# ----------------------------------------------------------------------------------------
# Conversions through torch. The interpreter stores fp32/fp16/fp64 as numpy floats and bf16
# and fp8 as unsigned integers holding the bit pattern.
# ----------------------------------------------------------------------------------------


def _name(tl_dtype: Any) -> str:
    return getattr(tl_dtype, "scalar", tl_dtype).name


def _handled(tl_dtype: Any) -> bool:
    return _name(tl_dtype) in _TORCH_FLOAT


def _to_torch(data: np.ndarray, tl_dtype: Any) -> torch.Tensor:
    """The interpreter's storage of a float tensor -> a torch tensor of that float dtype."""
    dtype = _TORCH_FLOAT[_name(tl_dtype)]
    bits = dtype.itemsize * 8
    arr = np.array(data, copy=True, order="C")  # keeps 0-d arrays 0-d
    if arr.dtype.itemsize * 8 != bits:
        raise TypeError(f"interpreter data of {arr.dtype} cannot hold {_name(tl_dtype)}")
    return torch.from_numpy(arr.view(_INT_OF_BITS[bits])).view(dtype)


def _bits(t: torch.Tensor) -> np.ndarray:
    """A torch float tensor -> its bit pattern as a numpy unsigned array."""
    bits = t.dtype.itemsize * 8
    ints = {8: torch.int8, 16: torch.int16, 32: torch.int32, 64: torch.int64}[bits]
    return t.view(ints).numpy().view(_UINT_OF_BITS[bits])


def _round_to_odd_fp32(x: torch.Tensor) -> torch.Tensor:
    """fp64 -> fp32 rounding to odd: the result, rounded once more to any format with at
    most 22 mantissa bits, equals rounding ``x`` directly (no double-rounding error)."""
    y = x.to(torch.float32)
    yd = y.to(torch.float64)
    inexact = torch.isfinite(x) & (yd != x)
    bits = y.view(torch.int32)
    bits = torch.where(inexact & (yd.abs() > x.abs()), bits - 1, bits)  # truncate toward 0
    bits = torch.where(inexact, bits | 1, bits)
    return bits.view(torch.float32)


def _saturation(dst: torch.dtype) -> float | None:
    if dst in (torch.float8_e4m3fn, torch.float8_e5m2):
        return float(torch.finfo(dst).max)
    return None


def _convert(x: torch.Tensor, dst: torch.dtype, round_to_zero: bool = False) -> torch.Tensor:
    """Convert like the NVIDIA backend: round to nearest even (or toward zero), fp8 results
    saturate to the finite max (PTX ``cvt.rn.satfinite``), NaN stays NaN."""
    if x.dtype == dst:
        return x.clone()
    exact = x.to(torch.float64) if x.dtype == torch.float64 else x.to(torch.float32)
    wide = exact
    if wide.dtype == torch.float64 and dst != torch.float32 and dst != torch.float64:
        wide = _round_to_odd_fp32(wide)
    if (fmax := _saturation(dst)) is not None:
        wide = wide.clamp(-fmax, fmax)  # clamp keeps NaN
    y = wide.to(dst)
    if round_to_zero:
        ints = {8: torch.int8, 16: torch.int16, 32: torch.int32, 64: torch.int64}[dst.itemsize * 8]
        away = torch.isfinite(exact) & (y.to(torch.float64).abs() > exact.to(torch.float64).abs())
        y = torch.where(away, y.view(ints) - 1, y.view(ints)).view(dst)
    return y


def _rounding_is_rtz(rounding_mode: Any, ir: Any) -> bool:
    if rounding_mode is None or rounding_mode == ir.ROUNDING_MODE.RTNE:
        return False
    if rounding_mode == ir.ROUNDING_MODE.RTZ:
        return True
    raise NotImplementedError(f"moela interpreter compat: rounding mode {rounding_mode!r}")


def _bf16_to_fp32(data: np.ndarray) -> np.ndarray:
    return (np.asarray(data).astype(np.uint32) << 16).view(np.float32)


def _fp32_to_bf16_bits(data: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(np.array(data, dtype=np.float32, copy=True, order="C"))
    return _bits(t.to(torch.bfloat16))


# ----------------------------------------------------------------------------------------
# The replacements. Each is built around triton's original so that anything it does not
# handle falls through to triton's own code.
# ----------------------------------------------------------------------------------------


def _make_convert_float(orig: Callable, ir: Any) -> Callable:
    def _convert_float(input, input_dtype, output_dtype, rounding_mode):
        if not (_handled(input_dtype) and _handled(output_dtype)):
            return orig(input, input_dtype, output_dtype, rounding_mode)
        x = _to_torch(input, input_dtype)
        dst = _TORCH_FLOAT[_name(output_dtype)]
        return _bits(_convert(x, dst, _rounding_is_rtz(rounding_mode, ir))).reshape(np.shape(input))

    _convert_float.__wrapped__ = orig
    return _convert_float


def _make_cast_impl(orig: Callable, TensorHandle: type, get_np_dtype: Callable, tl: Any) -> Callable:
    def cast_impl(self, src, dst_type):
        s, d = src.dtype.scalar, dst_type.scalar
        data = np.asarray(src.data)
        if data.dtype == np.bool_:  # comparison results carry their operands' dtype tag
            s = tl.int1
        if (
            s.is_floating()
            and d.is_floating()
            and _handled(s)
            and _handled(d)
            and (data.dtype.itemsize * 8 == s.primitive_bitwidth)
        ):
            y = _convert(_to_torch(data, s), _TORCH_FLOAT[d.name])
        elif s.is_int() and d.is_bf16():
            # exact for |x| < 2**53, then rounded to bf16 without double rounding
            y = _convert(torch.from_numpy(data.astype(np.float64)), torch.bfloat16)
        elif s.is_bf16() and d.is_int() and data.dtype == np.uint16:
            return TensorHandle(_bf16_to_fp32(data).astype(get_np_dtype(d)), d)
        else:
            return orig(self, src, dst_type)
        return TensorHandle(_bits(y).reshape(data.shape).view(get_np_dtype(d)), d)

    cast_impl.__wrapped__ = orig
    return cast_impl


def _make_create_dot(orig: Callable, TensorHandle: type) -> Callable:
    def widened(h):
        dt = h.dtype.scalar
        if dt.is_bf16() or dt.is_fp8():
            return _to_torch(h.data, dt).to(torch.float32).numpy()
        return h.data

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        narrow = [h.dtype.scalar for h in (a, b) if h.dtype.scalar.is_bf16() or h.dtype.scalar.is_fp8()]
        if not narrow or not all(_handled(dt) for dt in narrow):
            return orig(self, a, b, d, input_precision, max_num_imprecise_acc)
        out = np.matmul(widened(a), widened(b), dtype=d.data.dtype) + d.data
        return TensorHandle(out, d.dtype.scalar)

    create_dot.__wrapped__ = orig
    return create_dot


def _make_binary_op(orig: Callable, TensorHandle: type, tl: Any) -> Callable:
    def binary_op(self, lhs, rhs, op):
        if not (lhs.dtype.scalar.is_bf16() or rhs.dtype.scalar.is_bf16()):
            return orig(self, lhs, rhs, op)
        decode = lambda h: _bf16_to_fp32(h.data) if h.dtype.scalar.is_bf16() else h.data
        out = op(decode(lhs), decode(rhs))
        if out.dtype == np.bool_:  # comparisons
            return TensorHandle(out, tl.int1)
        return TensorHandle(_fp32_to_bf16_bits(out), lhs.dtype.scalar)

    binary_op.__wrapped__ = orig
    return binary_op


def _make_create_fma(orig: Callable, TensorHandle: type) -> Callable:
    def create_fma(self, x, y, z):
        if not z.dtype.scalar.is_bf16():
            return orig(self, x, y, z)
        # fp32 holds the bf16 product exactly, so this is the single rounding of an FMA
        # (up to a rare double rounding of the sum).
        out = _bf16_to_fp32(x.data) * _bf16_to_fp32(y.data) + _bf16_to_fp32(z.data)
        return TensorHandle(_fp32_to_bf16_bits(out), z.dtype.scalar)

    create_fma.__wrapped__ = orig
    return create_fma


def _make_get_bf16(TensorHandle: type, tl: Any) -> Callable:
    def get_bf16(self, value):
        x = torch.tensor([float(value)], dtype=torch.float64)
        return TensorHandle(_bits(_convert(x, torch.bfloat16)), tl.bfloat16)

    return get_bf16


def _make_reduce_sum(orig: Callable, tl: Any) -> Callable:
    def reduce_sum(self, input):
        if not input.dtype.scalar.is_bf16():
            return orig(self, input)
        total = np.sum(_bf16_to_fp32(input.handle.data), axis=self.axis, keepdims=self.keep_dims)
        bits = _fp32_to_bf16_bits(np.asarray(total)).reshape(np.shape(total))
        return self.to_tensor(bits if bits.shape else bits.item(), input.dtype)

    reduce_sum.__wrapped__ = orig
    return reduce_sum


# ----------------------------------------------------------------------------------------
# Install / uninstall
# ----------------------------------------------------------------------------------------

# (owner attribute path, attribute, parameter names it must have in the supported triton)
_EXPECTED = (
    ("module", "_convert_float", ("input", "input_dtype", "output_dtype", "rounding_mode")),
    ("module", "_get_np_dtype", ("tt_dtype",)),
    ("InterpreterBuilder", "cast_impl", ("self", "src", "dst_type")),
    ("InterpreterBuilder", "create_fp_to_fp", ("self", "src", "dst_type", "rounding_mode")),
    ("InterpreterBuilder", "create_fp_trunc", ("self", "src", "dst_type")),
    ("InterpreterBuilder", "create_dot", ("self", "a", "b", "d", "input_precision", "max_num_imprecise_acc")),
    ("InterpreterBuilder", "binary_op", ("self", "lhs", "rhs", "op")),
    ("InterpreterBuilder", "create_fma", ("self", "x", "y", "z")),
    ("ReduceOps", "sum", ("self", "input")),
)


def _check_internals(interp: Any) -> None:
    problems = []
    for owner_name, attr, params in _EXPECTED:
        owner = interp if owner_name == "module" else getattr(interp, owner_name, None)
        fn = getattr(owner, attr, None)
        if owner is None or not callable(fn):
            problems.append(f"{owner_name}.{attr} is missing")
            continue
        try:
            got = tuple(inspect.signature(fn).parameters)
        except (TypeError, ValueError):
            got = ()
        if got != params:
            problems.append(f"{owner_name}.{attr}{got} (expected {params})")
    for name in ("TensorHandle", "_ir"):
        if not hasattr(interp, name):
            problems.append(f"{name} is missing")
    if problems:
        import triton

        raise RuntimeError(
            "moela.kernels.interpreter cannot patch the Triton interpreter of triton "
            f"{triton.__version__}: its internals differ from triton 3.6 ({'; '.join(problems)}). "
            "Without the patches the interpreter computes bf16 dots and float downcasts wrongly; "
            "update moela/kernels/interpreter.py for this triton version."
        )


def _patch(owner: Any, attr: str, value: Any) -> None:
    _originals[(owner, attr)] = (
        owner.__dict__.get(attr, _MISSING) if isinstance(owner, type) else getattr(owner, attr, _MISSING)
    )
    setattr(owner, attr, value)


def _self_test(interp: Any) -> None:
    """Run the patched builder on values each bug gets wrong; raise if any is still wrong."""
    import triton.language as tl

    TH, builder = interp.TensorHandle, interp.InterpreterBuilder()
    x = np.array([31.9, 500.0, -1e6, 1.00390625 + 2.0**-12, float("nan")], dtype=np.float32)
    xt = torch.from_numpy(x)
    failures = []
    got = builder.create_fp_to_fp(TH(x, tl.float32), tl.float8e4nv, interp._ir.ROUNDING_MODE.RTNE).data
    want = _bits(xt.clamp(-448, 448).to(torch.float8_e4m3fn))
    if not np.array_equal(got.view(np.uint8), want):
        failures.append(f"fp32 -> fp8e4nv gave bits {got.tolist()}, expected {want.tolist()}")
    got = builder.create_fp_trunc(TH(x, tl.float32), tl.bfloat16).data
    want = _bits(xt.to(torch.bfloat16))
    if not np.array_equal(got.view(np.uint16), want):
        failures.append(f"fp32 -> bf16 gave bits {got.tolist()}, expected {want.tolist()}")
    a = torch.tensor([[1.5, -2.0], [0.25, 3.0]], dtype=torch.bfloat16)
    ah = TH(_bits(a), tl.bfloat16)
    d = TH(np.zeros((2, 2), dtype=np.float32), tl.float32)
    got = builder.create_dot(ah, ah, d, None, None).data
    want = (a.float() @ a.float()).numpy()
    if not np.array_equal(got, want):
        failures.append(f"bf16 dot gave {got.tolist()}, expected {want.tolist()}")
    if failures:
        raise RuntimeError(
            "moela.kernels.interpreter: the patched Triton interpreter still computes wrong "
            "numbers (has triton changed how it dispatches casts or dots?): " + "; ".join(failures)
        )


def install_compat() -> bool:
    """Patch the Triton interpreter's float conversions and bf16 arithmetic (idempotent).

    Does nothing and returns False unless :func:`interpreter_active` (a compiled GPU run is
    never patched). Returns True when the patches are in place. Raises ``RuntimeError`` if
    the installed triton's interpreter does not have the internals this module replaces, or
    if the patched interpreter still fails the built-in probe.
    """
    if not interpreter_active():
        return False
    _install()
    return True


def _install() -> None:
    if _originals:
        return
    import triton.language as tl
    import triton.runtime.interpreter as interp

    _check_internals(interp)
    TH, IB, np_dtype = interp.TensorHandle, interp.InterpreterBuilder, interp._get_np_dtype
    try:
        _patch(interp, "_convert_float", _make_convert_float(interp._convert_float, interp._ir))
        _patch(IB, "cast_impl", _make_cast_impl(IB.cast_impl, TH, np_dtype, tl))
        _patch(IB, "create_dot", _make_create_dot(IB.create_dot, TH))
        _patch(IB, "binary_op", _make_binary_op(IB.binary_op, TH, tl))
        _patch(IB, "create_fma", _make_create_fma(IB.create_fma, TH))
        if not hasattr(IB, "get_bf16"):
            _patch(IB, "get_bf16", _make_get_bf16(TH, tl))
        _patch(interp.ReduceOps, "sum", _make_reduce_sum(interp.ReduceOps.sum, tl))
        _self_test(interp)
    except BaseException:
        uninstall_compat()
        raise


def uninstall_compat() -> None:
    """Restore everything :func:`install_compat` replaced (no-op when nothing is installed)."""
    while _originals:
        (owner, attr), original = _originals.popitem()
        if original is _MISSING:
            delattr(owner, attr)
        else:
            setattr(owner, attr, original)


@contextlib.contextmanager
def compat_disabled() -> Iterator[None]:
    """Run a block on the unpatched interpreter, then restore the patches if they were on.

    Tests use it to show that a bug exists without the layer::

        with compat_disabled():
            kernel[(1,)](...)  # triton's own (wrong) numbers
    """
    was_installed = compat_installed()
    uninstall_compat()
    try:
        yield
    finally:
        if was_installed:
            _install()  # even if TRITON_INTERPRET changed inside the block
