"""Plots of evaluation results: loss against position in the window, passkey heatmaps.

matplotlib is imported inside each function: only the tool writes plots, and the trainer's
eval step should not pay for the import.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def plot_loss_by_position(result: dict, path: str | Path, title: str = "") -> Path:
    """Mean NLL against tokens of context (log2 x axis), one point per bucket, as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    buckets = result["loss_by_position"]
    # A prediction at window index i has seen i + 1 tokens: bucket [start, end) spans
    # [start + 1, end] tokens of context; plot at its geometric middle.
    x = [math.sqrt((b["start"] + 1) * b["end"]) for b in buckets]
    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(x, [b["loss"] for b in buckets], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens of context seen (position in window + 1)")
    ax.set_ylabel("mean NLL (nats / token)")
    ax.set_title(title or f"context {result['context']}: loss {result['loss']:.4f}, "
                          f"ppl {result['ppl']:.3f}, {result['tokens']:,} tokens")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path


def plot_passkey(table: dict, path: str | Path, title: str = "") -> Path:
    """Needle-in-a-haystack heatmaps (depth down, length across) for both scorings."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lengths, depths = table["lengths"], table["depths"]
    fig = Figure(figsize=(4.5 + 2.0 * len(lengths), 3.0 + 0.3 * len(depths)), dpi=100,
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, squeeze=False, sharey=True)[0]
    for ax, field, mean, name in ((axes[0], "greedy_accuracy", "greedy_mean", "greedy decoding"),
                                  (axes[1], "rank_accuracy", "rank_mean", "rank among candidates")):
        acc = np.asarray(table[field], dtype=float).T  # [depth, length]
        im = ax.imshow(acc, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("prompt length (tokens)")
        ax.set_title(f"{name}: {table[mean]:.0%}")
        for i in range(acc.shape[0]):
            for j in range(acc.shape[1]):
                ax.text(j, i, f"{acc[i, j]:.2f}", ha="center", va="center", fontsize=8)
    axes[0].set_ylabel("key depth")
    fig.colorbar(im, ax=list(axes), shrink=0.8, label="accuracy")
    if title:
        fig.suptitle(title)
    path = Path(path)
    fig.savefig(path)
    return path
