"""moela.model: drop-in nn.Modules built from the contract ops.

Each module takes a :class:`moela.reference.ModelArgs` whose ``backend`` picks the Triton
kernels ("triton", or "auto" on CUDA) or the PyTorch references ("reference", or "auto" on
CPU), and whose ``dtype`` picks bf16 or fp8 expert weights. ``state_dict()`` keys are
DeepSeek's; Hugging Face names load through :func:`load_checkpoint`.
"""

from moela.reference import RMSNorm

from .backend import BACKENDS, ops_for
from .checkpoint import CheckpointKeyError, load_checkpoint, save_checkpoint
from .decode_graph import DecodeGraph
from .latent_cache import LatentCache, PagedLatentCache
from .linear import FP8Linear
from .mla import MLA
from .moe import Gate, MoE, grouped_experts, routed_experts, sequence_balance_loss
from .quantize import quantize_linears_
from .transformer import Block, Transformer

__all__ = [
    "BACKENDS", "ops_for", "CheckpointKeyError", "load_checkpoint", "save_checkpoint",
    "Gate", "MoE", "grouped_experts", "routed_experts", "sequence_balance_loss", "MLA", "LatentCache",
    "PagedLatentCache", "FP8Linear", "RMSNorm", "quantize_linears_",
    "Block", "Transformer", "DecodeGraph",
]
