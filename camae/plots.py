"""Plots every job writes beside its outputs and logs to MLflow (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_confusion(matrix: np.ndarray, names: list[str], path: Path, title: str | None = None) -> Path:
    """A confusion matrix [true, predicted] with counts in the cells."""
    fig, ax = plt.subplots(figsize=(1 + 0.5 * len(names), 1 + 0.5 * len(names)))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=90)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title, fontsize=9)
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=7)
    return save(fig, path)


def plot_comparison(frame, path: Path, metric: str = "test/accuracy") -> Path:
    """Probes and fine-tunes side by side: `metric` per run with its 95% interval (`<metric>_ci_low/high`), the
    chance level dashed; rows in the frame's order, coloured by kind."""
    import pandas as pd

    rows = frame[frame[metric].notna()] if metric in frame else frame.iloc[:0]
    fig, ax = plt.subplots(figsize=(6.5, 1.2 + 0.35 * max(len(rows), 1)))
    y = np.arange(len(rows))[::-1]
    colors = rows["kind"].map({"probe": "tab:gray", "finetune": "tab:blue"}).fillna("tab:orange")
    ax.barh(y, rows[metric], color=list(colors), height=0.6)
    low, high = rows.get(f"{metric}_ci_low"), rows.get(f"{metric}_ci_high")
    if low is not None and high is not None:
        ax.errorbar(rows[metric], y, xerr=[rows[metric] - low, high - rows[metric]], fmt="none", ecolor="k",
                    capsize=3, linewidth=1)
    chance = rows.get(metric.replace("/", "/chance_", 1))
    if chance is not None and pd.notna(chance).any():
        ax.axvline(float(chance.dropna().iloc[0]), color="k", linestyle="--", linewidth=1, label="chance")
        ax.legend(fontsize=8, loc="lower right")
    ax.set_yticks(y, [f"{r} ({k})" for r, k in zip(rows["run"], rows["kind"], strict=True)], fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"{metric} (held-out plates, 95% interval)")
    return save(fig, path)


def save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
