"""AdamW on float32 master weights for a model whose parameters are bf16 (or any float dtype).

DeepSeek-V3's recipe keeps the master weights in float32 while the GEMMs read lower-precision
copies (bf16 here, and for ``train_fp8`` layers the e4m3 copies re-quantized from them). This
optimizer holds a float32 copy of every trainable parameter, casts the parameters' gradients to
float32, clips their global norm there, steps torch's AdamW on the copies and writes the result
back into the parameters. No host synchronisation.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["MasterWeightAdamW"]


class MasterWeightAdamW:
    """``torch.optim.AdamW`` over float32 masters of ``params``; ``step()`` copies them back.

    Example::

        opt = MasterWeightAdamW(model.parameters(), lr=1e-3)
        loss.backward(); opt.step(); opt.zero_grad()
    """

    def __init__(self, params: Iterable[nn.Parameter], lr: float, betas=(0.9, 0.95), weight_decay: float = 0.1,
                 max_grad_norm: float | None = 1.0):
        self.max_grad_norm = max_grad_norm
        self.params = [p for p in params if p.requires_grad]
        self.masters = [p.detach().float().clone() for p in self.params]
        decay = [m for p, m in zip(self.params, self.masters, strict=True) if p.ndim >= 2]
        no_decay = [m for p, m in zip(self.params, self.masters, strict=True) if p.ndim < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas)

    @property
    def param_groups(self) -> list[dict]:
        return self.opt.param_groups

    @torch.no_grad()
    def step(self) -> None:
        for p, m in zip(self.params, self.masters, strict=True):
            m.grad = None if p.grad is None else p.grad.float()
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([m for m in self.masters if m.grad is not None], self.max_grad_norm)
        self.opt.step()
        for p, m in zip(self.params, self.masters, strict=True):
            p.copy_(m)  # bumps the parameter's version: FP8 layers re-quantize at the next forward

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
