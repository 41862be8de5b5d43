"""The op factory: one launcher, one contract check and (where there is one) one backward make a moela op.

A kernel module writes, per op::

    @kernel_op("grouped_gemm", contract=check_grouped_gemm, domain=_kernel_domain,
               backward=_backward, setup_context=_setup)
    def grouped_gemm(out, xs: Tensor, w: Tensor, offsets: Tensor, *, validate: bool = False, config=None):
        '''The public docstring.'''
        ...  # launch the kernels, writing ``out`` (allocated by the factory from the contract)

and gets back the public function ``grouped_gemm(xs, w, offsets, *, validate=False)``. The
launcher's signature, minus ``out`` and ``config``, is the op's one signature; from it the
factory makes

- the ``torch.library`` custom op ``torch.ops.moela.<name>`` (schema from the annotations),
- its fake implementation: the contract (shapes, dtypes, devices; the same function the
  reference runs) and the kernel's domain check on meta/fake tensors, then empty outputs,
- the autograd registration (``backward`` / ``setup_context``, torch's own conventions),
- ``fn.launch(*args, out=None, config=None)``: contract, domain and device checks, output
  allocation (or checks of the given ``out``: the spec's shapes and dtypes, the inputs' device,
  no two elements sharing memory), the launcher on the inputs' GPU,
- the public function: in plain eager inference (:func:`run_direct`) it calls ``launch``
  directly, skipping the custom op's dispatch layers (and, with grad mode off, allocating several
  outputs of one dtype as aligned views of one block: ``make_routing``'s plan); otherwise it checks the contract (so
  bad input gets moela's error, not the dispatcher's) and calls the custom op.

The contract returns the outputs' :class:`TensorSpec` (one, or a tuple); an op whose number of
outputs depends on an argument (``mla_decode(..., return_lse=True)``) annotates its launcher
``-> list[Tensor]``: the custom op then returns a list (schema ``Tensor[]``) and the public
function and ``launch`` return what the contract promised, one tensor or a tuple. Every registered op
is listed by :func:`registered_ops` (tests, profiling and the GPU script read that list).
The public function is generated source, so it keeps its signature and costs one call.
"""

from __future__ import annotations

import functools
import inspect
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass

import torch

from moela.reference._checks import TensorSpec

from ._common import check_fp8_capability, check_kernel_device, run_direct
from .interpreter import compat_installed

__all__ = ["KernelOp", "kernel_op", "registered_ops", "get_op", "forget_checked", "TensorSpec"]


@dataclass(frozen=True)
class KernelOp:
    """What the factory made for one op (``fn.kernel_op`` of the public function)."""

    name: str  # torch.ops.moela.<name>
    public: Callable  # what users call
    launch: Callable  # launch(*args, out=None, config=None)
    op: Callable  # the torch.library CustomOpDef
    contract: Callable  # (*args) -> TensorSpec | tuple[TensorSpec, ...]; raises on bad input
    domain: Callable | None  # the kernel's narrower domain (raises, in words), or None
    differentiable: bool
    tensor_args: tuple[str, ...]  # the parameters that take tensors (None allowed where optional)
    module: str


_REGISTRY: dict[str, KernelOp] = {}


def registered_ops() -> dict[str, KernelOp]:
    """Every op the factory made, by name (importing ``moela.kernels`` registers all of them)."""
    return dict(_REGISTRY)


def forget_checked() -> None:
    """Forget every remembered argument signature (tests that change what the checks see)."""
    for op in _REGISTRY.values():
        op.launch.__globals__["_checked"].clear()


def get_op(name: str) -> KernelOp:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"{name}: not a moela kernel op (known: {sorted(_REGISTRY)})") from None


def _is_tensor_type(tp: object) -> bool:
    if tp is torch.Tensor:
        return True
    return any(a is torch.Tensor for a in typing.get_args(tp))


def _check_same_signature(what: str, fn: Callable, public: inspect.Signature) -> None:
    sig = inspect.signature(fn)
    got = [(p.name, p.kind, p.default) for p in sig.parameters.values()]
    want = [(p.name, p.kind, p.default) for p in public.parameters.values()]
    if got != want:
        raise TypeError(f"{what} {fn.__qualname__}{sig}: expected the op's parameters {public}")


