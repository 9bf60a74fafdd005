"""Biology metrics on well-level profiles: do replicates agree, do known relationships show up, does the plate
still show. Pure functions of (metadata, embeddings).

- `replicate_map`: the copairs definition. Each treated well queries the other wells of its perturbation
  (positives) among all control wells (negatives) by cosine similarity; its average precision (scikit-learn's) is
  averaged per perturbation (mAP). A perturbation's p-value comes from a null of random rankings with the same
  numbers of positives and negatives; Benjamini-Hochberg corrected p-values below `fdr` count as retrieved.
- `relationship_recall`: EFAAR's known-relationship benchmark. Perturbation profiles (mean of their wells); a known
  pair is recalled when its cosine similarity lies in the top or bottom `percentile`% of all perturbation pairs.
- `plate_predictability`: cross-validated balanced accuracy of predicting the plate from treated sites (chance:
  1 / plates); batch correction should bring it down. Controls are left out: the corrections centre them exactly,
  which would make held-out folds anti-predictable and the score meaningless.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import false_discovery_control
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score
from sklearn.metrics.pairwise import cosine_similarity
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


def well_profiles(meta: pd.DataFrame, X: np.ndarray) -> tuple[pd.DataFrame, np.ndarray]:
    """Mean embedding per (plate, well), with the well's label, control flag and batch."""
    keys = meta["plate"].astype(str) + "/" + meta["well"].astype(str)
    codes, uniques = pd.factorize(keys)
    sums = np.zeros((len(uniques), X.shape[1]))
    np.add.at(sums, codes, X)
    profiles = sums / np.bincount(codes)[:, None]
    first = meta.groupby(codes, sort=True).first()
    return first[["plate", "well", "label", "is_control", "batch"]].reset_index(drop=True), profiles


def null_average_precision(n_pos: int, n_total: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """AP of `size` random rankings of n_pos positives among n_total items: mean over positives of
    (positives ranked so far) / rank."""
    ranks = np.sort(rng.random((size, n_total)).argsort(axis=1)[:, :n_pos], axis=1) + 1
    return (np.arange(1, n_pos + 1) / ranks).mean(axis=1)


def replicate_map(meta: pd.DataFrame, P: np.ndarray, null_size: int = 10000, fdr: float = 0.05,
                  seed: int = 0) -> tuple[pd.DataFrame, dict[str, float]]:
    """Per perturbation: mAP, p-value, corrected p-value, retrieved; and overall {"map", "fraction_retrieved"}."""
    control = meta["is_control"].to_numpy(bool)
    labels = meta["label"].astype(str).to_numpy()
    if control.sum() == 0:
        raise ValueError("replicate mAP needs control wells (the negatives); none are marked as controls")
    sims = cosine_similarity(P)
    rng = np.random.default_rng(seed)
    nulls: dict[tuple[int, int], np.ndarray] = {}
    rows = []
    for label in sorted(set(labels[~control])):
        wells = np.flatnonzero(labels == label)
        if len(wells) < 2:
            continue  # a single well has no replicate to retrieve
        aps, null_sum = [], np.zeros(null_size)
        for q in wells:
            candidates = np.concatenate([wells[wells != q], np.flatnonzero(control)])
            positive = labels[candidates] == label
            aps.append(average_precision_score(positive, sims[q, candidates]))
            key = (int(positive.sum()), len(candidates))
            if key not in nulls:
                nulls[key] = null_average_precision(*key, null_size, rng)
            null_sum += nulls[key]
        m = float(np.mean(aps))
        p = (1 + np.sum(null_sum / len(wells) >= m)) / (1 + null_size)
        rows.append({"perturbation": label, "wells": len(wells), "map": m, "p_value": p})
    table = pd.DataFrame(rows, columns=["perturbation", "wells", "map", "p_value"])
    if table.empty:
        raise ValueError("no perturbation has two or more wells: replicate mAP needs replicates")
    table["corrected_p_value"] = false_discovery_control(table["p_value"].to_numpy())
    table["retrieved"] = table["corrected_p_value"] < fdr
    return table, {"map": float(table["map"].mean()), "fraction_retrieved": float(table["retrieved"].mean())}


def perturbation_profiles(meta: pd.DataFrame, P: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Mean profile of each non-control perturbation."""
    treated = ~meta["is_control"].to_numpy(bool)
    frame = pd.DataFrame(P[treated]).groupby(meta["label"].astype(str).to_numpy()[treated]).mean()
    return list(frame.index), frame.to_numpy()


def relationship_recall(meta: pd.DataFrame, P: np.ndarray, pairs: pd.DataFrame,
                        percentile: float = 5.0) -> dict[str, float]:
    """{"relationship_recall", "relationship_pairs"}: the fraction of known pairs (columns perturbation_a,
    perturbation_b; pairs with a perturbation absent here are ignored) in the tails of all pairs' similarities."""
    names, profiles = perturbation_profiles(meta, P)
    index = {n: i for i, n in enumerate(names)}
    if len(names) < 3:
        raise ValueError(f"relationship recall needs at least 3 perturbations, got {len(names)}")
    sims = cosine_similarity(profiles)
    null = sims[np.triu_indices(len(names), k=1)]
    low, high = np.percentile(null, [percentile, 100 - percentile])
    known = [(index[a], index[b]) for a, b in zip(pairs["perturbation_a"].astype(str),
                                                 pairs["perturbation_b"].astype(str), strict=True)
             if a in index and b in index and a != b]
    if not known:
        raise ValueError("none of the known pairs has both perturbations in these profiles")
    hits = [sims[i, j] <= low or sims[i, j] >= high for i, j in known]
    return {"relationship_recall": float(np.mean(hits)), "relationship_pairs": float(len(known))}


def plate_predictability(meta: pd.DataFrame, X: np.ndarray, seed: int = 0) -> dict[str, float]:
    """{"plate_predictability", "plate_chance"}: balanced accuracy of predicting the plate of treated sites."""
    rows = ~meta["is_control"].to_numpy(bool)
    plates = meta["plate"].astype(str).to_numpy()[rows]
    folds = min(5, int(pd.Series(plates).value_counts().min()))
    if len(set(plates)) < 2 or folds < 2:
        raise ValueError("plate predictability needs at least 2 plates with 2 or more treated sites each")
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    score = cross_val_score(model, X[rows], plates, cv=cv, scoring="balanced_accuracy").mean()
    return {"plate_predictability": float(score), "plate_chance": 1.0 / len(set(plates))}
