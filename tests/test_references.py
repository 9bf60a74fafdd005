"""camae's batch correction and biology metrics against the field's reference implementations, both computed on
the same embeddings: EFAAR (efaar-benchmarking 1.0, installed without its dependencies; its module-level imports of
scvi-tools and geomloss, used only by functions camae does not reproduce, are stubbed) and copairs 0.5.5.
Several seeds and shapes: few controls per batch, a single batch, more dimensions than controls."""

from __future__ import annotations

import sys
import types
from unittest import mock

import numpy as np
import pandas as pd
import pytest
from sklearn.decomposition import PCA
from sklearn.metrics import average_precision_score
from sklearn.utils import Bunch

from evaluation.batch_correction import correct, fit_correction
from evaluation.biology import (
    RECALL_THRESHOLDS,
    consistency_map,
    perturbation_profiles,
    plate_predictability,
    relationship_groups,
    relationship_recall,
    replicate_map,
)

CONTROL = "EMPTY"
# (seed, batches, sites per batch, dimensions, controls per batch)
SHAPES = [(0, 3, 40, 12, 10), (1, 4, 30, 32, 12), (2, 1, 60, 16, 20), (3, 2, 25, 40, 8), (4, 5, 24, 8, 3)]


@pytest.fixture(scope="module")
def efaar():
    """efaar_benchmarking's efaar and benchmarking modules, with the unused heavy imports stubbed."""
    scvi, scvi_model, geomloss = (types.ModuleType(n) for n in ("scvi", "scvi.model", "geomloss"))
    scvi_model.SCVI, geomloss.SamplesLoss = object, object
    scvi.model = scvi_model
    with mock.patch.dict(sys.modules, {"scvi": scvi, "scvi.model": scvi_model, "geomloss": geomloss}):
        import efaar_benchmarking.benchmarking as benchmarking
        import efaar_benchmarking.efaar as efaar_module
    return Bunch(efaar=efaar_module, benchmarking=benchmarking)


def embeddings(seed, n_batches, per_batch, dim, controls, rotate=True):
    """Sites with a per-batch offset, scale and (rotate) rotation on top of a shared perturbation signal."""
    rng = np.random.default_rng(seed)
    effects = rng.normal(size=(5, dim))
    X, batch, label = [], [], []
    for b in range(n_batches):
        labels = np.r_[np.zeros(controls, int), np.arange(per_batch - controls) % 4 + 1]
        signal = rng.normal(size=(per_batch, dim)) + effects[labels]
        mix = (np.linalg.qr(rng.normal(size=(dim, dim)))[0] if rotate else np.eye(dim)) * rng.uniform(0.5, 2, dim)
        X.append(signal @ mix + rng.normal(0, 3, dim))
        batch += [f"b{b}"] * per_batch
        label += [CONTROL if v == 0 else f"p{v}" for v in labels]
    meta = pd.DataFrame({"batch": batch, "pert": label})
    return np.concatenate(X), meta


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "seed{}-{}x{}-dim{}-ctrl{}".format(*s))
def test_pca_centerscale_equals_efaar(efaar, shape):
    X, meta = embeddings(*shape)
    control = (meta.pert == CONTROL).to_numpy()
    ours = correct("pca_centerscale", X, meta.batch, control)
    k = min(X.shape[1], control.sum() - 1)
    projected = PCA(k, svd_solver="full").fit(X[control]).transform(X)
    ref = efaar.efaar.centerscale_on_controls(projected, meta, "pert", CONTROL, batch_col="batch")
    np.testing.assert_allclose(ours, ref, atol=1e-10)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "seed{}-{}x{}-dim{}-ctrl{}".format(*s))
def test_tvn_equals_efaar_tvn_on_controls(efaar, shape):
    """camae's TVN is tvn_on_controls applied to the PCA-CenterScale output, within 1e-6."""
    X, meta = embeddings(*shape)
    control = (meta.pert == CONTROL).to_numpy()
    pca_cs = correct("pca_centerscale", X, meta.batch, control)
    ref = efaar.efaar.tvn_on_controls(pca_cs, meta, "pert", CONTROL, batch_col="batch")
    ours = correct("tvn", X, meta.batch, control)
    assert np.abs(np.imag(ref)).max() < 1e-9
    np.testing.assert_allclose(ours, np.real(ref), atol=1e-6, rtol=0)
    no_coral = efaar.efaar.tvn_on_controls(pca_cs, meta, "pert", CONTROL, batch_col=None)
    np.testing.assert_allclose(correct("tvn", X, meta.batch, control, coral=False), no_coral, atol=1e-6, rtol=0)


