"""moela: DeepSeek-V3-style MoE, MLA and FP8 — PyTorch references and Triton kernels.

Subpackages (each imported on demand; nothing here touches a GPU at import time):

- ``moela.reference``  pure-PyTorch ground truth (configs, MoE, MLA, FP8, op references)
- ``moela.kernels``    Triton kernels, launchers and torch.library ops
- ``moela.model``      drop-in nn.Modules
- ``moela.profiling``  benchmarks, telemetry, reports (``python -m moela.profiling``)
- ``moela.integrations``  ``hf.patch(model)`` for transformers, vLLM-shaped ``vllm.fused_experts``
"""

__version__ = "0.1.0"
