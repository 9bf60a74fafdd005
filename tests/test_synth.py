"""The synthetic Cell Painting generator: layout, determinism, and real structure (batch effects, class signal)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score

from camae.config import DataConfig
from camae.data import load_site, read_table
from camae.synth import SynthConfig, class_effects, design, generate

SMALL = SynthConfig(size=128, cells_per_site=8, workers=1)


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    generate(out, SMALL)
    return out


def test_design_has_controls_and_every_class_on_every_plate():
    meta = design(SynthConfig())
    assert len(meta) == 2 * 2 * 30 * 2
    per_plate = meta.groupby(["experiment", "plate"])
    assert (per_plate["well_type"].apply(lambda s: (s == "negative_control").sum()) == 6 * 2).all()
    assert (per_plate["sirna"].nunique() == 4 + 1).all()
    layouts = {k: tuple(g.sort_values(["well", "site"])["sirna"]) for k, g in per_plate}
    assert len(set(layouts.values())) == len(layouts)  # each plate has its own layout


def test_design_rejects_impossible_plates():
    with pytest.raises(ValueError, match="classes"):
        design(SynthConfig(wells_per_plate=8, controls_per_plate=6, classes=4))


def test_classes_are_graded_pairs():
    effects = class_effects(SynthConfig(classes=4))
    for a, b in [(0, 1), (2, 3)]:
        cosine = effects[a] @ effects[b] / np.linalg.norm(effects[a]) / np.linalg.norm(effects[b])
        assert cosine == pytest.approx(1.0) and np.linalg.norm(effects[b]) > np.linalg.norm(effects[a])
    assert abs(effects[0] @ effects[2]) < np.linalg.norm(effects[0]) * np.linalg.norm(effects[2])


def test_rxrx1_layout_and_files(small_dataset):
    meta = pd.read_csv(small_dataset / "metadata.csv")
    assert {"experiment", "plate", "well", "site", "well_type", "sirna", "sirna_id"} <= set(meta.columns)
    row = meta.iloc[0]
    for w in range(1, 7):
        assert (small_dataset / "images" / row.experiment / f"Plate{row.plate}" / f"{row.well}_s{row.site}_w{w}.png"
                ).is_file()
    pairs = pd.read_csv(small_dataset / "relationships.csv")
    assert pairs.values.tolist() == [["siRNA-01", "siRNA-02"], ["siRNA-03", "siRNA-04"]]
    assert (small_dataset / "synth.yaml").is_file()


def test_deterministic_from_the_seed(small_dataset, tmp_path):
    cfg = SynthConfig(size=128, cells_per_site=8, workers=2, experiments=1, plates_per_experiment=1)
    generate(tmp_path, cfg)
    name = "images/SYNTH-01/Plate1/A03_s2_w5.png"
    assert (tmp_path / name).read_bytes() == (small_dataset / name).read_bytes()  # same seed, other worker count
    generate(tmp_path / "other", SynthConfig(**{**cfg.__dict__, "seed": 1}))
    assert (tmp_path / "other" / name).read_bytes() != (small_dataset / name).read_bytes()


def test_plates_differ_and_classes_carry_signal(small_dataset):
    """Uncorrected features group by plate; after per-plate control standardization the classes are learnable
    on held-out plates, well above chance and well below perfect."""
    cfg = DataConfig(root=str(small_dataset), crop_size=128)
    table = read_table(cfg)
    images = np.stack([load_site(r, cfg) for r in table.to_dict("records")]).astype(np.float32)
    X = np.concatenate([images.mean((2, 3)), images.std((2, 3)), np.percentile(images, 95, axis=(2, 3))], axis=1)
    plate_acc = cross_val_score(LogisticRegression(max_iter=2000), X, table.plate, cv=5).mean()
    assert plate_acc > 0.95  # chance 0.25
    Xc = X.copy()
    for plate in table.plate.unique():
        rows, controls = (table.plate == plate).values, ((table.plate == plate) & table.is_control).values
        Xc[rows] = (X[rows] - X[controls].mean(0)) / (X[controls].std(0) + 1e-6)
    accuracy = []
    for plate in table.plate.unique():
        train = (table.plate != plate).values
        clf = LogisticRegression(max_iter=3000).fit(Xc[train], table.label[train])
        accuracy.append(clf.score(Xc[~train], table.label[~train]))
    assert 0.4 < np.mean(accuracy) < 0.95  # chance 0.2


def test_ensure_dataset_writes_once_and_refuses_other_settings(tmp_path):
    from camae.synth import ensure_dataset

    cfg = SynthConfig(experiments=1, plates_per_experiment=1, wells_per_plate=3, controls_per_plate=1, classes=2,
                      sites_per_well=1, workers=1)
    assert ensure_dataset(tmp_path, cfg) is True
    assert ensure_dataset(tmp_path, cfg) is False  # already there: reused
    with pytest.raises(ValueError, match="made with other settings \\(effect_size differ"):
        ensure_dataset(tmp_path, SynthConfig(**{**cfg.__dict__, "effect_size": 3.0}))
