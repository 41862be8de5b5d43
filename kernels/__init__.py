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

if __name__ == "kernels":
    # Found under the bare name ``kernels``: the repository root is on sys.path (``python -m`` or a
    # script run from a checkout). That name belongs to Hugging Face's ``kernels`` package (a
    # dependency of transformers), so this hands it over: the package found on the rest of
    # sys.path takes this module's place in sys.modules (the import system returns what is there
    # once this file has run), or the import fails as if this folder were not there. This folder
    # is only ever imported as ``moela.kernels``.
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.realpath(_os.path.dirname(_os.path.dirname(__file__)))
    _spec = _machinery.PathFinder.find_spec(
        "kernels", [p for p in _sys.path if _os.path.realpath(p or ".") != _root])
    if _spec is None or _spec.loader is None:
        raise ModuleNotFoundError("No module named 'kernels' (the repository's kernels/ folder is moela.kernels)",
                                  name="kernels")
    _module = _util.module_from_spec(_spec)
    _sys.modules["kernels"] = _module
    _spec.loader.exec_module(_module)
else:
    from moela import knobs

    if knobs.interpret():
        from .interpreter import install_compat

        install_compat()

    from .factory import registered_ops
    from .fp8_dgrad import fp8_dgrad
    from .fp8_gemm import fp8_gemm
    from .fp8_grouped_dgrad import fp8_grouped_dgrad
    from .fp8_grouped_gemm import fp8_grouped_gemm
    from .fp8_grouped_gemm_masked import fp8_grouped_gemm_masked
    from .fp8_grouped_wgrad import fp8_grouped_wgrad
    from .fp8_linear import fp8_linear
    from .fp8_quant import dequant, quant_act, quant_weight
    from .fp8_wgrad import fp8_wgrad
    from .gate import gate, route
    from .grouped_gemm import grouped_gemm, grouped_gemm_dw
    from .grouped_gemm_masked import grouped_gemm_masked
    from .mla_decode import mla_decode
    from .permute import permute, unpermute
    from .quant_act_dual import quant_act_dual
    from .quant_act_t import quant_act_t
    from .routing import make_routing
    from .swiglu import swiglu

    __all__ = [
        "route", "gate", "grouped_gemm", "grouped_gemm_dw", "grouped_gemm_masked", "make_routing", "permute",
        "unpermute", "quant_act", "quant_weight", "dequant", "fp8_gemm", "fp8_grouped_gemm", "fp8_grouped_gemm_masked",
        "fp8_linear", "mla_decode", "swiglu", "quant_act_t", "quant_act_dual", "fp8_dgrad", "fp8_grouped_dgrad",
        "fp8_wgrad", "fp8_grouped_wgrad", "registered_ops",
    ]
