"""Batch correction of embeddings, fitted on control wells: pure functions on arrays and metadata.

Each method reproduces a reference implementation (the tests compare both sides on the same embeddings):

- `pca_centerscale`, the OpenPhenom model card's recipe: a PCA fitted on the control embeddings, then per batch a
  StandardScaler fitted on that batch's transformed controls and applied to the whole batch. Equal to
  `efaar_benchmarking.efaar.embed_by_pca` + `centerscale_on_controls(batch_col=...)` on the same controls.
- `tvn`, Typical Variation Normalization exactly as `efaar_benchmarking.efaar.tvn_on_controls` (EFAAR 1.0)
  computes it on the PCA-CenterScale output: one StandardScaler fitted on all fitting controls, a PCA fitted on
  them (every component), the StandardScaler again on the controls (so the controls' principal axes get unit
  variance), and, with `coral`, per batch the CORAL step X_b <- X_b @ (C_b + 0.5 I)^(-1/2), C_b the covariance
  (ddof 1) of that batch's controls. Nothing is re-coloured and nothing is scaled per batch after whitening.
- `harmony`: Harmony (`harmonypy`, the top method of the JUMP batch-correction benchmark, Arevalo et al. 2024) on
  the PCA-CenterScale output, over the batch column. Harmony is transductive: it moves every site it is given, so
  a fitted correction applies to exactly those sites; it sees no labels.

No leakage: the global pieces (the PCA, TVN's scalers and PCA) are fitted only on rows where `fit` is True (the
training plates' controls when a split exists); EFAAR fits them on every control, which is `fit=None`. The
per-batch pieces use each batch's own controls, test plates included: they need no labels, and a plate cannot be
corrected without its own reference wells.

Degenerate inputs, documented fallbacks: fewer fitting controls than PCA components lowers the components to
controls - 1 (logged). A batch with fewer than 2 control sites is an error naming the batch.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

import numpy as np
from scipy.linalg import fractional_matrix_power
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler

log = logging.getLogger("camae.correction")

METHODS = ("raw", "pca_centerscale", "tvn", "harmony")
CORAL_RIDGE = 0.5  # EFAAR's tvn_on_controls: added to each batch's control covariance before its -1/2 power


class CorrectionError(ValueError):
    """Inputs batch correction cannot use; the message names the batch and the fix."""


@dataclass
class Correction:
    """A fitted correction; `transform(X, batches)` applies it to any rows whose batch was seen in fitting (Harmony:
    to the very rows it was fitted on)."""

    method: str
    pca: PCA | None = None
    scalers: dict[str, StandardScaler] = field(default_factory=dict)
    tvn: tuple[StandardScaler, PCA, StandardScaler] | None = None
    coral: dict[str, np.ndarray] = field(default_factory=dict)
    harmonized: tuple[str, np.ndarray] | None = None

    def transform(self, X: np.ndarray, batches) -> np.ndarray:
        """[N, D] embeddings -> [N, K] corrected (raw: returned as float64, unchanged)."""
        X = np.asarray(X, dtype=np.float64)
        if self.method == "raw":
            return X
        if self.method == "harmony":
            if _digest(X) != self.harmonized[0]:
                raise CorrectionError("harmony corrects the sites it was fitted on (it is transductive); fit it on "
                                      "all the sites to correct")
            return self.harmonized[1].copy()
        batches = np.asarray(batches).astype(str)
        Z = _per_batch(self.scalers, self.pca.transform(X), batches)
        if self.method == "pca_centerscale":
            return Z
        first, pca, second = self.tvn
        Z = second.transform(pca.transform(first.transform(Z)))
        for b, A in self.coral.items():
            Z[batches == b] = Z[batches == b] @ A
        return Z


def _digest(X: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(X).tobytes()).hexdigest()


def _per_batch(scalers: dict[str, StandardScaler], Z: np.ndarray, batches: np.ndarray) -> np.ndarray:
    out = np.empty_like(Z)
    for b in map(str, np.unique(batches)):
        if b not in scalers:
            raise CorrectionError(f"batch {b!r} was not seen when the correction was fitted (it had no controls "
                                  "then); fit on data that includes it")
        out[batches == b] = scalers[b].transform(Z[batches == b])
    return out


def _batch_controls(batches: np.ndarray, control: np.ndarray, b: str) -> np.ndarray:
    rows = (batches == b) & control
    if rows.sum() < 2:
        raise CorrectionError(f"batch {b!r} has {rows.sum()} control sites; centre-scaling needs at least 2. "
                              "Check data.control_values, or correct by another unit (correction.by)")
    return rows


def _fit_scalers(Z: np.ndarray, batches: np.ndarray, control: np.ndarray) -> dict[str, StandardScaler]:
    """One StandardScaler per batch, fitted on that batch's control rows (EFAAR's centerscale_on_controls)."""
    return {b: StandardScaler().fit(Z[_batch_controls(batches, control, b)]) for b in map(str, np.unique(batches))}


def fit_correction(method: str, X: np.ndarray, batches, control, fit=None, n_components: int | None = None,
                   coral: bool = True) -> Correction:
    """Fit `method` (one of METHODS) on embeddings X [N, D]. `batches`: the batch of each row; `control`: True for
    control rows; `fit`: rows the global pieces may be fitted on (default: all)."""
    if method not in METHODS:
        raise CorrectionError(f"unknown correction {method!r}; choose from {list(METHODS)}")
    if method == "raw":
        return Correction("raw")
    X = np.asarray(X, dtype=np.float64)
    batches = np.asarray(batches).astype(str)
    control = np.asarray(control, dtype=bool)
    fit_rows = control & (np.ones(len(X), bool) if fit is None else np.asarray(fit, dtype=bool))
    pca = _fit_pca(X, fit_rows, n_components)
    scalers = _fit_scalers(pca.transform(X), batches, control)
    base = Correction("pca_centerscale", pca, scalers)
    if method == "pca_centerscale":
        return base
    Z = base.transform(X, batches)
    if method == "harmony":
        return Correction(method, pca, scalers, harmonized=(_digest(X), _harmony(Z, batches)))
    return _fit_tvn(Z, batches, control, fit_rows, coral, pca, scalers)


def _fit_pca(X: np.ndarray, fit_rows: np.ndarray, n_components: int | None) -> PCA:
    n_fit = int(fit_rows.sum())
    if n_fit < 3:
        raise CorrectionError(f"only {n_fit} control sites to fit the PCA on (the training plates' controls); "
                              "batch correction needs control wells on the training plates (data.control_values)")
    k = min(n_components or X.shape[1], X.shape[1], n_fit - 1)
    if n_components and k < n_components:
        log.warning("correction.n_components=%d but only %d fitting control sites: using %d components",
                    n_components, n_fit, k)
    return PCA(n_components=k, svd_solver="full").fit(X[fit_rows])


def _fit_tvn(Z: np.ndarray, batches: np.ndarray, control: np.ndarray, fit_rows: np.ndarray, coral: bool,
             pca: PCA, scalers: dict) -> Correction:
    """EFAAR's tvn_on_controls on the PCA-CenterScale output Z, its global steps fitted on fit_rows."""
    first = StandardScaler().fit(Z[fit_rows])
    Z = first.transform(Z)
    tvn_pca = PCA().fit(Z[fit_rows])  # EFAAR: every component, sklearn's default solver
    Z = tvn_pca.transform(Z)
    second = StandardScaler().fit(Z[fit_rows])
    Z = second.transform(Z)
    maps = {}
    if coral:
        eye = np.eye(Z.shape[1])
        for b in map(str, np.unique(batches)):
            source = np.cov(Z[_batch_controls(batches, control, b)], rowvar=False, ddof=1) + CORAL_RIDGE * eye
            maps[b] = np.real(fractional_matrix_power(source, -0.5))  # real for a symmetric positive matrix
    return Correction("tvn", pca, scalers, (first, tvn_pca, second), maps)


def _harmony(Z: np.ndarray, batches: np.ndarray, seed: int = 0) -> np.ndarray:
    """harmonypy's Harmony over the batch column; returns sites x components."""
    import harmonypy
    import pandas as pd

    if len(np.unique(batches)) < 2:
        return Z.copy()  # one batch: nothing to integrate
    clusters = max(2, min(round(len(Z) / 30), 100))  # harmonypy's default, at least 2 on small sets
    result = harmonypy.run_harmony(Z, pd.DataFrame({"batch": batches}), "batch", nclust=clusters, random_state=seed,
                                   verbose=False)
    return np.asarray(result.Z_corr, dtype=np.float64)  # sites x components


def correct(method: str, X: np.ndarray, batches, control, fit=None, n_components: int | None = None,
            coral: bool = True) -> np.ndarray:
    """Fit and apply in one call."""
    return fit_correction(method, X, batches, control, fit, n_components, coral).transform(X, batches)