def _outputs(name: str, spec, device: torch.device, out):
    """Allocate the outputs of ``spec`` on ``device``, or check the given ``out`` against it."""
    if isinstance(spec, TensorSpec):
        if out is None:
            return torch.empty(spec.shape, dtype=spec.dtype, device=device)
        _check_out("out", out, spec, device)
        return out
    if out is None:
        return tuple(torch.empty(s.shape, dtype=s.dtype, device=device) for s in spec)
    if not isinstance(out, (tuple, list)) or len(out) != len(spec):
        raise TypeError(f"out: expected a tuple of {len(spec)} tensors for {name}, got {type(out).__name__}")
    for i, (o, s) in enumerate(zip(out, spec, strict=True)):
        _check_out(f"out[{i}]", o, s, device)
    return tuple(out)


def _check_out(name: str, out: object, spec: TensorSpec, device: torch.device) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(out).__name__}")
    if out.dtype != spec.dtype:
        raise TypeError(f"{name}: expected dtype {spec.dtype}, got {out.dtype}")
    if tuple(out.shape) != tuple(spec.shape):
        raise ValueError(f"{name}: expected shape {tuple(spec.shape)}, got {tuple(out.shape)}")
    if out.device != device:
        raise ValueError(f"{name}: expected device {device} (that of the inputs), got {out.device}")
    if _overlapping(out):
        raise ValueError(f"{name}: expected a buffer whose elements do not share memory, got strides {out.stride()} "
                         f"for shape {tuple(out.shape)} (a stride-0 or overlapping view)")


def _overlapping(t: torch.Tensor) -> bool:
    """Could two elements of ``t`` share memory? Dims sorted by stride must each step past the
    extent of the smaller ones (stride-0 views fail; so do rare interleaved layouts)."""
    if t.numel() <= 1:
        return False
    extent = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape, strict=True) if sz > 1):
        if stride < extent:
            return True
        extent += (size - 1) * stride
    return False


def _as_list(outputs) -> list[torch.Tensor]:
    """A variadic op's outputs as its custom op returns them (schema ``Tensor[]``)."""
    return [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)


def _from_list(outputs):
    """A variadic op's outputs as the contract promised them: one tensor, or a tuple."""
    if isinstance(outputs, list):
        return outputs[0] if len(outputs) == 1 else tuple(outputs)
    return outputs


def _allocator(spec, device: torch.device) -> Callable[[], torch.Tensor | tuple[torch.Tensor, ...]]:
    """A call that allocates the outputs of ``spec`` on ``device`` (built once per checked signature)."""
    if isinstance(spec, TensorSpec):
        return functools.partial(torch.empty, spec.shape, dtype=spec.dtype, device=device)
    parts = [functools.partial(torch.empty, s.shape, dtype=s.dtype, device=device) for s in spec]
    return lambda: tuple(p() for p in parts)


#: Where packed outputs start within their block: every output 16-byte aligned, so that Triton
#: specialises their pointers the same way whatever the shapes.
_PACK_ALIGN = 16


