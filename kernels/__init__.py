"""moela.kernels: Triton kernels with the op contract's names and signatures.

Each op has the signature and semantics of its reference in ``moela.reference`` (the same
contract check runs in both), is a ``torch.library`` custom op (``torch.ops.moela.<op>``) with a
fake implementation (and an autograd formula where it has a backward), and never synchronises
with the host. Every op is made by one factory (``moela.kernels.factory``); ``registered_ops()``
lists them.

Without a GPU the kernels run through the Triton interpreter: set ``TRITON_INTERPRET=1``
*before* importing this package. Importing it then installs the interpreter compatibility layer
(``moela.kernels.interpreter``: GPU-exact bf16/fp8 arithmetic), and the ops refuse to run on
CPU tensors while the layer is not installed.
"""

from moela import knobs

if knobs.interpret():
    from .interpreter import install_compat

    install_compat()

from .factory import registered_ops  # noqa: E402
from .fp8_dgrad import fp8_dgrad  # noqa: E402
from .fp8_gemm import fp8_gemm  # noqa: E402
from .fp8_grouped_dgrad import fp8_grouped_dgrad  # noqa: E402
from .fp8_grouped_gemm import fp8_grouped_gemm  # noqa: E402
from .fp8_grouped_wgrad import fp8_grouped_wgrad  # noqa: E402
from .fp8_linear import fp8_linear  # noqa: E402
from .fp8_quant import dequant, quant_act, quant_weight  # noqa: E402
from .fp8_wgrad import fp8_wgrad  # noqa: E402
from .gate import gate, route  # noqa: E402
from .grouped_gemm import grouped_gemm, grouped_gemm_dw  # noqa: E402
from .mla_decode import mla_decode  # noqa: E402
from .permute import permute, unpermute  # noqa: E402
from .quant_act_dual import quant_act_dual  # noqa: E402
from .quant_act_t import quant_act_t  # noqa: E402
from .routing import make_routing  # noqa: E402
from .swiglu import swiglu  # noqa: E402

__all__ = [
    "route", "gate", "grouped_gemm", "grouped_gemm_dw", "make_routing", "permute", "unpermute",
    "quant_act", "quant_weight", "dequant", "fp8_gemm", "fp8_grouped_gemm", "fp8_linear", "mla_decode", "swiglu",
    "quant_act_t", "quant_act_dual", "fp8_dgrad", "fp8_grouped_dgrad", "fp8_wgrad", "fp8_grouped_wgrad",
    "registered_ops",
]