def test_tvn_does_not_make_plates_more_predictable():
    """The symptom of the old variant: plate predictability rose after 'TVN'. Now it stays at or below raw."""
    X, meta = embeddings(7, 4, 120, 12, 60, rotate=False)  # enough controls per plate to pin its covariance
    control = (meta.pert == CONTROL).to_numpy()
    frame = pd.DataFrame({"plate": meta.batch, "is_control": control})
    raw = plate_predictability(frame, X)["plate_predictability"]
    tvn = plate_predictability(frame, correct("tvn", X, meta.batch, control))["plate_predictability"]
    assert raw > 0.9 and tvn <= raw and tvn < 0.5  # chance 0.25


def test_harmony_equals_harmonypy_on_pca_centerscale():
    import harmonypy

    X, meta = embeddings(5, 3, 60, 12, 15)
    control = (meta.pert == CONTROL).to_numpy()
    pca_cs = correct("pca_centerscale", X, meta.batch, control)
    ref = harmonypy.run_harmony(pca_cs, pd.DataFrame({"batch": meta.batch}), "batch", nclust=6, random_state=0,
                                verbose=False).Z_corr
    fitted = fit_correction("harmony", X, meta.batch, control)
    np.testing.assert_allclose(fitted.transform(X, meta.batch), ref, atol=1e-12)
    with pytest.raises(ValueError, match="transductive"):
        fitted.transform(X[:10], meta.batch[:10])


# ----------------------------------------------------------------------------------------------------------------
# Known-relationship recall: EFAAR's known_relationship_benchmark


def recall_case(seed, n_perts, n_pairs):
    """Well profiles of n_perts perturbations (3 wells each) and known pairs with reversed duplicates, self pairs
    and perturbations absent from the profiles."""
    rng = np.random.default_rng(seed)
    names = [f"g{i:02d}" for i in range(n_perts)]
    centers = rng.normal(size=(n_perts, 16))
    meta = pd.DataFrame({"label": np.repeat(names, 3), "is_control": False})
    P = np.repeat(centers, 3, axis=0) + rng.normal(0, 0.5, size=(3 * n_perts, 16))
    a, b = rng.choice(names, n_pairs), rng.choice(names, n_pairs)
    pairs = pd.DataFrame({"perturbation_a": [*a, b[0], a[1], "absent"], "perturbation_b": [*b, a[0], a[1], a[-1]]})
    return meta, P, pairs


@pytest.mark.parametrize(("seed", "n_perts", "n_pairs"), [(0, 37, 40), (1, 4, 2), (2, 21, 60), (3, 50, 12)])
def test_relationship_recall_equals_efaar(efaar, tmp_path, seed, n_perts, n_pairs):
    meta, P, pairs = recall_case(seed, n_perts, n_pairs)
    names, profiles = perturbation_profiles(meta, P)
    pairs.rename(columns={"perturbation_a": "entity1", "perturbation_b": "entity2"}).to_csv(tmp_path / "known.txt",
                                                                                            index=False)
    ref = efaar.benchmarking.known_relationship_benchmark(
        Bunch(features=pd.DataFrame(profiles), metadata=pd.DataFrame({"pert": names})), "pert",
        benchmark_sources=["known"], recall_thr_pairs=list(RECALL_THRESHOLDS), min_req_entity_cnt=1,
        benchmark_data_dir=str(tmp_path)).iloc[0]
    ours = relationship_recall(meta, P, pairs)
    for left, right in RECALL_THRESHOLDS:
        assert ours[f"recall_{left}_{right}"] == ref[f"recall_{left}_{right}"]  # exactly


# ----------------------------------------------------------------------------------------------------------------
# Replicate mAP and phenotypic consistency: copairs


def wells(seed, n_perts=6, replicates=3, controls=16, dim=10, strength=1.5):
    rng = np.random.default_rng(seed)
    labels = [CONTROL] * controls + [f"p{i}" for i in range(n_perts) for _ in range(replicates)]
    centers = {label: rng.normal(size=dim) * strength * (label != CONTROL) for label in set(labels)}
    P = np.stack([centers[label] + rng.normal(size=dim) for label in labels])
    return pd.DataFrame({"label": labels, "is_control": [label == CONTROL for label in labels]}), P


