"""Biology metrics on well-level profiles: do replicates agree, do related perturbations agree, do known
relationships show up, does the plate still show. Pure functions of (metadata, embeddings); each names the
reference implementation it reproduces, and the tests compare both on the same embeddings.

- `replicate_map`: phenotypic activity, computed by copairs itself (`copairs.map.average_precision` and
  `mean_average_precision`, the JUMP recipe). Each treated well queries the other wells of its perturbation
  (positives) among the control wells (negatives, each its own reference group) by cosine similarity; AP is
  averaged per perturbation (mAP). The p-value is copairs': the fraction of a seeded null of random rankings with
  the same numbers of positives and candidates whose mean AP is strictly greater than the observed mAP, (k + 1) /
  (null_size + 1); Benjamini-Hochberg corrected p-values below `fdr` count as retrieved (fraction retrieved).
- `consistency_map`: phenotypic consistency, by copairs too: perturbation profiles (mean of their wells) that
  share an annotation (here: the connected groups of known relationships) retrieve each other among the profiles
  of other groups; the same null and FDR.
- `relationship_recall`: EFAAR's `known_relationship_benchmark` / `compute_recall` (efaar-benchmarking 1.0):
  perturbation profiles (mean of their wells), the cosine similarities of all distinct perturbation pairs as the
  null, the known pairs sorted and de-duplicated (A-B equals B-A, no self-pairs); a pair is recalled at (left,
  right) when its rank in the sorted null, as a fraction, is <= left (searchsorted right) or >= right
  (searchsorted left). Reported at EFAAR's two threshold pairs, (0.05, 0.95) and (0.1, 0.9).
- `plate_predictability`: cross-validated balanced accuracy of predicting the plate from treated sites (chance:
  1 / plates); batch correction should bring it down. Controls are left out: the corrections centre them exactly,
  which would make held-out folds anti-predictable and the score meaningless.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics.pairwise import cosine_similarity
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

RECALL_THRESHOLDS = ((0.05, 0.95), (0.1, 0.9))  # EFAAR's RECALL_PERC_THRS


def well_profiles(meta: pd.DataFrame, X: np.ndarray) -> tuple[pd.DataFrame, np.ndarray]:
    """Mean embedding per (plate, well), with the well's label, control flag and batch."""
    keys = meta["plate"].astype(str) + "/" + meta["well"].astype(str)
    codes, uniques = pd.factorize(keys)
    sums = np.zeros((len(uniques), X.shape[1]))
    np.add.at(sums, codes, X)
    profiles = sums / np.bincount(codes)[:, None]
    first = meta.groupby(codes, sort=True).first()
    return first[["plate", "well", "label", "is_control", "batch"]].reset_index(drop=True), profiles


def _copairs_map(frame: pd.DataFrame, P: np.ndarray, group: list[str], reference: list[str], null_size: int,
                 fdr: float, seed: int) -> pd.DataFrame:
    """copairs: AP of each profile retrieving its `group` among profiles differing in every `reference` column,
    then mAP per group with copairs' null, p-values and BH correction."""
    from copairs.map import average_precision, mean_average_precision

    ap = average_precision(frame, np.asarray(P, dtype=np.float64), pos_sameby=group, pos_diffby=[], neg_sameby=[],
                           neg_diffby=reference, progress_bar=False)
    ap = ap[ap["n_pos_pairs"] > 0].dropna(subset=["average_precision"])
    if ap.empty:
        raise ValueError(f"no {'/'.join(group)} has two or more profiles: mAP needs replicates")
    return mean_average_precision(ap, group, null_size=null_size, threshold=fdr, seed=seed, progress_bar=False)


