"""Running the Triton runs on a CPU: the Triton interpreter, with tiles that suit it.

The interpreter runs a kernel's programs one after another in Python, at a roughly constant cost
per program whatever its tile size, so on a CPU the fewest, largest tiles are the fastest: the
opposite of a GPU's choice. :func:`use_interpreter` sets ``TRITON_INTERPRET=1`` and pins the large
configs below through moela's ``MOELA_<KERNEL>_CONFIG`` switches (``moela.knobs``), each only if
unset, before ``moela.kernels`` is first imported (both are read when the kernels are defined).
The numbers are the same for any tile: only the time changes.
"""

from __future__ import annotations

import os
import sys

import torch

__all__ = ["INTERPRETER_TILES", "use_interpreter"]

#: autotuner name -> the config pinned under the interpreter (FP8 tiles: multiples of the 128 block).
INTERPRETER_TILES = {
    "fp8_gemm_small": "BLOCK_M=64,BLOCK_N=256,GROUP_M=8",
    "fp8_gemm_medium": "BLOCK_M=128,BLOCK_N=256,GROUP_M=8",
    "fp8_gemm_large": "BLOCK_M=128,BLOCK_N=256,GROUP_M=8",
    "fp8_dgrad_small": "BLOCK_M=64,BLOCK_K=256,GROUP_M=8",
    "fp8_dgrad_medium": "BLOCK_M=128,BLOCK_K=256,GROUP_M=8",
    "fp8_dgrad_large": "BLOCK_M=128,BLOCK_K=256,GROUP_M=8",
    "fp8_wgrad": "BLOCK_N=256,BLOCK_K=256,GROUP_N=8",
    "fp8_wgrad_tma": "BLOCK_M=256,BLOCK_N=256,GROUP_M=8",
    "fp8_grouped_gemm_small": "BLOCK_M=64,BLOCK_N=256,GROUP_M=8",
    "fp8_grouped_gemm_medium": "BLOCK_M=64,BLOCK_N=256,GROUP_M=8",
    "fp8_grouped_gemm_large": "BLOCK_M=128,BLOCK_N=256,GROUP_M=8",
    "fp8_grouped_dgrad_small": "BLOCK_M=64,BLOCK_K=256,GROUP_M=8",
    "fp8_grouped_dgrad_medium": "BLOCK_M=64,BLOCK_K=256,GROUP_M=8",
    "fp8_grouped_dgrad_large": "BLOCK_M=128,BLOCK_K=256,GROUP_M=8",
    "fp8_grouped_wgrad": "BLOCK_N=256,BLOCK_K=256,GROUP_N=8",
    "grouped_gemm_fwd_decode": "BLOCK_M=64,BLOCK_N=256,BLOCK_K=128,GROUP_M=8",
    "grouped_gemm_fwd_medium": "BLOCK_M=64,BLOCK_N=256,BLOCK_K=128,GROUP_M=8",
    "grouped_gemm_fwd_prefill": "BLOCK_M=128,BLOCK_N=256,BLOCK_K=128,GROUP_M=8",
    "grouped_gemm_dw": "BLOCK_M=64,BLOCK_N=256,BLOCK_K=256,GROUP_N=8",
    "swiglu": "BLOCK_M=128,BLOCK_N=128",
    "swiglu_bwd": "BLOCK_M=128,BLOCK_N=128",
    "swiglu_fp8": "BLOCK_M=128",
    "quant_act_t": "BLOCK_K=256",
}


def use_interpreter() -> bool:
    """Without CUDA, switch the Triton interpreter on with :data:`INTERPRETER_TILES` (before the
    kernels load); True if the kernels will run interpreted."""
    if torch.cuda.is_available():
        return False
    if "moela.kernels" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        from moela import knobs

        for name, config in INTERPRETER_TILES.items():
            os.environ.setdefault(knobs.config_knob(name), config)
    return True
