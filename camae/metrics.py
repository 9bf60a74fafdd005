"""Classification metrics with the names every camae run logs (`val/accuracy`, `test/macro_f1`, ...), so MLflow
lines up fine-tunes, sweeps and probes. Thin, pure wrappers over scikit-learn."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)


def classification_metrics(y_true, y_pred, prefix: str = "") -> dict[str, float]:
    """accuracy (with its 95% bootstrap interval over sites), macro_f1 and balanced_accuracy, keyed `{prefix}/{name}`
    (or bare names without a prefix), with the chance levels beside them: `chance_accuracy`, what always answering
    this split's most common class scores, and `chance_balanced_accuracy`, 1 / the classes present."""
    key = (lambda name: f"{prefix}/{name}") if prefix else (lambda name: name)
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    counts = np.unique(y_true, return_counts=True)[1]
    low, high = accuracy_interval(y_true, y_pred)
    return {key("accuracy"): float(accuracy_score(y_true, y_pred)),
            key("accuracy_ci_low"): low, key("accuracy_ci_high"): high,
            key("macro_f1"): float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
            key("balanced_accuracy"): float(balanced_accuracy_score(y_true, y_pred)),
            key("chance_accuracy"): float(counts.max() / counts.sum()),
            key("chance_balanced_accuracy"): float(1 / len(counts))}


def accuracy_interval(y_true, y_pred, rounds: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the accuracy, resampling sites with replacement (seeded, so a rerun gives
    the same interval)."""
    hits = np.asarray(y_true) == np.asarray(y_pred)
    rng, n, means = np.random.default_rng(seed), len(hits), []
    step = max(1, 10_000_000 // max(n, 1))  # bounded memory on large test sets
    for start in range(0, rounds, step):
        means.append(hits[rng.integers(0, n, (min(step, rounds - start), n))].mean(axis=1))
    low, high = np.quantile(np.concatenate(means), [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def per_class_table(y_true, y_pred, names: list[str]) -> pd.DataFrame:
    """Precision, recall, F1 and support per class."""
    labels = np.arange(len(names))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return pd.DataFrame({"class": names, "precision": p, "recall": r, "f1": f, "support": s})


def confusion(y_true, y_pred, num_classes: int) -> np.ndarray:
    """Counts [true, predicted] over all classes, also those absent from this split."""
    return confusion_matrix(y_true, y_pred, labels=np.arange(num_classes))


def markdown_table(frame: pd.DataFrame, digits: int = 3) -> str:
    """A GitHub-style Markdown table of a DataFrame (floats to `digits` places; pandas' own needs `tabulate`)."""
    cols = list(frame.columns)
    fmt = lambda v: f"{v:.{digits}f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"
