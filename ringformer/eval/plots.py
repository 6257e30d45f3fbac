"""Plots of evaluation results: loss against position in the window, passkey heatmaps.

matplotlib is imported inside each function: only the tool writes plots, and the trainer's
eval step should not pay for the import.
"""

from __future__ import annotations

import itertools
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
    # Generation mode (passkey_gen) has no rank scoring: one panel.
    panels = [(f, table[m], n) for f, m, n in (
        ("greedy_accuracy", "greedy_mean", "greedy decoding"),
        ("rank_accuracy", "rank_mean", "rank among candidates")) if f in table]
    fig = Figure(figsize=(2.5 + (1.0 + len(lengths)) * len(panels), 3.0 + 0.3 * len(depths)),
                 dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    for ax, (field, mean, name) in zip(axes, panels, strict=True):
        im = heatmap(ax, table[field], lengths, depths)
        ax.set_title(f"{name}: {mean:.0%}")
    axes[0].set_ylabel("key depth")
    fig.colorbar(im, ax=list(axes), shrink=0.8, label="accuracy")
    if title:
        fig.suptitle(title)
    path = Path(path)
    fig.savefig(path)
    return path


def heatmap(ax, grid, lengths, depths):
    """One accuracy grid [length][depth] (None: no prompt there) drawn depth down, length across."""
    acc = np.array([[np.nan if v is None else v for v in row] for row in grid], float).T
    return accuracy_grid(ax, acc, [str(n) for n in lengths], [f"{d:.0%}" for d in depths],
                         "prompt length (tokens)")


def accuracy_grid(ax, acc: np.ndarray, columns: list[str], rows: list[str], xlabel: str):
    """Accuracies [row][column] in [0, 1] (nan: none) as a red-to-green grid, each cell
    written in."""
    im = ax.imshow(acc, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(columns)), columns)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel(xlabel)
    for i in range(acc.shape[0]):
        for j in range(acc.shape[1]):
            if not np.isnan(acc[i, j]):
                ax.text(j, i, f"{acc[i, j]:.2f}", ha="center", va="center", fontsize=8)
    return im


def plot_stages_passkey(tables: dict, path: str | Path) -> Path:
    """Greedy passkey heatmaps of several runs side by side (name -> passkey table)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n_len = max(len(t["lengths"]) for t in tables.values())
    n_dep = max(len(t["depths"]) for t in tables.values())
    fig = Figure(figsize=(2.5 + (1.0 + n_len) * len(tables), 3.0 + 0.3 * n_dep), dpi=100,
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(tables), squeeze=False, sharey=True)[0]
    for ax, (name, t) in zip(axes, tables.items(), strict=True):
        im = heatmap(ax, t["greedy_accuracy"], t["lengths"], t["depths"])
        ax.set_title(f"{name}: greedy {t['greedy_mean']:.0%}")
    axes[0].set_ylabel("key depth")
    fig.colorbar(im, ax=list(axes), shrink=0.8, label="exact-match accuracy")
    path = Path(path)
    fig.savefig(path)
    return path


def plot_stages_distance(rows: dict, edges, path: str | Path) -> Path:
    """Greedy accuracy against how far back the key sits, several runs on one plot (name ->
    [(found, prompts)] per bucket between consecutive `edges`; `report.by_distance`)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    labels = [f"{a // 1024}-{b // 1024}K" if a else f"<{b // 1024}K"
              for a, b in itertools.pairwise(edges)]
    for name, counts in rows.items():
        acc = [f / n if n else np.nan for f, n in counts]
        ax.plot(range(len(labels)), acc, marker="o", label=name)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("tokens between the key and the end of the prompt")
    ax.set_ylabel("greedy exact-match accuracy")
    ax.set_title("passkey retrieval by distance (all lengths pooled)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    path = Path(path)
    fig.savefig(path)
    return path


def plot_stages_loss(results: dict, path: str | Path) -> Path:
    """Loss by position of several runs' evaluations on one plot (name -> eval result)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, r in results.items():
        buckets = r["loss_by_position"]
        x = [math.sqrt((b["start"] + 1) * b["end"]) for b in buckets]
        ax.plot(x, [b["loss"] for b in buckets], marker="o",
                label=f"{name}: loss {r['loss']:.3f} over {r['tokens']:,} tokens")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens of context seen (position in window + 1)")
    ax.set_ylabel("mean NLL (nats / token)")
    ax.set_title("held-out long documents, loss by position")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path
