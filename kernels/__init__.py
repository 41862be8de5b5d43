"""moela.kernels: Triton kernels with the op contract's names and signatures.

Each op has the signature and semantics of its reference in ``moela.reference``, is a
``torch.library`` custom op (``torch.ops.moela.<op>``) with a fake implementation (and an
autograd formula where it has a backward), and never synchronises with the host.

Without a GPU the kernels run through the Triton interpreter: set ``TRITON_INTERPRET=1``
*before* importing this package, and call ``moela.kernels.interpreter.install_compat()``
for GPU-exact bf16/fp8 arithmetic (tests/conftest.py and ``python -m moela.profiling`` do).
"""

from .fp8_gemm import fp8_gemm
from .fp8_grouped_gemm import fp8_grouped_gemm
from .fp8_linear import fp8_linear
from .fp8_quant import dequant, quant_act, quant_weight
from .gate import gate, route
from .grouped_gemm import grouped_gemm, grouped_gemm_dw
from .mla_decode import mla_decode
from .permute import permute, unpermute
from .routing import make_routing
from .swiglu import swiglu

__all__ = [
    "route", "gate", "grouped_gemm", "grouped_gemm_dw", "make_routing", "permute", "unpermute",
    "quant_act", "quant_weight", "dequant", "fp8_gemm", "fp8_grouped_gemm", "fp8_linear", "mla_decode", "swiglu",
]