@pytest.mark.parametrize(("seed", "replicates", "controls"), [(0, 3, 16), (1, 2, 10), (2, 4, 30), (3, 2, 19)])
def test_replicate_map_equals_copairs_activity(seed, replicates, controls):
    """The JUMP phenotypic-activity recipe written with copairs' own API (assign_reference_index): same mAP, same
    null, same p-values, BH and fraction retrieved; and mAP equal to a brute-force scikit-learn ranking."""
    from copairs.map import average_precision, mean_average_precision
    from copairs.matching import assign_reference_index

    meta, P = wells(seed, replicates=replicates, controls=controls)
    table, overall = replicate_map(meta, P, null_size=2000, fdr=0.05, seed=seed)

    frame = assign_reference_index(meta.copy(), f"label == '{CONTROL}'", reference_col="ref", default_value=-1)
    ap = average_precision(frame, P, ["label", "ref"], [], [], ["label", "ref"], progress_bar=False)
    ap = ap[~ap["is_control"]]
    ref = mean_average_precision(ap, ["label"], null_size=2000, threshold=0.05, seed=seed, progress_bar=False)
    ref = ref.sort_values("label", ignore_index=True)
    np.testing.assert_allclose(table["map"], ref["mean_average_precision"], atol=1e-12)
    np.testing.assert_array_equal(table["p_value"], ref["p_value"])
    np.testing.assert_allclose(table["corrected_p_value"], ref["corrected_p_value"], atol=1e-15)
    assert overall["fraction_retrieved"] == ref["below_corrected_p"].mean()

    sims = P @ P.T / np.outer(np.linalg.norm(P, axis=1), np.linalg.norm(P, axis=1))
    brute = []
    for label in sorted(set(meta.label) - {CONTROL}):
        rows = np.flatnonzero(meta.label == label)
        aps = [average_precision_score(meta.label.to_numpy()[c] == label, sims[q, c])
               for q in rows for c in [np.r_[rows[rows != q], np.flatnonzero(meta.is_control)]]]
        brute.append(np.mean(aps))
    np.testing.assert_allclose(table["map"], brute, atol=1e-12)


def test_a_perfect_pair_of_replicates_is_retrieved_against_few_controls():
    """copairs' strict rule (null > observed): two perfect replicates among 10 controls reach p < 0.05. Counting
    ties as exceeding (the old `>=`) gave p near 1/11 and never retrieved them."""
    rng = np.random.default_rng(0)
    controls = rng.normal(size=(10, 8))
    treated = np.repeat(rng.normal(size=(3, 8)) * 10, 2, axis=0) + rng.normal(0, 0.01, size=(6, 8))
    meta = pd.DataFrame({"label": [CONTROL] * 10 + ["a", "a", "b", "b", "c", "c"],
                         "is_control": [True] * 10 + [False] * 6})
    table, overall = replicate_map(meta, np.r_[controls, treated], null_size=5000, seed=0)
    assert (table["map"] == 1.0).all() and (table["p_value"] < 0.001).all() and overall["fraction_retrieved"] == 1.0


def test_consistency_map_equals_copairs(tmp_path):
    from copairs.map import average_precision, mean_average_precision

    meta, P = wells(4, n_perts=8, replicates=3, controls=12)
    pairs = pd.DataFrame({"perturbation_a": ["p0", "p2", "p4", "p6", "p1"],
                          "perturbation_b": ["p1", "p3", "p5", "p7", "p0"]})
    groups = relationship_groups(pairs)
    assert groups == {"p0": "p0", "p1": "p0", "p2": "p2", "p3": "p2", "p4": "p4", "p5": "p4", "p6": "p6", "p7": "p6"}
    table, overall = consistency_map(meta, P, pairs, null_size=2000, seed=1)

    names, profiles = perturbation_profiles(meta, P)
    frame = pd.DataFrame({"group": [groups[n] for n in names]})
    ap = average_precision(frame, profiles, ["group"], [], [], ["group"], progress_bar=False)
    ref = mean_average_precision(ap, ["group"], null_size=2000, threshold=0.05, seed=1, progress_bar=False)
    np.testing.assert_allclose(table["map"], ref["mean_average_precision"], atol=1e-12)
    np.testing.assert_array_equal(table["p_value"], ref["p_value"])
    assert overall["consistency_map"] == pytest.approx(ref["mean_average_precision"].mean())


def test_accuracy_interval_and_chance_levels():
    """The bootstrap interval brackets the accuracy and narrows with more sites; chance is the majority class."""
    from camae.metrics import classification_metrics

    rng = np.random.default_rng(0)
    widths = []
    for n in (60, 6000):
        y = rng.integers(0, 3, n) * (rng.random(n) < 0.8)  # class 0 most common
        pred = np.where(rng.random(n) < 0.7, y, (y + 1) % 3)
        m = classification_metrics(y, pred, "test")
        assert m["test/accuracy_ci_low"] < m["test/accuracy"] < m["test/accuracy_ci_high"]
        assert m["test/chance_accuracy"] == pytest.approx(np.bincount(y).max() / n)
        assert m["test/chance_balanced_accuracy"] == pytest.approx(1 / 3)
        widths.append(m["test/accuracy_ci_high"] - m["test/accuracy_ci_low"])
    assert widths[1] < widths[0] / 5  # ~1/sqrt(n): 10x narrower for 100x the sites
