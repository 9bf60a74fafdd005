"""Batch correction of embeddings, fitted on control wells: pure functions on arrays and metadata.

PCA-CenterScale (the OpenPhenom model card's recipe): a PCA fitted on the control embeddings of all batches,
then, per batch, a StandardScaler fitted on that batch's transformed controls and applied to the whole batch.

Typical Variation Normalization (TVN, as in Recursion's EFAAR benchmarking): PCA-CenterScale, then a whitening
PCA fitted on the (now centred and scaled) controls, a second per-batch centre-scale on controls, and, with
`coral`, each batch's control covariance aligned to that of all fitting controls (CORAL):
    X_b <- X_b @ (C_b + 0.5 I)^(-1/2) @ (C + 0.5 I)^(1/2)

No leakage: the global pieces (PCA, whitening, CORAL's target) are fitted only on rows where `fit` is True (the
training plates' controls when a split exists). The per-batch scalers use each batch's own controls, test plates
included: they need no labels, and a plate cannot be corrected without its own reference wells.

Degenerate inputs, documented fallbacks: fewer fitting controls than PCA components lowers the components to
controls - 1 (logged). A batch with fewer than 2 control sites is an error naming the batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from scipy.linalg import fractional_matrix_power
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler

log = logging.getLogger("camae.correction")

METHODS = ("raw", "pca_centerscale", "tvn")
CORAL_RIDGE = 0.5  # added to covariances before their matrix powers (EFAAR's regularization)


class CorrectionError(ValueError):
    """Inputs batch correction cannot use; the message names the batch and the fix."""


@dataclass
class Correction:
    """A fitted correction; `transform(X, batches)` applies it to any rows whose batch was seen in fitting."""

    method: str
    pca: PCA | None = None
    scalers: dict[str, StandardScaler] = field(default_factory=dict)
    whitener: PCA | None = None
    scalers_white: dict[str, StandardScaler] = field(default_factory=dict)
    coral: dict[str, np.ndarray] = field(default_factory=dict)

    def transform(self, X: np.ndarray, batches) -> np.ndarray:
        """[N, D] embeddings -> [N, K] corrected (raw: returned as float64, unchanged)."""
        X = np.asarray(X, dtype=np.float64)
        if self.method == "raw":
            return X
        batches = np.asarray(batches).astype(str)
        Z = _per_batch(self.scalers, self.pca.transform(X), batches)
        if self.method == "pca_centerscale":
            return Z
        Z = _per_batch(self.scalers_white, self.whitener.transform(Z), batches)
        for b, A in self.coral.items():
            Z[batches == b] = Z[batches == b] @ A
        return Z


def _per_batch(scalers: dict[str, StandardScaler], Z: np.ndarray, batches: np.ndarray) -> np.ndarray:
    out = np.empty_like(Z)
    for b in map(str, np.unique(batches)):
        if b not in scalers:
            raise CorrectionError(f"batch {b!r} was not seen when the correction was fitted (it had no controls "
                                  "then); fit on data that includes it")
        out[batches == b] = scalers[b].transform(Z[batches == b])
    return out


def _fit_scalers(Z: np.ndarray, batches: np.ndarray, control: np.ndarray) -> dict[str, StandardScaler]:
    """One StandardScaler per batch, fitted on that batch's control rows."""
    scalers = {}
    for b in map(str, np.unique(batches)):
        rows = (batches == b) & control
        if rows.sum() < 2:
            raise CorrectionError(f"batch {b!r} has {rows.sum()} control sites; centre-scaling needs at least 2. "
                                  "Check data.control_values, or correct by another unit (correction.by)")
        scalers[b] = StandardScaler().fit(Z[rows])
    return scalers


def fit_correction(method: str, X: np.ndarray, batches, control, fit=None, n_components: int | None = None,
                   coral: bool = True) -> Correction:
    """Fit `method` ("raw", "pca_centerscale" or "tvn") on embeddings X [N, D]. `batches`: the batch of each row;
    `control`: True for control rows; `fit`: rows the global pieces may be fitted on (default: all)."""
    if method not in METHODS:
        raise CorrectionError(f"unknown correction {method!r}; choose from {list(METHODS)}")
    if method == "raw":
        return Correction("raw")
    X = np.asarray(X, dtype=np.float64)
    batches = np.asarray(batches).astype(str)
    control = np.asarray(control, dtype=bool)
    fit_rows = control & (np.ones(len(X), bool) if fit is None else np.asarray(fit, dtype=bool))
    n_fit = int(fit_rows.sum())
    if n_fit < 3:
        raise CorrectionError(f"only {n_fit} control sites to fit the PCA on (the training plates' controls); "
                              "batch correction needs control wells on the training plates (data.control_values)")
    k = min(n_components or X.shape[1], X.shape[1], n_fit - 1)
    if n_components and k < n_components:
        log.warning("correction.n_components=%d but only %d fitting control sites: using %d components",
                    n_components, n_fit, k)
    pca = PCA(n_components=k, svd_solver="full").fit(X[fit_rows])
    Z = pca.transform(X)
    scalers = _fit_scalers(Z, batches, control)
    Z = _per_batch(scalers, Z, batches)
    if method == "pca_centerscale":
        return Correction(method, pca, scalers)
    whitener = PCA(whiten=True, svd_solver="full").fit(Z[fit_rows])
    W = whitener.transform(Z)
    scalers_white = _fit_scalers(W, batches, control)
    W = _per_batch(scalers_white, W, batches)
    coral_maps = _fit_coral(W, batches, control, fit_rows) if coral else {}
    return Correction(method, pca, scalers, whitener, scalers_white, coral_maps)


def _fit_coral(W: np.ndarray, batches: np.ndarray, control: np.ndarray, fit_rows: np.ndarray) -> dict:
    """Per batch: the map that gives its controls the covariance of all fitting controls."""
    eye = np.eye(W.shape[1])
    target = np.real(fractional_matrix_power(np.cov(W[fit_rows], rowvar=False) + CORAL_RIDGE * eye, 0.5))
    maps = {}
    for b in map(str, np.unique(batches)):
        source = np.cov(W[(batches == b) & control], rowvar=False) + CORAL_RIDGE * eye
        maps[b] = np.real(fractional_matrix_power(source, -0.5)) @ target
    return maps


def correct(method: str, X: np.ndarray, batches, control, fit=None, n_components: int | None = None,
            coral: bool = True) -> np.ndarray:
    """Fit and apply in one call."""
    return fit_correction(method, X, batches, control, fit, n_components, coral).transform(X, batches)
