"""Array → matplotlib Figure, for the analysis report (Agg backend, no display needed).

Every function takes plain arrays (one entry per run, so two runs share the axes in comparison
mode) and returns a Figure; nothing here computes a metric.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

STYLES = ["-o", "--s", ":^", "-.d"]


def _finish(fig):
    for ax in fig.axes:
        if ax.get_xlabel() in ("step k", "index i", "invariant i", "head"):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return fig


def panels(specs: list[dict], ncols: int | None = None, size=(4.2, 3.2)):
    """Line panels. Each spec: {"title", "ylabel", "xlabel", "series": [(label, x, y)],
    "logy": bool, "hline": value or None}."""
    n = len(specs)
    ncols = ncols or min(n, 2)
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), dpi=100,
                             squeeze=False)
    for ax, spec in zip(axes.flat, specs):
        for i, (label, x, y) in enumerate(spec["series"]):
            y = np.asarray(y, dtype=float)
            if spec.get("logy"):
                y = np.where(y > 0, y, np.nan)
            ax.plot(x, y, STYLES[i % len(STYLES)], ms=3, lw=1.2, label=label)
        if spec.get("hline") is not None:
            ax.axhline(spec["hline"], color="gray", lw=0.8, ls="--")
        if spec.get("logy"):
            ax.set_yscale("log")
        ax.set_title(spec["title"], fontsize=10)
        ax.set_xlabel(spec.get("xlabel", "step k"))
        ax.set_ylabel(spec.get("ylabel", ""))
        ax.grid(alpha=0.3)
        if any(lbl for lbl, _, _ in spec["series"]):
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    return _finish(fig)


def loss_curves(runs: list[tuple[str, list[dict]]]):
    """Training records (metrics.jsonl) of each run: batch loss (thin) and val loss (markers)."""
    fig, ax = plt.subplots(figsize=(6.4, 4), dpi=100)
    for i, (label, records) in enumerate(runs):
        tr = [(r["iter"], r["loss"]) for r in records if r.get("kind") == "train"]
        ev = [(r["iter"], r["val_loss"]) for r in records if r.get("kind") == "eval"]
        color = f"C{i}"
        if tr:
            ax.plot(*zip(*tr), lw=0.6, alpha=0.5, color=color, label=f"{label} train (batch)")
        if ev:
            ax.plot(*zip(*ev), "s-", ms=3, color=color, label=f"{label} val")
    ax.set_xlabel("iteration")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    return _finish(fig)


def heatmaps(runs: list[tuple[str, np.ndarray]], title: str, xlabel: str, ylabel: str,
             cbar: str):
    """One (rows = steps) × (cols) heatmap per run, e.g. attention entropy per step and head."""
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.4), dpi=100,
                             squeeze=False)
    for ax, (label, M) in zip(axes.flat, runs):
        M = np.asarray(M, dtype=float)
        im = ax.imshow(M, aspect="auto", origin="lower", cmap="viridis")
        ax.set_title(f"{title} — {label}" if label else title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_xticks(range(M.shape[1]))
        ax.set_yticks(range(M.shape[0]))
        fig.colorbar(im, ax=ax, label=cbar)
    return _finish(fig)


def spectra(runs: list[tuple[str, np.ndarray, np.ndarray]]):
    """Left: largest singular values of each step's Jacobian (one line per rank, per run);
    right: Lyapunov spectrum λ_i against index i."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=100)
    for i, (label, sv, lyap) in enumerate(runs):
        sv = np.asarray(sv)
        for r in range(sv.shape[1]):
            a.plot(range(sv.shape[0]), sv[:, r], STYLES[i % len(STYLES)], ms=3, color=f"C{i}",
                   alpha=1.0 - 0.6 * r / max(sv.shape[1], 1),
                   label=label if r == 0 and label else None)
        b.plot(range(1, len(lyap) + 1), lyap, STYLES[i % len(STYLES)], ms=4, color=f"C{i}",
               label=label or None)
    a.axhline(1.0, color="gray", lw=0.8, ls="--")
    a.set_yscale("log")
    a.set_title("Jacobian singular values σ_1..σ_r per step", fontsize=10)
    a.set_xlabel("step k")
    a.set_ylabel("σ (log)")
    b.axhline(0.0, color="gray", lw=0.8, ls="--")
    b.set_title("finite-time Lyapunov spectrum of the flow", fontsize=10)
    b.set_xlabel("index i")
    b.set_ylabel("λ_i (per unit layer-time)")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        if any(lbl for lbl, _, _ in runs):
            ax.legend(fontsize=8)
    return _finish(fig)


def pca_paths(runs: list[tuple[str, dict, list[str]]]):
    """Token trajectories projected on the top two principal components, start ○ end ●."""
    fig, axes = plt.subplots(1, len(runs), figsize=(4.6 * len(runs), 4), dpi=100, squeeze=False)
    for ax, (label, pca, names) in zip(axes.flat, runs):
        P = np.asarray(pca["paths"])
        for j in range(P.shape[1]):
            ax.plot(P[:, j, 0], P[:, j, 1], "-", lw=1.2, color=f"C{j}",
                    label=names[j] if j < len(names) else None)
            ax.plot(P[0, j, 0], P[0, j, 1], "o", mfc="white", color=f"C{j}", ms=6)
            ax.plot(P[-1, j, 0], P[-1, j, 1], "o", color=f"C{j}", ms=6)
        ev = pca["explained"]
        ax.set_xlabel(f"PC1 ({100 * ev[0]:.0f}% var)")
        ax.set_ylabel(f"PC2 ({100 * ev[1]:.0f}% var)")
        ax.set_title(f"token paths through layer-time{' — ' + label if label else ''}",
                     fontsize=10)
        ax.grid(alpha=0.3)
        if names:
            ax.legend(fontsize=7)
    return _finish(fig)


def bars(runs: list[tuple[str, np.ndarray]], title: str, ylabel: str, logy: bool = False):
    fig, ax = plt.subplots(figsize=(4.6, 3.4), dpi=100)
    w = 0.8 / max(len(runs), 1)
    for i, (label, v) in enumerate(runs):
        v = np.asarray(v, dtype=float)
        ax.bar(np.arange(1, len(v) + 1) + (i - (len(runs) - 1) / 2) * w, v, width=w,
               label=label or None)
    if logy:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("invariant i (best first)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, axis="y")
    if any(lbl for lbl, _ in runs):
        ax.legend(fontsize=8)
    return _finish(fig)


def save(fig, path) -> None:
    fig.savefig(path)
    plt.close(fig)
