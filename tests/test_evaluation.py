"""Evaluation: batch correction and biology metrics against independent computations, probes, the embedding pass
(exact against the model, resumable) and the evaluate job end to end."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from camae.config import EvaluateConfig, ProbeConfig, load_config
from evaluation.batch_correction import CorrectionError, correct, fit_correction
from evaluation.biology import (
    plate_predictability,
    relationship_recall,
    replicate_map,
    well_profiles,
)
from evaluation.probes import run_probe

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "evaluate" / "quickstart.yaml"


# ----------------------------------------------------------------------------------------------------------------
# Batch correction


def plates(seed=0, n_batches=3, per_batch=40, dim=12, controls=10):
    """Embeddings with a per-batch offset and scale on top of a shared biology signal."""
    rng = np.random.default_rng(seed)
    X, batch, control, label = [], [], [], []
    for b in range(n_batches):
        labels = np.r_[np.zeros(controls, int), np.arange(per_batch - controls) % 3 + 1]
        signal = rng.normal(size=(per_batch, dim)) + labels[:, None] * np.linspace(-1, 1, dim)
        X.append(signal * rng.uniform(0.5, 2) + rng.normal(0, 3, dim))
        batch += [f"b{b}"] * per_batch
        control += list(labels == 0)
        label += list(labels)
    return np.concatenate(X), np.array(batch), np.array(control), np.array(label)


def reference_correction(X, batch, control, fit, k=None):
    """PCA-CenterScale written out with numpy's SVD, independently of scikit-learn (TVN and the rest are checked
    against EFAAR and copairs in test_references.py)."""
    def pca(A, k):
        mu = A.mean(0)
        _, _, Vt = np.linalg.svd(A - mu, full_matrices=False)
        return lambda Y: (Y - mu) @ Vt[:k].T

    def centerscale(Z):
        out = np.empty_like(Z)
        for b in np.unique(batch):
            ref = Z[(batch == b) & control]
            out[batch == b] = (Z[batch == b] - ref.mean(0)) / ref.std(0)
        return out

    rows = control & fit
    k = k or min(X.shape[1], rows.sum() - 1)
    return centerscale(pca(X[rows], k)(X))


@pytest.mark.parametrize("n_components", [None, 6])
def test_pca_centerscale_matches_independent_computation(n_components):
    X, batch, control, _ = plates()
    fit = batch != "b2"  # the third batch plays a test plate: it never fits the global pieces
    ours = correct("pca_centerscale", X, batch, control, fit, n_components)
    ref = reference_correction(X, batch, control, fit, n_components)
    assert ours.shape == ref.shape
    signs = np.sign((ours * ref).sum(0))  # PCA components are defined up to sign; so is everything after them
    np.testing.assert_allclose(ours, ref * signs, atol=1e-8)


def test_correction_is_fitted_on_training_plates_only():
    X, batch, control, _ = plates()
    fit = batch != "b2"
    before = fit_correction("tvn", X, batch, control, fit)
    X2 = X.copy()
    X2[batch == "b2"] *= 5  # a wildly different test plate
    after = fit_correction("tvn", X2, batch, control, fit)
    np.testing.assert_allclose(before.pca.components_, after.pca.components_)
    for piece_before, piece_after in zip(before.tvn, after.tvn, strict=True):  # TVN's scalers and PCA
        np.testing.assert_allclose(getattr(piece_before, "components_", piece_before.mean_),
                                   getattr(piece_after, "components_", piece_after.mean_))
    np.testing.assert_allclose(before.coral["b0"], after.coral["b0"])
    # ... while its own controls still centre it: the test batch's controls have mean 0 after PCA-CenterScale
    Z = fit_correction("pca_centerscale", X2, batch, control, fit).transform(X2, batch)
    np.testing.assert_allclose(Z[(batch == "b2") & control][:, :3].mean(0), 0, atol=1e-9)


def test_correction_removes_the_batch_effect():
    X, batch, control, label = plates(per_batch=400, controls=200)  # controls enough to pin each mean down
    meta = pd.DataFrame({"plate": batch, "is_control": control})
    raw = plate_predictability(meta, X)["plate_predictability"]
    corrected = plate_predictability(meta, correct("pca_centerscale", X, batch, control))["plate_predictability"]
    assert raw > 0.9 and corrected < 0.5  # chance is 1/3


def test_degenerate_inputs_are_named():
    X, batch, control, _ = plates()
    control = control & ~((batch == "b1") & (np.arange(len(X)) % 40 > 0))  # b1 keeps one control
    with pytest.raises(CorrectionError, match="batch 'b1' has 1 control sites"):
        fit_correction("pca_centerscale", X, batch, control)
    with pytest.raises(CorrectionError, match="unknown correction"):
        fit_correction("combat", X, batch, control)
    X, batch, control, _ = plates(controls=2)  # 6 controls in all: at most 5 components
    assert fit_correction("pca_centerscale", X, batch, control, n_components=10).pca.n_components_ == 5
    fitted = fit_correction("pca_centerscale", X, batch, control)
    with pytest.raises(CorrectionError, match="batch 'b9' was not seen"):
        fitted.transform(X[:3], ["b9"] * 3)


# ----------------------------------------------------------------------------------------------------------------
# Biology metrics


def wells(separation, seed=0):
    """Well profiles: 3 perturbations x 4 wells + 8 controls; `separation` scales the perturbation signal."""
    rng = np.random.default_rng(seed)
    labels = ["EMPTY"] * 8 + [f"p{k}" for k in range(3) for _ in range(4)]
    centres = {"EMPTY": np.zeros(16), **{f"p{k}": rng.normal(size=16) for k in range(3)}}
    P = np.stack([centres[lab] * separation + rng.normal(size=16) for lab in labels])
    meta = pd.DataFrame({"plate": "P1", "well": [f"W{i}" for i in range(len(labels))], "label": labels,
                         "is_control": [lab == "EMPTY" for lab in labels], "batch": "B"})
    return meta, P


def test_replicate_map_matches_brute_force_and_separates_signal_from_noise():
    meta, P = wells(separation=0.7)
    table, overall = replicate_map(meta, P, null_size=2000)
    sims = P @ P.T / np.outer(np.linalg.norm(P, axis=1), np.linalg.norm(P, axis=1))
    for _, row in table.iterrows():  # brute force: per query well, rank the others by hand
        idx = np.flatnonzero(meta["label"] == row["perturbation"])
        aps = []
        for q in idx:
            cands = [i for i in range(len(P)) if i != q and (i in idx or meta["is_control"][i])]
            order = sorted(cands, key=lambda i: -sims[q, i])
            hits = np.array([i in idx for i in order])
            aps.append(np.mean([hits[:r + 1].sum() / (r + 1) for r in np.flatnonzero(hits)]))
        assert row["map"] == pytest.approx(np.mean(aps))
    assert overall["map"] == pytest.approx(table["map"].mean())
    strong = replicate_map(*wells(separation=5.0), null_size=2000)[1]
    noise = replicate_map(*wells(separation=0.0), null_size=2000)[1]
    assert strong["map"] > 0.95 and strong["fraction_retrieved"] == 1.0
    assert noise["map"] < 0.6 and noise["fraction_retrieved"] == 0.0


def test_relationship_recall_finds_the_known_pair():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(8, 16))
    base[1] = base[0] + 0.05 * rng.normal(size=16)  # p0 and p1 are nearly the same perturbation
    meta = pd.DataFrame({"label": [f"p{k}" for k in range(8)], "is_control": False})
    pairs = pd.DataFrame({"perturbation_a": ["p0", "p2", "pX"], "perturbation_b": ["p1", "p3", "p0"]})
    out = relationship_recall(meta, base, pairs.iloc[:1])
    assert out == {"recall_0.05_0.95": 1.0, "recall_0.1_0.9": 1.0, "relationship_pairs": 1.0}
    assert relationship_recall(meta, base, pairs)["relationship_pairs"] == 2.0  # pX is absent


def test_well_profiles_average_sites():
    meta = pd.DataFrame({"plate": ["A", "A", "A", "B"], "well": ["w1", "w1", "w2", "w1"], "label": ["x", "x", "y", "x"],
                         "is_control": [False] * 4, "batch": ["b"] * 4})
    X = np.array([[0.0, 2], [2, 4], [5, 5], [7, 7]])
    wmeta, P = well_profiles(meta, X)
    assert list(wmeta["plate"] + wmeta["well"]) == ["Aw1", "Aw2", "Bw1"]
    np.testing.assert_allclose(P, [[1, 3], [5, 5], [7, 7]])


# ----------------------------------------------------------------------------------------------------------------
# Probes


@pytest.mark.parametrize("kind", ["logistic", "knn"])
def test_probe_metrics_use_finetuning_names(kind):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 30)
    X = np.eye(3)[y] * 4 + rng.normal(size=(90, 3))
    split = np.array(["train", "val", "test"] * 30)
    metrics, predictions = run_probe(kind, X, y, split, ProbeConfig())
    assert set(metrics) == {f"{s}/{m}" for s in ("train", "val", "test", "best/val")
                            for m in ("accuracy", "accuracy_ci_low", "accuracy_ci_high", "macro_f1",
                                      "balanced_accuracy", "chance_accuracy", "chance_balanced_accuracy")}
    assert metrics["best/val/accuracy"] == metrics["val/accuracy"]  # fitted once: named as a fine-tune's best epoch
    assert metrics["test/accuracy"] > 0.9 and len(predictions["test"][0]) == 30
    with pytest.raises(ValueError, match="at least two classes"):
        run_probe(kind, X, np.zeros(90, int), split, ProbeConfig())


# ----------------------------------------------------------------------------------------------------------------
# The embedding pass and the job


SMALL = ["embed.encoder.checkpoint=null", "synth.experiments=1", "synth.plates_per_experiment=4",
         "synth.wells_per_plate=14", "synth.controls_per_plate=4", "synth.sites_per_well=1", "synth.effect_size=3",
         "data.channels=[nuclei, er, mito]", "embed.sites_per_file=10", "biology.null_size=500"]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return tmp_path_factory.mktemp("eval") / "plates"


def small_config(root: Path, out: Path, *overrides: str) -> EvaluateConfig:
    return load_config(EvaluateConfig, QUICKSTART, [*SMALL, f"data.root={root}", f"run.output_dir={out}",
                                                    *overrides])


def test_embed_matches_the_model_and_resumes_per_file(ray_session, tmp_path):
    from camae.classifier import base_model
    from camae.data import load_site, prepare_dataset
    from evaluation.embed import embed_table, load_embeddings

    cfg = small_config(tmp_path / "plates512", tmp_path, "synth.size=512", "data.eval_crop=tile", "embed.blocks=true",
                       "embed.channelwise=true")
    table, _ = prepare_dataset(cfg.data, cfg.synth)
    out = tmp_path / "emb"
    result = embed_table(table, cfg.data, cfg.embed, out)
    assert (result.files, result.files_written, result.sites, result.skipped) == (6, 6, len(table), 0)
    meta, X = load_embeddings(out)
    assert sorted(meta["sample_id"]) == sorted(table["sample_id"]) and X.shape == (len(table), 32)

    # exact against the model: each 512x512 site's four 256x256 tiles, embedded together and averaged
    model = base_model(cfg.embed.encoder).eval()
    row = table.iloc[7]
    site = torch.from_numpy(load_site(row.to_dict(), cfg.data))
    tiles = torch.stack([site[:, y:y + 256, x:x + 256] for y in (0, 256) for x in (0, 256)])
    i = meta.index[meta["sample_id"] == row["sample_id"]][0]
    np.testing.assert_allclose(X[i], model.predict(tiles).mean(0).numpy(), rtol=1e-5, atol=1e-6)
    blocks = load_embeddings(out, "embedding_blocks")[1]
    np.testing.assert_allclose(blocks[:, -32:], X, rtol=1e-6)  # the last block's pooled output is the embedding
    assert load_embeddings(out, "embedding_channelwise")[1].shape == (len(table), 3 * 32)

    # resumable per file: only the deleted file is written again
    victim = out / "part-00002.parquet"
    stamps = {f.name: f.stat().st_mtime_ns for f in out.glob("part-*.parquet") if f != victim}
    victim.unlink()
    again = embed_table(table, cfg.data, cfg.embed, out)
    assert again.files_written == 1 and victim.is_file()
    assert stamps == {f.name: f.stat().st_mtime_ns for f in out.glob("part-*.parquet") if f != victim}
    np.testing.assert_array_equal(load_embeddings(out)[1], X)

    cfg.embed.encoder.depth = 3  # another encoder must not be mixed into these files
    with pytest.raises(ValueError, match="holds embeddings made with other settings \\(encoder.random.depth differ\\)"):
        embed_table(table, cfg.data, cfg.embed, out)


@pytest.mark.slow
def test_evaluate_job_logs_probes_beside_finetunes(ray_session, small, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from evaluation.evaluate import main

    monkeypatch.delenv("CAMAE_PARENT_RUN_ID", raising=False)
    args = ["--config", str(QUICKSTART)] + [a for o in [*SMALL, f"data.root={small}", f"run.output_dir={tmp_path}"]
                                            for a in ("--set", o)]
    assert main(args) == 0
    out = tmp_path / "evaluate-quickstart"
    summary = json.loads((out / "summary.json").read_text())
    client = MlflowClient(summary["tracking_uri"])
    parent = client.get_run(summary["run_id"])
    assert parent.data.tags["camae.kind"] == "evaluation" and parent.info.status == "FINISHED"
    probes = [client.get_run(r) for r in summary["probe_runs"]]
    assert sorted((r.data.tags["camae.probe"], r.data.tags["camae.correction"]) for r in probes) == sorted(
        (k, c) for k in ("logistic", "knn") for c in ("raw", "pca_centerscale", "tvn", "harmony"))
    for run in probes:
        assert run.data.tags["camae.kind"] == "probe"
        assert run.data.tags["mlflow.parentRunId"] == summary["run_id"]
        assert {"test/accuracy", "val/accuracy", "test/macro_f1", "bio/map"} <= set(run.data.metrics)
    assert parent.data.metrics["tvn/bio/map"] > 0  # biology metrics per correction on the parent
    assert {"harmony/bio/recall_0.05_0.95", "tvn/bio/recall_0.1_0.9", "raw/bio/consistency_map"} <= set(
        parent.data.metrics)
    assert len(pd.read_csv(out / "per_block.csv")) == 2  # the tiny encoder's two blocks
    assert list(pd.read_csv(out / "channel_leave_one_out.csv")["left_out"]) == ["nuclei", "er", "mito"]
    artifacts = {a.path for a in client.list_artifacts(summary["run_id"])}
    assert {"metrics.md", "projection.png", "confusion_test.png", "per_block.png", "channel_leave_one_out.png",
            "replicate_map.csv", "config.yaml"} <= artifacts
    splits = pd.read_csv(out / "splits.csv")
    assert splits.groupby("plate")["split"].nunique().max() == 1  # by plate, never by image
    assert os.path.getsize(out / "metrics.md") > 0


@pytest.mark.gpu
def test_embedder_actor_on_gpu_matches_cpu():
    from camae.config import EmbedConfig, EncoderSpec
    from evaluation.embed import Embedder

    cfg = EmbedConfig(EncoderSpec(embed_dim=32, depth=2, num_heads=2), precision="fp32")
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (4, 3, 256, 256), dtype=np.uint8), "sample_id": np.arange(4).astype(str),
             "tile": np.zeros(4, np.int64), "n_tiles": np.ones(4, np.int64)}
    cpu, gpu = Embedder(cfg, use_gpu=False, threads=0)(batch), Embedder(cfg, use_gpu=True, threads=0)(batch)
    np.testing.assert_allclose(gpu["embedding"], cpu["embedding"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gpu["embedding_blocks"], cpu["embedding_blocks"], rtol=1e-4, atol=1e-4)


def test_embed_counts_skipped_sites_and_loads_around_them(ray_session, tmp_path):
    from camae.data import prepare_dataset, skipped_report
    from evaluation.embed import embed_table, load_embeddings

    cfg = small_config(tmp_path / "plates", tmp_path, "synth.plates_per_experiment=1", "data.on_error=skip",
                       "embed.sites_per_file=2", "embed.blocks=false", "data.val_fraction=0", "data.test_fraction=0")
    table, _ = prepare_dataset(cfg.data, cfg.synth)
    for row in table.sort_values(["plate", "well", "site"]).iloc[:2].itertuples():  # all of the first file
        Path(row.path_er).write_bytes(b"not a png")
    result = embed_table(table, cfg.data, cfg.embed, tmp_path / "emb")
    assert (result.sites, result.skipped) == (len(table), 2)
    assert len(skipped_report(tmp_path / "emb" / "skipped")) == 2
    meta, X = load_embeddings(tmp_path / "emb")
    assert len(meta) == len(X) == len(table) - 2
