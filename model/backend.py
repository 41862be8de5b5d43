"""Which implementation a module runs: the Triton kernels or the PyTorch references.

Both ``moela.kernels`` and ``moela.reference`` expose the ops of the contract under the same
names and signatures (``gate``/``route``, ``make_routing``, ``permute``, ``unpermute``,
``grouped_gemm``, ``quant_act``, ``fp8_grouped_gemm``...), so a module picks a namespace per
call from its config's ``backend`` and the input's device; no module global decides.
"""

from __future__ import annotations

from types import ModuleType

import torch

__all__ = ["ops_for", "BACKENDS"]

BACKENDS = ("auto", "triton", "reference")


def ops_for(backend: str, device: torch.device) -> ModuleType:
    """``moela.kernels`` for "triton" (and "auto" on CUDA), ``moela.reference`` otherwise.

    "triton" on a CPU tensor runs the kernels through the Triton interpreter, which must then
    be active (``TRITON_INTERPRET=1`` before moela.kernels is imported); the kernels check it.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "reference" or (backend == "auto" and device.type != "cuda"):
        import moela.reference as ops
    else:
        import moela.kernels as ops
    return ops
