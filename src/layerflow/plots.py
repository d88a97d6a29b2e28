"""Figures from arrays: every function returns or writes a matplotlib figure (Agg backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_losses(records: list[dict], path: str | Path | None = None, label: str = ""):
    """Training loss (thin) and evaluation losses (markers) against iteration."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    tr = [(r["iter"], r["loss"]) for r in records if r.get("kind") == "train"]
    ev = [r for r in records if r.get("kind") == "eval"]
    prefix = f"{label} " if label else ""
    if tr:
        ax.plot(*zip(*tr), lw=0.8, alpha=0.7, label=f"{prefix}train (batch)")
    if ev:
        ax.plot([r["iter"] for r in ev], [r["train_loss"] for r in ev], "o-", ms=3,
                label=f"{prefix}train (eval)")
        ax.plot([r["iter"] for r in ev], [r["val_loss"] for r in ev], "s-", ms=3,
                label=f"{prefix}val")
    ax.set_xlabel("iteration")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("loss")
    ax.grid(alpha=0.3)
    if tr or ev:
        ax.legend()
    fig.tight_layout()
    if path is not None:
        fig.savefig(path)
        plt.close(fig)
    return fig
