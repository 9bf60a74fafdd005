"""Frozen-embedding probes, the baselines every fine-tune is compared with: scikit-learn's logistic regression (on
standardized embeddings) and cosine kNN, trained on the training plates and scored on validation and test plates
with the metric names fine-tuning logs (`val/accuracy`, `test/macro_f1`, ...)."""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from camae.config import ProbeConfig
from camae.metrics import classification_metrics

KINDS = ("logistic", "knn")


def make_probe(kind: str, cfg: ProbeConfig, n_train: int):
    """An unfitted scikit-learn classifier for `kind`."""
    if kind == "logistic":
        return make_pipeline(StandardScaler(), LogisticRegression(C=cfg.C, max_iter=cfg.max_iter))
    if kind == "knn":
        return KNeighborsClassifier(n_neighbors=max(1, min(cfg.k, n_train)), metric="cosine")
    raise ValueError(f"unknown probe {kind!r}; choose from {list(KINDS)}")


def run_probe(kind: str, X: np.ndarray, y: np.ndarray, split: np.ndarray, cfg: ProbeConfig):
    """Fit on split == "train", score every other split present. Returns (metrics keyed `{split}/{name}`,
    {split: (y_true, y_pred)})."""
    train = split == "train"
    if train.sum() == 0 or len(np.unique(y[train])) < 2:
        raise ValueError("the probe needs training sites of at least two classes; check the split and labels")
    probe = make_probe(kind, cfg, int(train.sum())).fit(X[train], y[train])
    metrics, predictions = {}, {}
    for name in ("train", "val", "test"):
        rows = split == name
        if rows.any():
            pred = probe.predict(X[rows])
            metrics |= classification_metrics(y[rows], pred, name)
            predictions[name] = (y[rows], pred)
    # named as a fine-tune's best epoch is (a probe is fitted once), so one column sorts probes and fine-tunes
    metrics |= {f"best/{k}": v for k, v in metrics.items() if k.startswith("val/")}
    return metrics, predictions
