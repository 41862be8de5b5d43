"""moela.integrations: moela's ops behind other projects' interfaces (imported on demand).

- ``moela.integrations.hf``    ``patch(model)`` / ``unpatch(model)``: moela's routing, experts and
  absorbed MLA inside a Hugging Face transformers (>= 5) DeepSeek-V2/V3 model (needs the ``hf``
  extra: ``pip install 'moela[hf]'``).
- ``moela.integrations.vllm``  ``fused_experts(...)`` with vLLM's Triton MoE conventions (no vLLM
  needed).

Nothing else in moela imports this package.
"""
