"""The trainer's PNGs (matplotlib, no display needed): loss curves and per-expert load over steps."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .loop import RunResult  # noqa: E402

__all__ = ["plot_losses", "plot_expert_load"]


def _ema(values: list[float], alpha: float) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else alpha * v + (1 - alpha) * acc
        out.append(acc)
    return out


def plot_losses(results: list[RunResult], path: Path, title: str) -> Path:
    """Training loss per step (faint), its moving average (line) and the held-out loss (markers)
    of every run, one axis."""
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    alpha = min(1.0, 5.0 / max(1, len(results[0].losses) if results else 1))
    for i, r in enumerate(results):
        color = f"C{i}"
        steps = range(1, len(r.losses) + 1)
        ax.plot(steps, r.losses, color=color, lw=0.6, alpha=0.3)
        ax.plot(steps, _ema(r.losses, alpha), color=color, lw=1.3, label=f"{r.name} (train, moving average)")
        ax.plot(r.eval_steps, r.eval_losses, "o--", color=color, ms=4, lw=1.0,
                label=f"{r.name} (held out, final {r.final_eval:.3f})")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / byte)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_expert_load(results: list[RunResult], path: Path, title: str) -> Path:
    """Each routed expert's share of the routed tokens per step, MoE layers averaged, one panel per run;
    the dashed line is a perfect balance (1/E)."""
    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.4), dpi=110, sharey=True, squeeze=False)
    for ax, r in zip(axes[0], results, strict=True):
        if not r.expert_load or not r.expert_load[0]:
            continue
        n_layers, n_experts = len(r.expert_load[0]), len(r.expert_load[0][0])
        steps = range(1, len(r.expert_load) + 1)
        for e in range(n_experts):
            share = [sum(layer[e] for layer in step) / n_layers for step in r.expert_load]
            ax.plot(steps, share, lw=1.0, label=f"expert {e}" if n_experts <= 8 else None)
        ax.axhline(1 / n_experts, color="k", ls="--", lw=0.8)
        ax.set_title(r.name, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("share of routed tokens")
    if len(results) and results[0].expert_load and len(results[0].expert_load[0][0]) <= 8:
        axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
