"""Turn a module's ``nn.Linear`` layers into :class:`FP8Linear` (DeepSeek's fp8 precision), and
:func:`uses_fp8_linears`, the config rule for when the model's modules do."""

from __future__ import annotations

import torch
from torch import nn

from moela.reference import ModelArgs

from .linear import FP8Linear

__all__ = ["quantize_linears_", "uses_fp8_linears", "keep_dtype"]


def uses_fp8_linears(args: ModelArgs) -> bool:
    """The projections are FP8Linear layers: e4m3 weights (``dtype="fp8"``) or FP8 training
    from master weights (``train_fp8``)."""
    return args.dtype == "fp8" or args.train_fp8


def quantize_linears_(module: nn.Module, args: ModelArgs, skip: tuple[str, ...] = ("gate", "head")) -> nn.Module:
    """Replace every ``nn.Linear`` below ``module`` (except children named in ``skip``) by an
    ``FP8Linear`` holding its weight quantized to e4m3 with 128×128 float32 scales; activations
    use ``args.scale_fmt``, the path ``args.backend``. With ``args.train_fp8`` the FP8Linear keeps
    the linear's weight as its trainable master weight instead (``master_weights=True``).
    Returns ``module`` (changed in place)."""
    for name, child in list(module.named_children()):
        if name in skip:
            continue
        if isinstance(child, nn.Linear):
            with torch.no_grad():
                layer = FP8Linear.from_linear(child, scale_fmt=args.scale_fmt, backend=args.backend,
                                              master_weights=args.train_fp8)
            setattr(module, name, layer)
        else:
            quantize_linears_(child, args, skip)
    return module


def keep_dtype(fn, keep: tuple[torch.Tensor, ...]):
    """Wrap a ``Module._apply`` function so that the tensors in ``keep`` (FP8 weights and their
    float32 scales) only follow its device moves, never its dtype casts: ``model.bfloat16()``
    must not turn e4m3 weights into bf16 numbers or round float32 scales to bf16."""
    ids = {id(t) for t in keep}

    def apply(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in ids:
            return fn(t)
        device = fn(torch.empty(0, dtype=t.dtype, device=t.device)).device
        return t.to(device=device)

    return apply
