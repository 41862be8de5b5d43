"""The trainer's model and run sizes: ``tiny`` (a CPU, kernels through the Triton interpreter) and
``small`` (the default on a GPU: a ~34 M-parameter DeepSeek-style LM).

Both are DeepSeek-V3 in miniature: MLA attention (latent KV, decoupled RoPE keys), a first dense
layer, then MoE layers of fine-grained routed experts plus a shared expert, a sigmoid router with
the selection bias of aux-loss-free balancing (``MoE.update_gate_bias``), and every projection
and expert dimension a multiple of 128 (FP8's block) so that all three runs take the same model.
Vocabulary: the 256 byte values (``train.data``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from moela.reference import ModelArgs

from .data import VOCAB_SIZE

__all__ = ["Preset", "PRESETS", "student_args"]


@dataclass(frozen=True)
class Preset:
    """A model and how long to train it."""

    args: ModelArgs
    batch: int
    seq_len: int
    steps: int
    lr: float
    warmup: int
    eval_every: int
    corpus_bytes: int
    bias_rate: float  # update_gate_bias step per optimizer step
    n_eval: int = 4  # held-out batches per evaluation


_TINY = ModelArgs(
    vocab_size=VOCAB_SIZE, dim=128, inter_dim=256, moe_inter_dim=128, n_layers=1, n_dense_layers=0, n_heads=2,
    n_routed_experts=4, n_shared_experts=1, n_activated_experts=2, score_func="sigmoid", route_scale=1.0,
    q_lora_rank=0, kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=64,
    max_seq_len=64, original_seq_len=64, max_batch_size=8, gate_bias=True,
)
_SMALL = ModelArgs(
    vocab_size=VOCAB_SIZE, dim=512, inter_dim=1536, moe_inter_dim=128, n_layers=8, n_dense_layers=1, n_heads=8,
    n_routed_experts=16, n_shared_experts=1, n_activated_experts=4, n_expert_groups=4, n_limited_groups=2,
    score_func="sigmoid", route_scale=1.0, q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=64,
    qk_rope_head_dim=32, v_head_dim=64, max_seq_len=512, original_seq_len=512, max_batch_size=32, gate_bias=True,
)

PRESETS: dict[str, Preset] = {
    # 64 tokens per step: the Triton interpreter's cost grows with the programs, most of them per token
    "tiny": Preset(_TINY, batch=2, seq_len=32, steps=20, lr=5e-3, warmup=3, eval_every=5, corpus_bytes=1 << 20,
                   bias_rate=1e-2, n_eval=2),
    "small": Preset(_SMALL, batch=32, seq_len=512, steps=1000, lr=1e-3, warmup=50, eval_every=100,
                    corpus_bytes=64 << 20, bias_rate=1e-3),
}


def student_args(teacher: ModelArgs) -> ModelArgs:
    """A smaller student of ``teacher`` for distillation: half the layers (at least one) and half
    the routed experts (at least two), the same widths (FP8's 128 blocks) and vocabulary."""
    n_layers = max(1, teacher.n_layers // 2)
    experts = max(2, teacher.n_routed_experts // 2)
    groups = teacher.n_expert_groups if experts % teacher.n_expert_groups == 0 else 1
    return replace(
        teacher, n_layers=n_layers, n_dense_layers=min(teacher.n_dense_layers, n_layers - 1 if n_layers > 1 else 0),
        n_routed_experts=experts, n_activated_experts=min(teacher.n_activated_experts, experts),
        n_expert_groups=groups, n_limited_groups=min(teacher.n_limited_groups, groups),
        backend="auto", train_fp8=False,
    )