def _packed_allocator(spec, device: torch.device) -> Callable[[], tuple[torch.Tensor, ...]] | None:
    """For several outputs of one dtype: a call that allocates them as views into one block
    (one allocator call and one split instead of a ``torch.empty`` each: a few µs of host time
    for ``make_routing``'s five), each starting 16-byte aligned; None otherwise. Only the direct
    path uses it, and only with grad mode off (inference, decode graphs): a custom op may not
    return outputs that share memory, and views of one block share one autograd version counter
    (an in-place write to one output would fail the backward of an op that saved another)."""
    if isinstance(spec, TensorSpec) or len(spec) < 2 or len({s.dtype for s in spec}) != 1:
        return None
    dtype = spec[0].dtype
    step = max(1, _PACK_ALIGN // dtype.itemsize)
    sizes, keep, shapes = [], [], []  # pieces: each output's elements, and padding where it is not aligned
    for s in spec:
        n = math.prod(s.shape)
        keep.append(len(sizes))
        sizes += [n] if n % step == 0 else [n, -n % step]
        shapes.append(None if len(s.shape) == 1 else tuple(s.shape))
    total = sum(sizes)
    views_of = list(zip(keep, shapes, strict=True))

    def alloc() -> tuple[torch.Tensor, ...]:
        pieces = torch.empty(total, dtype=dtype, device=device).split_with_sizes(sizes)
        return tuple(pieces[i] if shape is None else pieces[i].view(shape) for i, shape in views_of)

    return alloc


def _empty_like_spec(spec, device: torch.device):
    if isinstance(spec, TensorSpec):
        return torch.empty(spec.shape, dtype=spec.dtype, device=device)
    return tuple(torch.empty(s.shape, dtype=s.dtype, device=device) for s in spec)


def _kernel_device(op: str, name: str, t: torch.Tensor, fp8: bool) -> torch.device:
    check_kernel_device(name, t)
    if t.device.type == "cpu" and not compat_installed():
        raise RuntimeError(
            f"{name}: the Triton interpreter computes wrong bf16/fp8 numbers without moela's compatibility "
            f"layer; call moela.kernels.interpreter.install_compat() (importing moela.kernels under "
            f"TRITON_INTERPRET=1 does)")
    if fp8:
        check_fp8_capability(op, t.device)
    return t.device


def _compat_ok(name: str, device: torch.device) -> None:
    """The check of ``_kernel_device`` that a remembered signature cannot vouch for (the layer can
    be uninstalled at any time)."""
    if device.type == "cpu" and not compat_installed():
        _kernel_device("", name, torch.empty(0), False)


#: Argument signatures (per op) whose contract, domain and device checks passed: a repeated
#: signature skips them (they read only types, dtypes, shapes, strides and devices).
_CHECKED_LIMIT = 4096


def _remember(checked: dict, sig: tuple, state: tuple) -> None:
    if len(checked) >= _CHECKED_LIMIT:  # shapes that keep changing (prefill lengths): start over
        checked.clear()
    checked[sig] = state


@functools.cache
def _several_gpus() -> bool:
    return torch.cuda.device_count() > 1


def _launch_on(device: torch.device, launcher: Callable, *args, **kwargs) -> None:
    """Triton launches on the *current* CUDA device: switch to the inputs' one when it differs."""
    if _several_gpus() and device.index is not None and device.index != torch.cuda.current_device():
        with torch.cuda.device(device):
            launcher(*args, **kwargs)
    else:
        launcher(*args, **kwargs)


def kernel_op(
    name: str,
    *,
    contract: Callable,
    domain: Callable | None = None,
    fp8: bool = False,
    backward: Callable | None = None,
    setup_context: Callable | None = None,
    result: Callable | None = None,
) -> Callable[[Callable], Callable]:
    """Make the moela op ``name`` from the decorated launcher (see the module docstring).

    Args:
        contract: ``(*args) -> TensorSpec | tuple[TensorSpec, ...]`` with exactly the op's
            parameters; raises TypeError/ValueError naming the argument (never reads values).
        domain: the kernel's narrower domain, same parameters; raises saying so in words.
        fp8: the kernels need e4m3 support (compute capability >= 8.9) on a GPU.
        backward, setup_context: torch's ``register_autograd`` pair; none: not differentiable
            (the op path detaches its tensor inputs, the direct path ignores ``requires_grad``).
        result: applied to the outputs the public function and ``launch`` return (e.g.
            ``RoutingPlan._make``); the custom op itself returns plain tensors.
    """
    if (backward is None) != (setup_context is None):
        raise TypeError(f"{name}: give backward and setup_context together")

    def decorate(launcher: Callable) -> Callable:
        if name in _REGISTRY:
            raise ValueError(f"{name}: a moela op of that name exists already ({_REGISTRY[name].module})")
        sig = inspect.signature(launcher)
        params = list(sig.parameters.values())
        if not params or params[0].name != "out" or params[-1].name != "config" \
                or params[-1].kind is not inspect.Parameter.KEYWORD_ONLY or params[-1].default is not None:
            raise TypeError(f"{name}: the launcher must read (out, <the op's parameters>, *, config=None), "
                            f"got {sig}")
        hints = typing.get_type_hints(launcher)
        public_params = params[1:-1]
        public_sig = inspect.Signature(public_params, return_annotation=sig.return_annotation)
        _check_same_signature("contract", contract, public_sig)
        if domain is not None:
            _check_same_signature("domain", domain, public_sig)
        for p in public_params:
            if p.name not in hints:
                raise TypeError(f"{name}: parameter {p.name!r} of the launcher needs a type annotation (the schema)")
        tensors = tuple(p.name for p in public_params if _is_tensor_type(hints[p.name]))
        if not tensors:
            raise TypeError(f"{name}: an op needs at least one tensor parameter")
        differentiable = backward is not None

        # The schema takes every parameter positionally, in order (custom ops take no kw-only
        # tensors, and setup_context then sees all inputs in one tuple).
        schema_params = [p.replace(kind=inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=hints[p.name])
                         for p in public_params]
        returns = hints.get("return", sig.return_annotation)
        variadic = typing.get_origin(returns) is list  # -> list[Tensor]: as many outputs as the contract says
        user_result = result or (lambda o: o)

        def prototype(*args, **kwargs):
            raise AssertionError("schema prototype")

        try:
            prototype.__signature__ = inspect.Signature(schema_params, return_annotation=returns)
        except ValueError as e:  # a required keyword-only parameter after a defaulted one
            raise TypeError(f"{name}: the op's parameters cannot be made positional in order: {e}") from None
        schema = torch.library.infer_schema(prototype, mutates_args=())

        # Generated functions: exact signatures, one call each (see the module docstring).
        ns: dict[str, object] = {
            "_contract": contract, "_domain": domain, "_launcher": launcher, "_outputs": _outputs,
            "_kernel_device": _kernel_device, "_launch_on": _launch_on, "_run_direct": run_direct,
            "_fp8": fp8, "_name": name, "_grad": differentiable,
            "_result": (lambda o: user_result(_from_list(o))) if variadic else user_result,
            "_fake_result": _as_list if variadic else (lambda o: o),
        }
        defs, call = [], []
        star_done = False
        for p in public_params:
            if p.kind is inspect.Parameter.KEYWORD_ONLY and not star_done:
                defs.append("*")
                star_done = True
            if p.default is not inspect.Parameter.empty:
                ns[f"_d_{p.name}"] = p.default
                defs.append(f"{p.name}=_d_{p.name}")
            else:
                defs.append(p.name)
            call.append(p.name if p.kind is not inspect.Parameter.KEYWORD_ONLY else f"{p.name}={p.name}")
        schema_call = [p.name for p in public_params]
        schema_defs = [p.name if p.default is inspect.Parameter.empty else f"{p.name}=_d_{p.name}"
                       for p in public_params]
        first = tensors[0]
        launch_defs = [*defs] if star_done else [*defs, "*"]

        def meta(p: str) -> str:  # what a contract reads of an argument (a hashable signature)
            if p in tensors:
                return (f"(None if {p} is None else (type({p}), {p}.dtype, {p}.device, {p}.shape, {p}.stride())) "
                        f"if isinstance({p}, _Tensor) or {p} is None else {p}")
            return f"(type({p}), {p})"  # 2 == 2.0 == True: the type is part of the signature

        sig = f"({', '.join(meta(p.name) for p in public_params)},)"
        ns["_checked"], ns["_remember"], ns["_compat_ok"], ns["_allocator"] = {}, _remember, _compat_ok, _allocator
        ns["_packed_allocator"], ns["_compat_installed"] = _packed_allocator, compat_installed
        ns["_grad_enabled"] = torch.is_grad_enabled
        domain_call = f"    _domain({', '.join(call)})\n" if domain is not None else ""
        detach = "".join(f"    {t} = {t}.detach() if isinstance({t}, _Tensor) else {t}\n" for t in tensors)
        src = (
            f"def launch({', '.join([*launch_defs, 'out=None', 'config=None', '_packed=False'])}):\n"
            f"    try:\n"
            f"        sig = {sig}\n"
            f"        state = _checked.get(sig)\n"
            f"    except TypeError:  # an unhashable argument: the contract names it\n"
            f"        sig = state = None\n"
            f"    if state is None:\n"
            f"        spec = _contract({', '.join(call)})\n"
            f"{'    ' + domain_call if domain_call else ''}"
            f"        device = _kernel_device(_name, {first!r}, {first}, _fp8)\n"
            f"        alloc = _allocator(spec, device)\n"
            f"        state = (spec, device, alloc, _packed_allocator(spec, device) or alloc, device.type == 'cuda')\n"
            f"        if sig is not None:\n"
            f"            _remember(_checked, sig, state)\n"
            f"    spec, device, alloc, packed, cuda = state\n"
            f"    if not cuda and not _compat_installed():\n"
            f"        _compat_ok({first!r}, device)\n"
            f"    if out is None:\n"
            f"        out = packed() if _packed else alloc()\n"
            f"    else:\n"
            f"        out = _outputs(_name, spec, device, out)\n"
            f"    if cuda:\n"
            f"        _launch_on(device, _launcher, out, {', '.join(call)}, config=config)\n"
            f"    else:\n"
            f"        _launcher(out, {', '.join(call)}, config=config)\n"
            f"    return _result(out)\n"
            f"\n"
            f"def impl({', '.join(schema_defs)}):\n"
            f"    return _raw_launch({', '.join(call)})\n"
            f"\n"
            f"def fake({', '.join(schema_defs)}):\n"
            f"    spec = _contract({', '.join(call)})\n"
            f"{domain_call}"
            f"    return _fake_result(_empty_like_spec(spec, {first}.device))\n"
            f"\n"
            f"def public({', '.join(defs)}):\n"
            f"    if _run_direct({', '.join(tensors)}, grad=_grad):\n"
            f"        return launch({', '.join(call)}, _packed=not _grad_enabled())\n"
            f"    _contract({', '.join(call)})\n"
            f"{domain_call}"
            f"{'' if differentiable else detach}"
            f"    return _result(_op({', '.join(schema_call)}))\n"
        )
        ns["_empty_like_spec"] = _empty_like_spec
        ns["_Tensor"] = torch.Tensor
        exec(compile(src, f"<moela op {name}>", "exec"), ns)  # noqa: S102 - generated from the signature
        if result is None and not variadic:
            ns["_raw_launch"] = ns["launch"]
        else:  # the custom op's implementation returns the plain outputs (a list for a variadic op)
            raw_ns = dict(ns, _result=_as_list if variadic else (lambda o: o))
            exec(compile(src, f"<moela op {name} (raw)>", "exec"), raw_ns)  # noqa: S102
            ns["_raw_launch"] = raw_ns["launch"]
        op = torch.library.custom_op(f"moela::{name}", ns["impl"], mutates_args=(), schema=schema)
        op.register_fake(ns["fake"])
        if differentiable:
            op.register_autograd(backward, setup_context=setup_context)
        ns["_op"] = op

        launch, public = ns["launch"], ns["public"]
        for fn, qual in ((public, name), (launch, f"{name}.launch")):
            fn.__name__ = name if fn is public else "launch"
            fn.__qualname__ = qual
            fn.__module__ = launcher.__module__
        public.__doc__ = launcher.__doc__
        public.__signature__ = public_sig
        launch.__doc__ = (f"Launch ``{name}`` with optional preallocated outputs ``out`` and a fixed Triton "
                          f"``config`` (tests, sweeps): the contract, domain and device checks, then the kernels.")
        launch.__signature__ = public_sig.replace(parameters=[
            *public_params,
            inspect.Parameter("out", inspect.Parameter.KEYWORD_ONLY, default=None),
            inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None),
        ])
        spec = KernelOp(name=name, public=public, launch=launch, op=op, contract=contract, domain=domain,
                        differentiable=differentiable, tensor_args=tensors, module=launcher.__module__)
        public.launch = launch
        public.op = op
        public.kernel_op = spec
        _REGISTRY[name] = spec
        return public

    return decorate
