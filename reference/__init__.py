"""moela.reference: the pure-PyTorch ground truth (no Triton import).

Readable definitions of every op and layer; kernels, tests and benchmarks import them.
"""

from .config import PRESETS, ModelArgs, load_config
from .dispatch import RoutingPlan, make_routing, max_rows, permute, unpermute
from .fp8 import (
    FP8_DTYPE,
    FP8_MAX,
    dequant,
    fp8_gemm,
    fp8_grouped_gemm,
    fp8_grouped_gemm_masked,
    fp8_linear,
    quant_act,
    quant_weight,
)
from .fp8_train import fp8_dgrad, fp8_grouped_dgrad, fp8_grouped_wgrad, fp8_wgrad, quant_act_dual, quant_act_t
from .grouped_gemm import grouped_gemm, grouped_gemm_dw, grouped_gemm_masked
from .metrics import calc_diff, cosine_diff
from .mla import MLA, KVCache, RMSNorm, apply_rotary_emb, precompute_freqs_cis, rms_norm
from .mla_decode import mla_decode
from .moe import MLP, Gate, MoE, gate, route, swiglu

__all__ = [
    "ModelArgs", "PRESETS", "load_config",
    "Gate", "MLP", "MoE", "gate", "route", "swiglu",
    "RoutingPlan", "make_routing", "max_rows", "permute", "unpermute",
    "grouped_gemm", "grouped_gemm_dw", "grouped_gemm_masked",
    "FP8_DTYPE", "FP8_MAX", "quant_act", "quant_weight", "dequant", "fp8_gemm", "fp8_grouped_gemm",
    "fp8_grouped_gemm_masked", "fp8_linear",
    "quant_act_t", "quant_act_dual", "fp8_dgrad", "fp8_grouped_dgrad", "fp8_wgrad", "fp8_grouped_wgrad",
    "mla_decode", "MLA", "KVCache", "RMSNorm", "rms_norm", "precompute_freqs_cis", "apply_rotary_emb",
    "calc_diff", "cosine_diff",
]
