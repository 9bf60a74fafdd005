"""Parquet shards: `camae pack` and data.format packed (the same sites as the source images, bit for bit), and
RxRx3-core in its published layout (JPEG 2000 channel rows grouped into sites, the official 4-tile embedding)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from camae.config import ConfigError, DataConfig, EmbedConfig, EncoderSpec
from camae.data import TRAIN_COLUMNS, BlockDataset, DataError, LabelMap, build_dataset, read_table, skipped_report
from camae.shards import PackError, decode_jp2, pack, read_manifest
from camae.synth import SynthConfig, generate


@pytest.fixture(scope="module")
def ray_session():
    """Four logical CPUs on this machine's two cores: two training workers leave Ray Data CPUs to decode with."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


SMALL = dict(size=256, cells_per_site=6, wells_per_plate=10, controls_per_plate=2, classes=2, workers=2)


@pytest.fixture(scope="module")
def plates(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards") / "plates"
    generate(root, SynthConfig(**SMALL))  # 2 experiments x 2 plates x 10 wells x 2 sites = 80 sites
    return root


def source(plates: Path, **kw) -> DataConfig:
    return DataConfig(**{"root": str(plates), "crop_size": 64, "eval_crop": "tile", **kw})


@pytest.fixture(scope="module")
def packed(ray_session, plates, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "packed"
    result = pack(source(plates), str(out), shard_mb=3, rows_per_group=4)  # 384 KiB sites: 8 per shard
    assert (result.sites, result.skipped, result.shards, result.written) == (80, 0, 10, 10)
    return out


def packed_cfg(packed: Path, **kw) -> DataConfig:
    return DataConfig(**{"format": "packed", "root": str(packed), "crop_size": 64, "eval_crop": "tile", **kw})


def crops_by_site(table: pd.DataFrame, cfg: DataConfig) -> dict:
    return {(r["sample_id"], int(r["tile"])): r["image"] for r in build_dataset(table, cfg, train=False).iter_rows()}


def test_pack_writes_shards_manifest_and_checksums(packed, plates):
    manifest = read_manifest(str(packed))
    assert manifest["shape"] == [6, 256, 256] and manifest["channels"] == DataConfig().channels
    assert manifest["sites"] == 80 and manifest["skipped"] == 0 and manifest["source"]["format"] == "rxrx1"
    assert manifest["uint16_mapping"]["mapping"] == "percentile"
    for shard in manifest["shards"]:
        path = packed / "shards" / shard["file"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == shard["sha256"]
        assert shard["bytes"] == path.stat().st_size
        meta = pq.ParquetFile(path).metadata
        assert meta.num_rows == shard["sites"] == 8 and meta.num_row_groups == shard["row_groups"] == 2
    assert (packed / "relationships.csv").read_text() == (plates / "relationships.csv").read_text()


def test_packed_table_is_the_source_table(packed, plates):
    a = read_table(source(plates)).sort_values("sample_id").reset_index(drop=True)
    b = read_table(packed_cfg(packed)).sort_values("sample_id").reset_index(drop=True)
    meta = ["sample_id", "plate", "batch", "well", "site", "label", "is_control"]
    pd.testing.assert_frame_equal(a[meta], b[meta])
    assert set(b.columns) - set(meta) == {"shard", "row", "row_group"}


def test_packed_eval_crops_are_identical_to_the_images(packed, plates):
    """Every tile of every site, bit for bit, also for a subset of channels in another order."""
    channels = ["mito", "nuclei"]
    a = crops_by_site(read_table(source(plates, channels=channels)), source(plates, channels=channels))
    b = crops_by_site(read_table(packed_cfg(packed, channels=channels)), packed_cfg(packed, channels=channels))
    assert len(a) == len(b) == 80 * 16 and a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert next(iter(b.values())).shape == (2, 64, 64)


def test_packed_training_stream(packed):
    """Random crops vary per epoch, channel dropout and the label map work, labels stay with their sites."""
    cfg = packed_cfg(packed, channel_dropout=0.5)
    table = read_table(cfg)
    labels = LabelMap.from_labels(table["label"])
    ds = build_dataset(table, cfg, train=True, label_map=labels, columns=TRAIN_COLUMNS)
    epochs = [torch.cat([b["image"] for b in ds.iter_torch_batches(batch_size=16)]) for _ in range(2)]
    assert epochs[0].shape == (80, 6, 64, 64) and not torch.equal(epochs[0], epochs[1])
    zeroed = (epochs[0].flatten(2).amax(2) == 0).float().mean().item()
    assert 0.3 < zeroed < 0.6  # about half the channels dropped (never all of one site)
    batch = next(iter(ds.iter_batches(batch_size=80, batch_format="numpy")))
    assert sorted(np.bincount(batch["label_index"])) == sorted(np.bincount(labels.encode(table["label"])))


def test_packed_training_blocks_mix_plates(packed):
    """A row group holds neighbouring wells of one plate; a training block joins TRAIN_MIX random row groups."""
    from camae.data import TRAIN_MIX, blocks

    cfg = packed_cfg(packed)
    table = read_table(cfg)
    parts = blocks(table, cfg, train=True)
    assert len(parts) == 20 // TRAIN_MIX and sorted(pd.concat(parts)["sample_id"]) == sorted(table["sample_id"])
    assert all(p.groupby(["shard", "row_group"]).ngroups == TRAIN_MIX for p in parts)
    assert np.mean([p["plate"].nunique() > 1 for p in parts]) > 0.5
    assert all(p.groupby(["shard", "row_group"]).ngroups == 1 for p in blocks(table, cfg, train=False))
    loader = torch.utils.data.DataLoader(BlockDataset(table, cfg, True, columns=["sample_id"]), batch_size=80,
                                         num_workers=2)
    epochs = [[s for b in loader for s in b["sample_id"]] for _ in range(2)]
    assert all(sorted(e) == sorted(table["sample_id"]) for e in epochs) and epochs[0] != epochs[1]


def test_dataloader_reads_the_same_blocks(packed):
    cfg = packed_cfg(packed, eval_crop="center")
    table = read_table(cfg)
    loader = torch.utils.data.DataLoader(BlockDataset(table, cfg, False, columns=["image", "sample_id"]),
                                         batch_size=10, num_workers=2)
    got = {s: im for b in loader for s, im in zip(b["sample_id"], b["image"], strict=True)}
    ray_crops = crops_by_site(table, cfg)
    assert len(got) == 80 and all(np.array_equal(got[s].numpy(), ray_crops[s, 0]) for s in got)


def test_rerun_finishes_only_missing_shards(packed, plates, tmp_path):
    out = tmp_path / "again"
    shutil.copytree(packed, out)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").unlink()
    (out / "shards" / "shard-00003.json").unlink()  # an interrupted pack: shard 3 half written
    (out / "shards" / "shard-00003.parquet").write_bytes(b"PAR1 truncated")
    with pytest.raises(PackError, match=r"unfinished pack \(9 of 10 shards written\); rerun"):
        read_table(packed_cfg(out))
    before = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.parquet")}
    result = pack(source(plates), str(out), shard_mb=3, rows_per_group=4)
    assert result.written == 1 and result.shards == 10
    after = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.parquet")}
    assert [n for n in after if after[n] != before[n]] == ["shard-00003.parquet"]
    assert json.loads((out / "manifest.json").read_text()) == manifest  # the same bytes, checksums included
    with pytest.raises(PackError, match=r"holds a pack of other data or settings \(channels, "):
        pack(source(plates, channels=["nuclei"]), str(out), shard_mb=3, rows_per_group=4)


def test_sites_that_fail_to_decode_are_counted_as_in_training(ray_session, plates, tmp_path):
    broken = tmp_path / "plates"
    shutil.copytree(plates, broken)
    bad = broken / "images" / "SYNTH-01" / "Plate1" / "A03_s1_w2.png"
    bad.write_bytes(b"not a png")
    result = pack(source(broken, on_error="skip"), str(tmp_path / "packed"), rows_per_group=4)
    assert (result.sites, result.skipped) == (79, 1)
    report = skipped_report(tmp_path / "packed" / "skipped")
    assert list(report["sample_id"]) == ["SYNTH-01_P1_A03_s1"] and "cannot be decoded" in report["error"][0]
    assert len(read_table(packed_cfg(tmp_path / "packed"))) == 79
    with pytest.raises(DataError, match=f"image {bad} cannot be decoded"):
        pack(source(broken), str(tmp_path / "packed-raise"), rows_per_group=4)


def test_packed_config_errors_name_the_key(packed):
    with pytest.raises(ConfigError, match=r"data.channels has \['dapi'\], not in the pack"):
        read_table(packed_cfg(packed, channels=["dapi"]))
    with pytest.raises(PackError, match="holds no packed dataset"):
        read_table(packed_cfg(packed.parent / "nothing-here"))


def test_packed_embeddings_equal_the_images(packed, plates, tmp_path):
    from evaluation.embed import embed_table, load_embeddings

    cfg = EmbedConfig(EncoderSpec(embed_dim=32, depth=2, num_heads=2), blocks=False, batch_size=16,
                      sites_per_file=32, use_gpu="no")
    out = {}
    center = {"crop_size": 256, "eval_crop": "center"}
    for name, data in (("images", source(plates, **center)), ("packed", packed_cfg(packed, **center))):
        result = embed_table(read_table(data), data, cfg, tmp_path / name)
        assert result.sites == 80 and result.skipped == 0
        meta, X = load_embeddings(tmp_path / name)
        out[name] = (meta.sort_values("sample_id"), X[meta.sort_values("sample_id").index])
    assert list(out["images"][0]["sample_id"]) == list(out["packed"][0]["sample_id"])
    assert "shard" not in out["packed"][0].columns and "path_er" not in out["images"][0].columns
    np.testing.assert_array_equal(out["images"][1], out["packed"][1])


# --- RxRx3-core ---------------------------------------------------------------------------------------------------


RX3 = dict(layout="rxrx3_core", size=512, sites_per_well=1, cells_per_site=8, wells_per_plate=12,
           controls_per_plate=2, classes=4, experiments=2, plates_per_experiment=1, workers=2)


def rxrx3_cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(format="rxrx3_core", root=str(root), label_column="treatment", control_column="treatment",
                      control_values=["EMPTY_control"], batch_column="experiment_name", well_column="address",
                      crop_size=256, eval_crop="tile", **kw)


@pytest.fixture(scope="module")
def rxrx3(tmp_path_factory) -> Path:
    import camae.synth

    root = tmp_path_factory.mktemp("rxrx3") / "core"
    old = camae.synth.RXRX3_ROWS_PER_SHARD
    camae.synth.RXRX3_ROWS_PER_SHARD = 32  # not a multiple of 6: sites straddle two shards
    try:
        generate(root, SynthConfig(**RX3))
    finally:
        camae.synth.RXRX3_ROWS_PER_SHARD = old
    return root


def test_synthetic_rxrx3_core_has_the_published_layout(rxrx3):
    meta = pd.read_csv(rxrx3 / "metadata_rxrx3_core.csv")
    assert list(meta.columns) == ["well_id", "experiment_name", "plate", "address", "gene", "treatment", "SMILES",
                                  "concentration", "perturbation_type", "cell_type"]
    assert set(meta["experiment_name"]) == {"gene-001", "compound-001"} and len(meta) == 24
    assert (meta["treatment"] == "EMPTY_control").sum() == 4
    compounds = meta[meta["perturbation_type"] == "COMPOUND"]
    assert set(compounds["concentration"]) == {0.25, 2.5} and compounds["SMILES"].notna().all()
    assert pd.read_csv(rxrx3 / "relationships.csv").values.tolist() == [
        ["CPD-01", "GENE-01"], ["CPD-01", "GENE-02"], ["CPD-02", "GENE-03"], ["CPD-02", "GENE-04"]]
    shards = sorted((rxrx3 / "data").glob("train-*.parquet"))
    assert len(shards) == 5  # 144 channel images, 32 per shard
    first = pq.read_table(shards[0]).to_pandas()
    assert first["__key__"][0] == "compound-001/Plate1/A01_s1_1" and set(first["jp2"][0]) == {"bytes", "path"}


def test_rxrx3_core_sites_are_their_six_channel_images(ray_session, rxrx3):
    """Each channel of each site is the image under its key, decoded independently, wherever its shard is."""
    cfg = rxrx3_cfg(rxrx3)
    table = read_table(cfg)
    assert len(table) == 24 and table["plate"].nunique() == 2 and table["is_control"].sum() == 4
    assert (table["shard_nuclei"] != table["shard_golgi"]).any()  # some sites straddle two shards
    rows = pd.concat([pq.read_table(p).to_pandas() for p in sorted((rxrx3 / "data").glob("*.parquet"))])
    blobs = dict(zip(rows["__key__"], (j["bytes"] for j in rows["jp2"]), strict=True))
    got = crops_by_site(table, cfg)
    assert len(got) == 24 * 4
    for sid, address, experiment in [("gene-001_P1_A05_s1", "A05", "gene-001"),
                                     ("compound-001_P1_A12_s1", "A12", "compound-001")]:
        site = np.stack([decode_jp2(blobs[f"{experiment}/Plate1/{address}_s1_{c}"], "pillow") for c in range(1, 7)])
        assert np.array_equal(got[sid, 3], site[:, 256:, 256:]) and np.array_equal(got[sid, 0], site[:, :256, :256])


def test_jp2_decoders_agree(rxrx3):
    blob = pq.read_table(next((rxrx3 / "data").glob("*.parquet"))).column("jp2")[0]["bytes"].as_py()
    a, b = decode_jp2(blob, "pillow"), decode_jp2(blob, "imagecodecs")
    assert a.shape == (512, 512) and a.dtype == np.uint8 and np.array_equal(a, b)


def test_rxrx3_core_missing_images_are_skipped_and_counted(ray_session, rxrx3, tmp_path):
    core = tmp_path / "core"
    shutil.copytree(rxrx3, core)
    meta = pd.read_csv(core / "metadata_rxrx3_core.csv")
    extra = meta.iloc[[0]].assign(address="P24", well_id="gene-001_1_P24")  # a well the shards do not hold
    pd.concat([meta, extra]).to_csv(core / "metadata_rxrx3_core.csv", index=False)
    cfg = rxrx3_cfg(core, on_error="skip")
    rows = list(build_dataset(read_table(cfg), cfg, train=False, skip_log=str(tmp_path / "skipped")).iter_rows())
    assert len({r["sample_id"] for r in rows}) == 24
    report = skipped_report(tmp_path / "skipped")
    assert report.to_dict("records") == [{"sample_id": "gene-001_P1_P24_s1", "error":
                                          "site gene-001_P1_P24_s1 has no nuclei image in the RxRx3-core shards"}]


def test_rxrx3_core_embedding_is_the_mean_over_four_tiles(ray_session, rxrx3, tmp_path):
    """As the official RxRx3-core inference: each image cut into 4 non-overlapping tiles, `predict` on each, the
    mean of the 4."""
    from camae.classifier import base_model
    from evaluation.embed import embed_table, load_embeddings

    spec = EncoderSpec(embed_dim=32, depth=2, num_heads=2)
    cfg = rxrx3_cfg(rxrx3)
    embed_table(read_table(cfg), cfg, EmbedConfig(spec, blocks=False, use_gpu="no"), tmp_path / "emb")
    meta, X = load_embeddings(tmp_path / "emb")
    sid = "gene-001_P1_A07_s1"
    crops = crops_by_site(read_table(cfg), cfg)
    tiles = torch.from_numpy(np.stack([crops[sid, t] for t in range(4)]))
    model = base_model(spec).eval()
    expected = model.predict(tiles).mean(0).numpy()
    np.testing.assert_allclose(X[meta.index[meta["sample_id"] == sid][0]], expected, rtol=1e-5, atol=1e-6)
    assert meta.loc[meta["sample_id"] == sid, "label"].item() == pd.read_csv(
        rxrx3 / "metadata_rxrx3_core.csv").set_index("address").loc["A07"].query(
        "experiment_name == 'gene-001'")["treatment"].item()


def test_pack_rxrx3_core_then_read_packed(ray_session, rxrx3, tmp_path):
    """RxRx3-core converts like any layout: packed sites equal the decoded JPEG 2000 ones."""
    cfg = rxrx3_cfg(rxrx3, extra_columns=["gene", "concentration"])
    result = pack(cfg, str(tmp_path / "packed"), rows_per_group=8)
    assert (result.sites, result.skipped) == (24, 0)
    assert (tmp_path / "packed" / "relationships.csv").read_text() == (rxrx3 / "relationships.csv").read_text()
    pcfg = DataConfig(format="packed", root=str(tmp_path / "packed"), crop_size=256, eval_crop="tile",
                      extra_columns=["gene", "concentration"])
    table = read_table(pcfg)
    assert table["concentration"].isna().sum() == 14 and set(table["gene"].dropna()) >= {"EMPTY_control"}
    a, b = crops_by_site(read_table(cfg), cfg), crops_by_site(table, pcfg)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_pack_cli_prints_its_result(plates, tmp_path):
    import subprocess
    import sys

    data = tmp_path / "data.yaml"
    data.write_text(f"root: {plates}\ncrop_size: 64\n")
    env = {**os.environ, "RAY_ADDRESS": "local"}
    done = subprocess.run([sys.executable, "-m", "camae", "pack", "--config", str(data), "--out",
                           str(tmp_path / "out"), "--set", "channels=[er]", "--rows-per-group", "16"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout[done.stdout.index("{"):])
    assert result["sites"] == 80 and result["shards"] == 1 and result["written"] == 1
    assert read_manifest(str(tmp_path / "out"))["channels"] == ["er"]



# --- every job on packed shards ----------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.encoder.checkpoint=null", "model.encoder.embed_dim=32", "model.encoder.depth=2",
        "model.encoder.num_heads=2", "tracking.log_model=false"]


@pytest.mark.slow
def test_finetune_with_two_workers_on_packed_shards(ray_session, packed, plates, tmp_path):
    """Two Ray Train workers stream the pack; the held-out evaluation sees exactly what it sees from the images."""
    from mlflow.tracking import MlflowClient

    from camae.config import FinetuneConfig, load_config
    from camae.data import prepare_dataset
    from finetune.train import evaluate_heldout, run_finetune
    from finetune.worker import build_model

    cfg = load_config(FinetuneConfig, REPO / "configs/finetune/quickstart.yaml", [
        *TINY, "data.format=packed", f"data.root={packed}", "train.mode=lora", "train.epochs=2", "train.batch_size=8",
        "run.num_workers=2", f"run.output_dir={tmp_path}", "run.name=packed", "synth=null"])
    summary = run_finetune(cfg)
    client = MlflowClient(summary["tracking_uri"])
    assert [m.step for m in client.get_metric_history(summary["run_id"], "train/loss")] == [1, 2]
    run = client.get_run(summary["run_id"])
    assert {"camae.node.rank0", "camae.node.rank1"} <= set(run.data.tags)  # two real workers
    assert run.data.params["data.format"] == "packed" and 0 <= summary["test/accuracy"] <= 1

    images = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, format="rxrx1", root=str(plates)))
    (t_packed, labels), (t_images, _) = prepare_dataset(cfg.data), prepare_dataset(images.data)
    model, _ = build_model(cfg, len(labels))
    from_pack = evaluate_heldout(cfg, model, t_packed, labels, tmp_path)
    from_images = evaluate_heldout(images, model, t_images, labels, tmp_path)
    # the same predictions; the mean loss is summed in the order batches arrive, which Ray Data does not fix
    assert from_pack.pop("test/loss") == pytest.approx(from_images.pop("test/loss"), rel=1e-6)
    assert from_pack == from_images


@pytest.mark.slow
def test_evaluate_on_packed_shards_equals_the_images(ray_session, packed, plates, tmp_path, monkeypatch):
    """The whole evaluation job (embedding, corrections, probes, biology) gives the same figures from the pack."""
    from mlflow.tracking import MlflowClient

    from evaluation.evaluate import main

    monkeypatch.delenv("CAMAE_PARENT_RUN_ID", raising=False)
    metrics = {}
    for name, data in (("images", ["data.format=rxrx1", f"data.root={plates}"]),
                       ("packed", ["data.format=packed", f"data.root={packed}"])):
        sets = [*data, "synth=null", f"run.name={name}", f"run.output_dir={tmp_path}", "probes.kinds=[logistic]",
                "embed.encoder.checkpoint=null",
                "probes.per_block=false", "biology.null_size=200", "biology.channel_leave_one_out=false",
                "correction.methods=[raw, pca_centerscale, tvn]"]
        assert main(["--config", str(REPO / "configs/evaluate/quickstart.yaml"), *[a for s in sets
                                                                                   for a in ("--set", s)]]) == 0
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        client = MlflowClient(summary["tracking_uri"])
        runs = [client.get_run(r) for r in [summary["run_id"], *summary["probe_runs"]]]
        metrics[name] = {(r.data.tags.get("camae.correction"), k): v for r in runs for k, v in r.data.metrics.items()
                         if "per_s" not in k and "seconds" not in k}
    assert len(metrics["packed"]) > 40 and metrics["packed"] == metrics["images"]


def test_missing_jp2_decoder_is_one_line_before_any_decoding(rxrx3, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "imagecodecs" else real(name, *a))
    with pytest.raises(ConfigError, match=r"data.jp2_decoder=imagecodecs, but imagecodecs is not installed"):
        read_table(rxrx3_cfg(rxrx3, jp2_decoder="imagecodecs"))


@pytest.mark.slow
def test_evaluate_job_on_rxrx3_core_with_its_config(ray_session, tmp_path, monkeypatch):
    """configs/evaluate/rxrx3-core.yaml on the synthetic RxRx3-core layout: controls from `treatment`, batches from
    `experiment_name`, the compound-gene pairs of relationships.csv scored by the biology metrics."""
    from mlflow.tracking import MlflowClient

    from evaluation.evaluate import main

    monkeypatch.delenv("CAMAE_PARENT_RUN_ID", raising=False)
    core = tmp_path / "core"  # 2 experiments x 2 plates x 12 wells, 4 of them EMPTY_control
    generate(core, SynthConfig(**{**RX3, "size": 256, "plates_per_experiment": 2, "controls_per_plate": 4}))
    sets = [f"data.root={core}", "data.split_by=plate", "data.val_fraction=0", "data.test_fraction=0.25",
            "embed.encoder.checkpoint=null", "embed.encoder.embed_dim=32", "embed.encoder.depth=2",
            "embed.encoder.num_heads=2", "embed.batch_size=16", "correction.by=plate",
            "correction.methods=[raw, pca_centerscale]", "biology.null_size=100", f"run.output_dir={tmp_path}"]
    assert main(["--config", str(REPO / "configs/evaluate/rxrx3-core.yaml"), *[a for s in sets
                                                                               for a in ("--set", s)]]) == 0
    summary = json.loads((tmp_path / "openphenom-rxrx3-core" / "summary.json").read_text())
    assert summary["embedding"]["sites"] == 48 and summary["embedding"]["skipped"] == 0
    metrics = MlflowClient(summary["tracking_uri"]).get_run(summary["run_id"]).data.metrics
    assert {"raw/bio/map", "pca_centerscale/bio/recall_0.05_0.95"} <= set(metrics)


def test_sixteen_bit_stacks_are_packed_with_the_mapping_applied(ray_session, tmp_path):
    """A manifest of 16-bit multi-channel TIFFs: the pack holds what training would decode (the percentile mapping
    per image and channel), records the mapping, and keeps the extra columns."""
    import tifffile

    from camae.data import load_site, to_uint8

    stacks = np.random.default_rng(0).integers(0, 2**12, (4, 3, 130, 140), dtype=np.uint16)
    for i, stack in enumerate(stacks):
        tifffile.imwrite(tmp_path / f"s{i}.tiff", stack, photometric="minisblack")
    pd.DataFrame({"plate": ["P1", "P1", "P2", "P2"], "well": ["A01", "A02"] * 2, "site": 1, "label": list("xyxy"),
                  "ctrl": ["no", "yes"] * 2, "dose": [0.1, None, 1.0, None],
                  "file": [f"s{i}.tiff" for i in range(4)]}).to_csv(tmp_path / "m.csv", index=False)
    cfg = DataConfig(format="manifest", root=str(tmp_path / "m.csv"), image_column="file",
                     file_channels=["DNA", "ER", "Mito"], channels=["Mito", "DNA"], label_column="label",
                     control_column="ctrl", control_values=["yes"], batch_column=None, crop_size=128,
                     extra_columns=["dose"], percentiles=[1.0, 99.0])
    pack(cfg, str(tmp_path / "packed"))
    manifest = read_manifest(str(tmp_path / "packed"))
    assert manifest["shape"] == [2, 130, 140] and manifest["channels"] == ["Mito", "DNA"]
    assert manifest["uint16_mapping"] == {"mapping": "percentile", "percentiles": [1.0, 99.0], "source_bits": 16,
                                          "applied_to": "integer images wider than uint8"}
    pcfg = DataConfig(format="packed", root=str(tmp_path / "packed"), channels=["DNA"], crop_size=128,
                      extra_columns=["dose"])
    table = read_table(pcfg).sort_values("sample_id").reset_index(drop=True)
    assert table["dose"].tolist()[::2] == [0.1, 1.0] and table["dose"].isna().tolist() == [False, True] * 2
    from camae.shards import packed_sites

    got = packed_sites({c: table[c].to_numpy() for c in table.columns}, pcfg)
    source = read_table(cfg).sort_values("sample_id").reset_index(drop=True)
    for i in range(4):
        assert np.array_equal(got[i][0], load_site(source.iloc[i].to_dict(), cfg)[1])
        assert np.array_equal(got[i][0], to_uint8(stacks[int(source["path"][i][-6])][0], cfg))