def replicate_map(meta: pd.DataFrame, P: np.ndarray, null_size: int = 10000, fdr: float = 0.05,
                  seed: int = 0) -> tuple[pd.DataFrame, dict[str, float]]:
    """Phenotypic activity (copairs): per perturbation mAP, p-value, corrected p-value, retrieved; and overall
    {"map", "fraction_retrieved"}."""
    control = meta["is_control"].to_numpy(bool)
    if control.sum() == 0:
        raise ValueError("replicate mAP needs control wells (the negatives); none are marked as controls")
    frame = pd.DataFrame({"label": meta["label"].astype(str).to_numpy(),
                          "reference": np.where(control, np.arange(len(meta)), -1)})  # copairs' reference index
    scores = _copairs_map(frame, P, ["label", "reference"], ["label", "reference"], null_size, fdr, seed)
    wells = frame[~control].groupby("label").size()
    table = pd.DataFrame({"perturbation": scores["label"], "wells": scores["label"].map(wells).to_numpy(),
                          "map": scores["mean_average_precision"], "p_value": scores["p_value"],
                          "corrected_p_value": scores["corrected_p_value"],
                          "retrieved": scores["below_corrected_p"]}).sort_values("perturbation", ignore_index=True)
    return table, {"map": float(table["map"].mean()), "fraction_retrieved": float(table["retrieved"].mean())}


def relationship_groups(pairs: pd.DataFrame) -> dict[str, str]:
    """Perturbation -> its annotation group: the connected components of the known-relationship pairs (columns
    perturbation_a, perturbation_b), named by their first member in sorted order."""
    parent: dict[str, str] = {}

    def root(x: str) -> str:
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    for a, b in zip(pairs["perturbation_a"].astype(str), pairs["perturbation_b"].astype(str), strict=True):
        ra, rb = root(a), root(b)
        parent[max(ra, rb)] = min(ra, rb)
    return {x: root(x) for x in parent}


def consistency_map(meta: pd.DataFrame, P: np.ndarray, pairs: pd.DataFrame, null_size: int = 10000,
                    fdr: float = 0.05, seed: int = 0) -> tuple[pd.DataFrame, dict[str, float]]:
    """Phenotypic consistency (copairs): per annotation group mAP, p-values, retrieved; overall
    {"consistency_map", "consistency_fraction_retrieved"}."""
    names, profiles = perturbation_profiles(meta, P)
    groups = relationship_groups(pairs)
    keep = [i for i, n in enumerate(names) if n in groups]
    frame = pd.DataFrame({"group": [groups[names[i]] for i in keep]})
    if frame["group"].nunique() < 2:
        raise ValueError("phenotypic consistency needs at least 2 annotation groups among these perturbations")
    scores = _copairs_map(frame, profiles[keep], ["group"], ["group"], null_size, fdr, seed)
    table = scores.rename(columns={"mean_average_precision": "map"})[["group", "map", "p_value", "corrected_p_value",
                                                                      "below_corrected_p"]]
    return table, {"consistency_map": float(table["map"].mean()),
                   "consistency_fraction_retrieved": float(table["below_corrected_p"].mean())}


def perturbation_profiles(meta: pd.DataFrame, P: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Mean profile of each non-control perturbation."""
    treated = ~meta["is_control"].to_numpy(bool)
    frame = pd.DataFrame(P[treated]).groupby(meta["label"].astype(str).to_numpy()[treated]).mean()
    return list(frame.index), frame.to_numpy()


def relationship_recall(meta: pd.DataFrame, P: np.ndarray, pairs: pd.DataFrame,
                        thresholds=RECALL_THRESHOLDS) -> dict[str, float]:
    """EFAAR's known-relationship recall: {"recall_<left>_<right>" per threshold pair, "relationship_pairs"}. Pairs
    with a perturbation absent here are ignored."""
    names, profiles = perturbation_profiles(meta, P)
    index = {n: i for i, n in enumerate(names)}
    if len(names) < 3:
        raise ValueError(f"relationship recall needs at least 3 perturbations, got {len(names)}")
    known = {tuple(sorted((a, b))) for a, b in zip(pairs["perturbation_a"].astype(str),
                                                   pairs["perturbation_b"].astype(str), strict=True)
             if a != b and a in index and b in index}
    if not known:
        raise ValueError("none of the known pairs has both perturbations in these profiles")
    sims = cosine_similarity(profiles)
    null = np.sort(sims[np.triu_indices(len(names), k=1)])
    query = np.array([sims[index[a], index[b]] for a, b in sorted(known)])
    left = np.searchsorted(null, query, side="left") / len(null)
    right = np.searchsorted(null, query, side="right") / len(null)
    out = {f"recall_{min(t)}_{max(t)}": float(np.mean((right <= min(t)) | (left >= max(t)))) for t in thresholds}
    return out | {"relationship_pairs": float(len(known))}


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
