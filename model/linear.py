"""``FP8Linear``: a drop-in ``nn.Linear`` holding DeepSeek-V3's FP8 weights.

Parameters carry DeepSeek's checkpoint names, so its safetensors load as they are:

    weight            (out_features, in_features) float8_e4m3fn
    weight_scale_inv  (ceil(out/B), ceil(in/B)) float32, one per B×B block (B = 128):
                      W ≈ weight · weight_scale_inv (despite the name it is the dequant multiplier)
    bias              optional (out_features,) in ``dtype``

Forward: ``x (..., in) -> (..., out)`` in x.dtype; the activation is quantized on the fly (1×B,
``scale_fmt``) and multiplied with per-block float32 promotion. ``backend`` chooses the path:

    "triton"     moela.kernels.fp8_linear (CUDA with sm_89+, or the CPU interpreter in tests)
    "reference"  moela.reference.quant_act + fp8_gemm in float32, + bias, cast: the same numbers,
                 in plain torch (slow; any device)
    "dequant"    DeepSeek's "bf16" gemm_impl: dequantize the weight to x.dtype and F.linear (the
                 activation is not quantized; for GPUs without FP8)
    "auto"       "triton" on a CUDA device of compute capability >= 8.9 with in_features a multiple
                 of B, "dequant" on other CUDA devices, "reference" on the CPU

These parameters are frozen (inference). ``master_weights=True`` makes the layer trainable in
FP8 instead, DeepSeek-V3's recipe (``moela.model.fp8_training``): ``weight`` is then a floating
master weight (``dtype``, what ``nn.Linear`` holds; no ``weight_scale_inv``), re-quantized to
128×128-block e4m3 once per optimizer step, and forward, dgrad and wgrad all run in FP8 on the
"triton" path (CUDA or the CPU interpreter) or the "reference" path (the same steps in torch);
"auto" picks "triton" on an FP8-capable GPU with ``in_features`` a multiple of the block.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moela import reference
from moela.reference._checks import FLOAT_DTYPES, check_tensor

from .backend import ops_for
from .fp8_training import MASTER_DTYPES, FP8WeightCache, fp8_linear_train

__all__ = ["FP8Linear", "BACKENDS"]

BACKENDS = ("auto", "triton", "reference", "dequant")


class FP8Linear(nn.Module):
    """``y = x · dequant(weight)ᵀ + bias`` with FP8 weights and on-the-fly FP8 activations.

    Example::

        layer = FP8Linear.from_linear(nn.Linear(7168, 2048, bias=False).cuda().bfloat16())
        y = layer(x)                        # x (..., 7168) bf16 -> (..., 2048) bf16
        layer.load_state_dict({"weight": w_fp8, "weight_scale_inv": s})  # a DeepSeek checkpoint

        train = FP8Linear(7168, 2048, master_weights=True, device="cuda")  # bf16 master, FP8 GEMMs
        train(x).sum().backward()           # train.weight.grad: bf16, from the FP8 wgrad
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        *,
        block: int = 128,
        scale_fmt: str | None = None,
        backend: str = "auto",
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
        master_weights: bool = False,
    ) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        if not isinstance(master_weights, bool):
            raise TypeError(f"master_weights: expected a bool, got {master_weights!r}")
        if master_weights and backend == "dequant":
            raise ValueError("backend: 'dequant' is an inference path of e4m3 weights; master_weights=True trains "
                             "through 'triton', 'reference' or 'auto'")
        if master_weights and dtype not in MASTER_DTYPES:
            raise TypeError(f"dtype: master weights are bfloat16/float16/float32, got {dtype}")
        if scale_fmt not in (None, "ue8m0"):
            raise ValueError(f"scale_fmt: expected None or 'ue8m0', got {scale_fmt!r}")
        for name, v in (("in_features", in_features), ("out_features", out_features), ("block", block)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        self.in_features, self.out_features = in_features, out_features
        self.block, self.scale_fmt, self.backend = block, scale_fmt, backend
        self.master_weights = master_weights
        if master_weights:
            self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device))
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's initialisation
            self.fp8_cache = FP8WeightCache(block, scale_fmt)
        else:
            nb, kb = math.ceil(out_features / block), math.ceil(in_features / block)
            self.weight = nn.Parameter(
                torch.zeros(out_features, in_features, dtype=reference.FP8_DTYPE, device=device), requires_grad=False
            )
            self.weight_scale_inv = nn.Parameter(
                torch.ones(nb, kb, dtype=torch.float32, device=device), requires_grad=False
            )
        if bias:
            b = torch.zeros(out_features, dtype=dtype, device=device)
            self.bias = nn.Parameter(b, requires_grad=master_weights)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        block: int = 128,
        scale_fmt: str | None = None,
        weight_scale_fmt: str | None = None,
        backend: str = "auto",
        master_weights: bool = False,
    ) -> FP8Linear:
        """Quantize an ``nn.Linear``'s weight into 128×128-block e4m3 (``weight_scale_fmt``: None
        for float32 scales, DeepSeek's checkpoints; "ue8m0" for power-of-two ones). The bias keeps
        the linear's dtype; ``scale_fmt`` is the activation scale format used in forward.

        ``master_weights=True``: a trainable FP8 layer holding a copy of the linear's weight and
        bias as they are (its e4m3 copies use ``scale_fmt``; ``weight_scale_fmt`` is unused)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, block=block,
                    scale_fmt=scale_fmt, backend=backend, dtype=w.dtype, device=w.device,
                    master_weights=master_weights)
        if master_weights:
            with torch.no_grad():
                layer.weight.copy_(w)
                if linear.bias is not None:
                    layer.bias.copy_(linear.bias.detach())
            return layer
        if w.is_cuda and _fp8_capable(w.device):
            from moela.kernels.fp8_quant import quant_weight
        else:
            quant_weight = reference.quant_weight
        q, s = quant_weight(w, block, weight_scale_fmt)
        layer.weight.data.copy_(q)
        layer.weight_scale_inv.data.copy_(s)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    def _apply(self, fn, recurse=True):
        if self.master_weights:  # a floating master weight follows .to(dtype) like nn.Linear's
            return super()._apply(fn, recurse)
        # .to(dtype) / .bfloat16() move the e4m3 weight and its float32 scales, never cast them
        from .quantize import keep_dtype

        return super()._apply(keep_dtype(fn, (self.weight, self.weight_scale_inv)), recurse)

    def resolved_backend(self, x: torch.Tensor) -> str:
        """The path ``forward(x)`` takes (see the module docstring for "auto")."""
        if self.backend != "auto":
            return self.backend
        if self.master_weights:
            aligned = self.in_features % self.block == 0 and self.block in (32, 64, 128, 256)
            return "triton" if x.is_cuda and aligned and _fp8_capable(x.device) else "reference"
        if x.is_cuda:
            aligned = self.in_features % self.block == 0 and self.block in (32, 64, 128, 256)
            return "triton" if aligned and _fp8_capable(x.device) else "dequant"
        return "reference"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) float -> (..., out_features) in x's dtype (the "triton" kernel: 16/32-bit x)."""
        check_tensor("x", x, dtypes=FLOAT_DTYPES)
        if x.ndim == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"x: expected a last dim of {self.in_features}, got shape {tuple(x.shape)}")
        if x.device != self.weight.device:
            raise ValueError(f"x: expected device {self.weight.device} (the layer's), got {x.device}")
        backend = self.resolved_backend(x)
        if self.master_weights:
            return fp8_linear_train(x, self.weight, self.bias, self.fp8_cache, ops_for(backend, x.device))
        if backend == "triton":
            from moela.kernels.fp8_linear import fp8_linear

            return fp8_linear(x, self.weight, self.weight_scale_inv, self.bias, self.scale_fmt, self.block)
        if backend == "dequant":
            w = reference.dequant(self.weight, self.weight_scale_inv, self.block, out_dtype=x.dtype)
            # the bias keeps the layer's dtype (bf16 by default); the other paths add it in float32
            return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))
        x2 = x.reshape(-1, self.in_features)
        q, s = reference.quant_act(x2, self.block, self.scale_fmt)
        y = reference.fp8_gemm(q, s, self.weight, self.weight_scale_inv, torch.float32, self.block)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"block={self.block}, scale_fmt={self.scale_fmt}, backend={self.backend!r}"
                + (", master_weights=True" if self.master_weights else ""))


def _fp8_capable(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= (8, 9)
