"""One training run of a moela Transformer: the step loop, evaluation, balancing and timing.

A run is a :class:`RunSpec` (which backend, bf16 or FP8 GEMMs) applied to a preset's model from a
given initial state, on the batches every run of a comparison shares. Each step: forward,
cross-entropy (or, distilling, the KL divergence to a teacher's logits), backward, gradient
clipping and :class:`~moela.train.optim.MasterWeightAdamW` (float32 masters), then every MoE
layer's ``update_gate_bias`` (aux-loss-free balancing) from the loads it counted, which are
recorded. Losses and loads stay on the device until the next evaluation (no host sync per step).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from moela.model import MoE, Transformer
from moela.reference import ModelArgs

from .data import ByteBatches
from .metrics import active_params, flops_per_token, mfu
from .optim import MasterWeightAdamW
from .presets import Preset

__all__ = ["RunSpec", "RunResult", "RUNS", "build_model", "train_run", "evaluate"]


@dataclass(frozen=True)
class RunSpec:
    name: str
    backend: str  # ModelArgs.backend
    train_fp8: bool


#: The comparison: the PyTorch references, the Triton kernels in bf16, the Triton kernels in FP8.
RUNS = (RunSpec("reference", "reference", False), RunSpec("triton-bf16", "triton", False),
        RunSpec("triton-fp8", "triton", True))


@dataclass
class RunResult:
    name: str
    losses: list[float] = field(default_factory=list)  # training loss per step
    eval_steps: list[int] = field(default_factory=list)
    eval_losses: list[float] = field(default_factory=list)  # cross-entropy on the held-out batches
    expert_load: list[list[list[float]]] = field(default_factory=list)  # [step][MoE layer][expert] token share
    seconds: float = 0.0
    tokens_per_s: float = 0.0  # after the warm-up steps
    mfu: float | None = None
    params: int = 0
    active_params: int = 0

    @property
    def final_eval(self) -> float:
        return self.eval_losses[-1]


def build_model(args: ModelArgs, device: torch.device, dtype: torch.dtype) -> Transformer:
    return Transformer(args).to(device=device, dtype=dtype).train()


def _moe_layers(model: Transformer) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def _ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())


@torch.no_grad()
def evaluate(model: Transformer, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean cross-entropy (nats per byte) over fixed held-out batches, in eval mode (no load counting)."""
    model.eval()
    total = sum(_ce(model(x), y).item() for x, y in batches) / len(batches)
    model.train()
    return total


def _lr(step: int, preset: Preset, steps: int) -> float:
    """Linear warm-up, then cosine decay to 10 %."""
    if step < preset.warmup:
        return preset.lr * (step + 1) / preset.warmup
    t = (step - preset.warmup) / max(1, steps - preset.warmup)
    return preset.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(t, 1.0))))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_run(spec: RunSpec, preset: Preset, args: ModelArgs, init_state: dict, batches: ByteBatches,
              device: torch.device, dtype: torch.dtype, steps: int, *, teacher: Transformer | None = None,
              warmup_steps: int = 2, progress: bool = True) -> tuple[RunResult, Transformer]:
    """Train ``args`` (with the spec's backend and precision) from ``init_state`` for ``steps`` steps."""
    torch.manual_seed(0)
    model = build_model(args.replace(backend=spec.backend, train_fp8=spec.train_fp8), device, dtype)
    model.load_state_dict(init_state)
    opt = MasterWeightAdamW(model.parameters(), lr=preset.lr)
    moes = _moe_layers(model)
    eval_batches = batches.eval_batches()
    flops_tok = flops_per_token(model, batches.seq_len)
    result = RunResult(spec.name, params=sum(p.numel() for p in model.parameters()),
                       active_params=active_params(model))
    tokens = batches.batch * batches.seq_len
    bar = tqdm(range(steps), desc=f"{spec.name:>12}", disable=not progress, dynamic_ncols=True, leave=True)
    start = timed_from = time.perf_counter()
    eval_seconds = 0.0  # after the warm-up, left out of the throughput
    pending_losses, pending_loads = [], []  # device tensors, read at the next evaluation
    for step in bar:
        if step == warmup_steps:
            _sync(device)
            timed_from = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = _lr(step, preset, steps)
        x, y = batches.train(step)
        logits = model(x)
        if teacher is None:
            loss = _ce(logits, y)
        else:
            with torch.no_grad():
                target = teacher(x).float().log_softmax(-1)
            loss = F.kl_div(logits.float().log_softmax(-1).flatten(0, 1), target.flatten(0, 1), log_target=True,
                            reduction="batchmean")
        loss.backward()
        opt.step()  # clips the gradients' norm in float32
        opt.zero_grad()
        if moes:  # each MoE layer's share of the routed tokens, then its balancing step
            loads = torch.stack([moe.expert_load.float() for moe in moes])
            pending_loads.append(loads / loads.sum(-1, keepdim=True).clamp_min(1))
            for moe in moes:
                moe.update_gate_bias(preset.bias_rate)
        pending_losses.append(loss.detach())
        if (step + 1) % preset.eval_every == 0 or step + 1 == steps:  # the host reads the device here only
            t0 = time.perf_counter()
            result.losses += torch.stack(pending_losses).tolist()
            result.expert_load += [l.tolist() for l in pending_loads]
            pending_losses, pending_loads = [], []
            result.eval_steps.append(step + 1)
            result.eval_losses.append(evaluate(model, eval_batches))
            bar.set_postfix(loss=f"{result.losses[-1]:.3f}", eval=f"{result.eval_losses[-1]:.3f}")
            if step >= warmup_steps:
                eval_seconds += time.perf_counter() - t0
    _sync(device)
    end = time.perf_counter()
    result.seconds = end - start
    timed = max(1, steps - warmup_steps)
    result.tokens_per_s = tokens * timed / max(end - timed_from - eval_seconds, 1e-9) if steps > warmup_steps else 0.0
    result.mfu = mfu(result.tokens_per_s, flops_tok, device)
    return result, model
