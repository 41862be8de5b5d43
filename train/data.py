"""The corpus that needs no download: the Python standard library's own source, as bytes.

Tokens are bytes (vocabulary 256, no tokenizer to train or ship). ``stdlib_corpus`` reads the
``.py`` files of the running interpreter's standard library in sorted path order (so every run on
one Python sees the same text), up to a byte budget; :class:`ByteBatches` cuts it into a training
part and a held-out tail and draws (B, S+1) windows: inputs are the first S bytes, targets the
next-byte shift. Training windows come from a seeded generator (the same batches for every run
of a comparison); evaluation windows are fixed.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch

__all__ = ["VOCAB_SIZE", "stdlib_corpus", "ByteBatches"]

VOCAB_SIZE = 256


def stdlib_corpus(max_bytes: int) -> bytes:
    """Up to ``max_bytes`` of the standard library's ``.py`` sources (site-packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, size = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "dist-packages" in path.parts:
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        chunks.append(data)
        size += len(data)
        if size >= max_bytes:
            break
    text = b"".join(chunks)[:max_bytes]
    if len(text) < 4096:
        raise RuntimeError(f"the standard library under {root} gave only {len(text)} bytes of Python source")
    return text


class ByteBatches:
    """Windows of a byte corpus: ``train(step)`` and ``eval_batches()``, each ``(x, y)`` int64 (B, S).

    The last ``eval_fraction`` of the corpus is held out; ``n_eval`` evaluation batches tile it from
    its start (the same for every run).
    """

    def __init__(self, data: bytes, batch: int, seq_len: int, *, seed: int = 0, eval_fraction: float = 0.05,
                 n_eval: int = 4, device: torch.device | str = "cpu"):
        tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
        split = int(len(tokens) * (1 - eval_fraction))
        self.train_tokens, self.eval_tokens = tokens[:split], tokens[split:]
        self.batch, self.seq_len, self.seed, self.device = batch, seq_len, seed, torch.device(device)
        need = n_eval * batch * (seq_len + 1)
        if len(self.eval_tokens) < need or len(self.train_tokens) < seq_len + 2:
            raise ValueError(f"corpus of {len(tokens)} bytes too small for {n_eval} eval batches of {batch}×{seq_len}")
        self.n_eval = n_eval

    def _windows(self, tokens: torch.Tensor, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = starts[:, None] + torch.arange(self.seq_len + 1)[None, :]
        w = tokens[idx]
        return w[:, :-1].to(self.device), w[:, 1:].to(self.device)

    def train(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``step`` (random windows, a function of the seed and the step only)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(0, len(self.train_tokens) - self.seq_len - 1, (self.batch,), generator=g)
        return self._windows(self.train_tokens, starts)

    def eval_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        span = self.batch * (self.seq_len + 1)
        return [self._windows(self.eval_tokens, i * span + torch.arange(self.batch) * (self.seq_len + 1))
                for i in range(self.n_eval)]
