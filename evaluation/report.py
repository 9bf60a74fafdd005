"""The evaluation's figures: 2-D projections before and after correction, the per-block probe curve and the
channel leave-one-out bars (the metrics table is `camae.metrics.markdown_table`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.decomposition import PCA

from camae.plots import plt, save


def plot_projections(meta: pd.DataFrame, embeddings: dict[str, np.ndarray], path: Path) -> Path:
    """2-D PCA of each correction's embeddings, coloured by plate (top) and by perturbation (bottom)."""
    fig, axes = plt.subplots(2, len(embeddings), figsize=(4 * len(embeddings), 8), squeeze=False)
    for col, (method, X) in enumerate(embeddings.items()):
        xy = PCA(n_components=2).fit_transform(X)
        for row, key in enumerate(("plate", "label")):
            ax = axes[row, col]
            for i, (value, idx) in enumerate(meta.groupby(key).indices.items()):
                ax.scatter(xy[idx, 0], xy[idx, 1], s=6, color=plt.cm.tab20(i % 20), label=str(value))
            ax.set_title(f"{method}: by {'perturbation' if key == 'label' else key}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            if col == len(embeddings) - 1:
                ax.legend(fontsize=6, markerscale=2, loc="center left", bbox_to_anchor=(1, 0.5))
    return save(fig, path)


def plot_curve(x, ys: dict[str, list[float]], xlabel: str, ylabel: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, y in ys.items():
        ax.plot(x, y, marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save(fig, path)


def plot_bars(values: dict[str, float], reference: float, ylabel: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(1.5 + 0.6 * len(values), 3.5))
    ax.bar(list(values), list(values.values()), color="tab:blue")
    ax.axhline(reference, color="k", linestyle="--", linewidth=1, label="all channels")
    ax.set_ylabel(ylabel)
    ax.set_xlabel("channel left out")
    ax.legend(fontsize=8)
    return save(fig, path)
