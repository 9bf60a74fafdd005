"""The dataset table, its readers, splits, label map, decoding errors and the Ray Data stream."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from camae.config import ConfigError, DataConfig
from camae.data import (
    TRAIN_COLUMNS,
    BlockDataset,
    DataError,
    LabelMap,
    assign_splits,
    build_dataset,
    crops,
    decode_batch,
    drop_channels,
    load_site,
    read_table,
    skipped_report,
    to_uint8,
)
from camae.synth import SynthConfig, generate


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    out = tmp_path_factory.mktemp("plates")
    generate(out, SynthConfig(size=128, cells_per_site=6, wells_per_plate=10, controls_per_plate=2, classes=2,
                              sites_per_well=1, workers=1))
    return out


@pytest.fixture
def cfg(synth_root):
    return DataConfig(root=str(synth_root), crop_size=128, decode_batch_size=4)


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def _batch(table: pd.DataFrame) -> dict:
    return {c: table[c].to_numpy() for c in table.columns}


# --- the table -------------------------------------------------------------------------------------------------


def test_rxrx1_table(cfg):
    table = read_table(cfg)
    assert len(table) == 4 * 10
    assert list(table.columns[:7]) == ["sample_id", "plate", "batch", "well", "site", "label", "is_control"]
    assert table.plate.nunique() == 4 and table.batch.nunique() == 2  # plate numbers repeat across experiments
    assert table.is_control.sum() == 4 * 2 and set(table.label) == {"EMPTY", "siRNA-01", "siRNA-02"}
    assert table.path_nuclei.str.endswith("_w1.png").all() and table.path_golgi.str.endswith("_w6.png").all()


def test_channels_are_chosen_and_ordered_by_name(cfg):
    cfg.channels = ["mito", "nuclei"]
    table = read_table(cfg)
    assert [c for c in table.columns if c.startswith("path_")] == ["path_mito", "path_nuclei"]
    site = load_site(table.iloc[0].to_dict(), cfg)
    assert site.shape == (2, 128, 128)
    assert np.array_equal(site[1], np.asarray(Image.open(table.path_nuclei[0])))


def test_unknown_rxrx1_channel(cfg):
    cfg.channels = ["nuclei", "dapi"]
    with pytest.raises(ConfigError, match=r"\['dapi'\], not RxRx1 channels"):
        read_table(cfg)


def _jump_plate(tmp_path, plates=("BR001", "BR002"), bits=16):
    rng = np.random.default_rng(0)
    rows = []
    for plate in plates:
        for well in ("A01", "B02"):
            row = {"Metadata_Plate": plate, "Metadata_Well": well, "Metadata_Site": 1, "Metadata_Source": "src1",
                   "Metadata_JCP2022": "JCP-1" if well == "A01" else "DMSO",
                   "Metadata_pert_type": "trt" if well == "A01" else "control"}
            for channel in ("DNA", "ER"):
                name = f"{plate}_{well}_{channel}.tiff"
                tifffile.imwrite(tmp_path / "images" / name if (tmp_path / "images").is_dir() else
                                 _mk(tmp_path / "images") / name,
                                 rng.integers(0, 2**bits, (160, 160), dtype=np.uint16))
                row[f"FileName_Orig{channel}"], row[f"PathName_Orig{channel}"] = name, "images"
            rows.append(row)
    path = tmp_path / "load_data.parquet"
    pd.DataFrame(rows).to_parquet(path)
    return path


def _mk(path):
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_jump_load_data_with_16_bit_tiffs(tmp_path):
    path = _jump_plate(tmp_path)
    cfg = DataConfig(format="jump", root=str(path), channels=["DNA", "ER"], label_column="Metadata_JCP2022",
                     control_column="Metadata_pert_type", control_values=["control"], plate_column="Metadata_Plate",
                     well_column="Metadata_Well", site_column="Metadata_Site", batch_column="Metadata_Source",
                     crop_size=128, extra_columns=["Metadata_Source"])
    table = read_table(cfg)
    assert len(table) == 4 and table.is_control.sum() == 2 and table.batch.unique().tolist() == ["src1"]
    site = load_site(table.iloc[0].to_dict(), cfg)
    assert site.dtype == np.uint8 and site.shape == (2, 160, 160)
    raw = tifffile.imread(table.path_DNA[0])
    assert np.array_equal(site[0], to_uint8(raw, cfg))


@pytest.mark.parametrize("mapping", ["percentile", "minmax", "shift"])
def test_uint16_mapping_against_an_independent_computation(mapping):
    img = np.random.default_rng(1).integers(100, 4000, (64, 64), dtype=np.uint16)
    cfg = DataConfig(uint16_mapping=mapping, percentiles=[1.0, 99.0], source_bits=12)
    out = to_uint8(img, cfg)
    if mapping == "shift":
        expected = (img // 16).astype(np.uint8)
    else:
        lo, hi = (np.percentile(img, 1), np.percentile(img, 99)) if mapping == "percentile" else (img.min(), img.max())
        expected = np.array([[round(min(max((v - lo) / (hi - lo), 0), 1) * 255) for v in r] for r in img.tolist()])
    assert out.dtype == np.uint8 and np.abs(out.astype(int) - expected).max() <= 1
    assert to_uint8(np.full((4, 4), 7, dtype=np.uint16), cfg).max() == (0 if mapping != "shift" else 0)


def test_manifest_with_named_columns(tmp_path, synth_root):
    rx = read_table(DataConfig(root=str(synth_root), crop_size=128))
    manifest = pd.DataFrame({"my_plate": rx.plate, "my_well": rx.well, "fov": rx.site, "compound": rx.label,
                             "role": np.where(rx.is_control, "neg", "trt"), "dna_file": rx.path_nuclei})
    manifest.to_csv(tmp_path / "manifest.csv", index=False)
    cfg = DataConfig(format="manifest", root=str(tmp_path / "manifest.csv"), channels=["dna"],
                     channel_columns={"dna": "dna_file"}, label_column="compound", control_column="role",
                     control_values=["neg"], plate_column="my_plate", well_column="my_well", site_column="fov",
                     batch_column=None, crop_size=128)
    table = read_table(cfg)
    assert table.label.tolist() == rx.label.tolist() and (table.batch == table.plate).all()


@pytest.mark.parametrize("layout", ["CHW", "HWC"])
def test_manifest_with_one_multichannel_file_per_site(tmp_path, layout):
    rng = np.random.default_rng(0)
    stacks = rng.integers(0, 2**16, (2, 3, 130, 140), dtype=np.uint16)
    for i, stack in enumerate(stacks):
        data = stack if layout == "CHW" else np.moveaxis(stack, 0, -1)
        tifffile.imwrite(tmp_path / f"s{i}.tiff", data, photometric="minisblack")
    pd.DataFrame({"plate": ["P1", "P2"], "well": ["A01", "A01"], "site": [1, 1], "label": ["x", "y"],
                  "ctrl": ["no", "yes"], "file": ["s0.tiff", "s1.tiff"]}).to_csv(tmp_path / "m.csv", index=False)
    cfg = DataConfig(format="manifest", root=str(tmp_path / "m.csv"), image_column="file",
                     file_channels=["DNA", "ER", "Mito"], channels=["Mito", "DNA"], label_column="label",
                     control_column="ctrl", control_values=["yes"], batch_column=None, crop_size=128,
                     uint16_mapping="minmax")
    table = read_table(cfg)
    assert "path" in table.columns and table.is_control.tolist() == [False, True]
    site = load_site(table.iloc[1].to_dict(), cfg)
    assert site.shape == (2, 130, 140)
    assert np.array_equal(site[0], to_uint8(stacks[1, 2], cfg)) and np.array_equal(site[1], to_uint8(stacks[1, 0], cfg))
    cfg.file_channels, cfg.channels = ["DNA", "ER"], ["DNA"]  # but the files hold 3 planes
    with pytest.raises(DataError, match=r"expected a stack of 2 planes"):
        load_site(read_table(cfg).iloc[0].to_dict(), cfg)
    cfg.channels = ["DNA", "AGP"]
    with pytest.raises(ConfigError, match=r"\['AGP'\], not in data.file_channels"):
        read_table(cfg)


def test_missing_columns_are_named(tmp_path):
    pd.DataFrame({"plate": [1], "well": ["A01"]}).to_csv(tmp_path / "m.csv", index=False)
    cfg = DataConfig(format="manifest", root=str(tmp_path / "m.csv"), channels=["dna"],
                     channel_columns={"dna": "dna_file"})
    with pytest.raises(DataError, match=r"lacks columns \['dna_file'\]"):
        read_table(cfg)


def test_missing_label_names_the_row(cfg, synth_root, tmp_path):
    meta = pd.read_csv(synth_root / "metadata.csv")
    meta.loc[3, "sirna"] = None
    (tmp_path / "images").symlink_to(synth_root / "images")
    meta.to_csv(tmp_path / "metadata.csv", index=False)
    cfg.root = str(tmp_path)
    with pytest.raises(DataError, match="1 rows have no label .*row 3"):
        read_table(cfg)


# --- splits and labels -----------------------------------------------------------------------------------------


def test_splits_are_by_plate(cfg):
    table = read_table(cfg)
    split = assign_splits(table, cfg)
    assert set(split) == {"train", "val", "test"}
    per_plate = table.groupby("plate").apply(lambda g: split[g.index].nunique(), include_groups=False)
    assert (per_plate == 1).all()  # no plate straddles two splits
    assert (assign_splits(table, cfg) == split).all()  # deterministic


def test_explicit_split_groups(cfg):
    table = read_table(cfg)
    plates = sorted(table.plate.unique())
    cfg.val_groups, cfg.test_groups = [plates[0]], [plates[1]]
    split = assign_splits(table, cfg)
    assert set(table.plate[split == "val"]) == {plates[0]} and set(table.plate[split == "test"]) == {plates[1]}


@pytest.mark.parametrize(("changes", "message"), [
    ({"test_groups": ["nope"]}, r"test_groups names \['nope'\]"),
    ({"val_fraction": 0.5, "test_fraction": 0.5}, "leaves no training plate"),
    ({"split_by": "row"}, "split_by='row' is not a table column"),
])
def test_split_errors(cfg, changes, message):
    for k, v in changes.items():
        setattr(cfg, k, v)
    with pytest.raises(ConfigError, match=message):
        assign_splits(read_table(cfg), cfg)


def test_label_map_is_stable_saved_and_strict(tmp_path):
    labels = LabelMap.from_labels(["b", "a", "c", "a"])
    assert labels.names == ("a", "b", "c") and labels.encode(["c", "a"]).tolist() == [2, 0]
    assert LabelMap.load(labels.save(tmp_path / "labels.json")) == labels
    with pytest.raises(DataError, match=r"labels \['zzz'\] are not in the run's label map"):
        labels.encode(["a", "zzz"])


# --- decoding --------------------------------------------------------------------------------------------------


def test_crops_and_tiles():
    image = np.arange(3 * 512 * 512, dtype=np.int64).reshape(3, 512, 512).astype(np.uint8)
    cfg = DataConfig(crop_size=256, eval_crop="tile")
    tiles = crops(image, cfg, train=False, rng=np.random.default_rng())
    assert len(tiles) == 4 and np.array_equal(tiles[3], image[:, 256:, 256:])
    cfg.eval_crop = "center"
    (center,) = crops(image, cfg, train=False, rng=np.random.default_rng())
    assert np.array_equal(center, image[:, 128:384, 128:384])
    (random_crop,) = crops(image, cfg, train=True, rng=np.random.default_rng(0))
    assert random_crop.shape == (3, 256, 256)


def test_channel_dropout_keeps_one_channel():
    image = np.ones((4, 8, 8), dtype=np.uint8)
    rng = np.random.default_rng(0)
    kept = [(drop_channels(image, 0.99, rng).reshape(4, -1).max(1) > 0).sum() for _ in range(50)]
    assert min(kept) >= 1 and np.array_equal(drop_channels(image, 0.0, rng), image)


def _broken(cfg, tmp_path, kind):
    table = read_table(cfg)
    target = tmp_path / "broken.png"
    if kind == "missing":
        table.loc[1, "path_er"] = str(tmp_path / "nope.png")
        return table, "nope.png does not exist"
    if kind == "corrupt":
        target.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
        message = "cannot be decoded"
    elif kind == "rgb":
        Image.fromarray(np.zeros((128, 128, 3), dtype=np.uint8)).save(target)
        message = r"shape \(128, 128, 3\).*one 2-D grayscale channel"
    elif kind == "size":
        Image.fromarray(np.zeros((128, 96), dtype=np.uint8)).save(target)
        message = "channels of different sizes"
    table.loc[1, "path_er"] = str(target)
    return table, message


@pytest.mark.parametrize("kind", ["missing", "corrupt", "rgb", "size"])
def test_bad_images_raise_naming_the_file(cfg, tmp_path, kind):
    table, message = _broken(cfg, tmp_path, kind)
    with pytest.raises(DataError, match=message):
        decode_batch(_batch(table.iloc[:3]), cfg, train=False)


def test_small_images_are_refused(cfg):
    cfg.crop_size = 256
    with pytest.raises(DataError, match="smaller than data.crop_size=256"):
        load_site(read_table(cfg).iloc[0].to_dict(), cfg)


def test_skip_counts_and_reports(cfg, tmp_path):
    table, _ = _broken(cfg, tmp_path, "corrupt")
    cfg.on_error = "skip"
    out = decode_batch(_batch(table.iloc[:3]), cfg, train=False, skip_log=str(tmp_path / "skips"))
    assert out["image"].shape[0] == 2 and table.sample_id[1] not in out["sample_id"]
    report = skipped_report(tmp_path / "skips")
    assert report.sample_id.tolist() == [table.sample_id[1]] and "cannot be decoded" in report.error[0]


def test_torch_block_dataset(cfg):
    """The DataLoader path decodes the same blocks as Ray Data: every site once, its label with it."""
    table = read_table(cfg)
    labels = LabelMap.from_labels(table.label)
    items = list(BlockDataset(table, cfg, train=True, label_map=labels))
    assert len(items) == len(table) and {i["sample_id"] for i in items} == set(table.sample_id)
    item = next(i for i in items if i["sample_id"] == table.sample_id[5])
    assert item["image"].shape == (6, 128, 128) and item["label_index"] == labels.encode([table.label[5]])[0]


# --- the Ray Data stream ---------------------------------------------------------------------------------------


def test_ray_stream_delivers_every_site_once_with_labels(ray_local, cfg):
    table = read_table(cfg)
    train = table[assign_splits(table, cfg) == "train"]
    labels = LabelMap.from_labels(table.label)
    ds = build_dataset(train, cfg, train=True, label_map=labels)
    seen = []
    for batch in ds.iter_batches(batch_size=8, batch_format="numpy"):
        assert batch["image"].dtype == np.uint8 and batch["image"].shape[1:] == (6, 128, 128)
        assert (labels.encode(batch["label"]) == batch["label_index"]).all()
        seen += batch["sample_id"].tolist()
    assert sorted(seen) == sorted(train.sample_id)
    torch_batch = next(iter(build_dataset(train, cfg, True, labels, columns=TRAIN_COLUMNS).iter_torch_batches(
        batch_size=4)))
    assert set(torch_batch) == {"image", "label_index"} and torch_batch["image"].shape == (4, 6, 128, 128)


def test_ray_stream_eval_tiles(ray_local, cfg):
    cfg.crop_size, cfg.eval_crop = 64, "tile"
    table = read_table(cfg).iloc[:5]
    rows = build_dataset(table, cfg, train=False).take_all()
    assert len(rows) == 5 * 4 and {r["tile"] for r in rows} == {0, 1, 2, 3}


def test_ray_stream_errors_name_the_file(ray_local, cfg, tmp_path):
    table, _ = _broken(cfg, tmp_path, "corrupt")
    with pytest.raises(Exception, match="broken.png cannot be decoded"):
        build_dataset(table, cfg, train=False).take_all()
    cfg.on_error = "skip"
    rows = build_dataset(table, cfg, train=False, skip_log=str(tmp_path / "skips")).take_all()
    assert len(rows) == len(table) - 1 and len(skipped_report(tmp_path / "skips")) == 1


class _MeanIntensity:
    """Stands in for an embedding actor: per-crop channel means, metadata passed through."""

    def __call__(self, batch: dict) -> dict:
        return {"sample_id": batch["sample_id"], "plate": batch["plate"],
                "features": batch["image"].reshape(*batch["image"].shape[:2], -1).mean(-1)}


def test_ray_stream_feeds_map_batches_actors(ray_local, cfg):
    import sys

    ray_local.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import test modules
    table = read_table(cfg)
    out = build_dataset(table, cfg, train=False).map_batches(_MeanIntensity, concurrency=1, batch_size=8)
    rows = out.take_all()
    assert sorted(r["sample_id"] for r in rows) == sorted(table.sample_id)
    first = next(r for r in rows if r["sample_id"] == table.sample_id[0])
    expected = load_site(table.iloc[0].to_dict(), cfg).reshape(6, -1).mean(-1)
    assert first["features"] == pytest.approx(expected) and first["plate"] == table.plate[0]
