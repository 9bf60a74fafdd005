"""Microscopy plates into a dataset table, and the table into a stream of decoded images (Ray Data or torch).

The table has one row per imaged site and these columns (`read_table`):
    sample_id  plate  batch  well  site  label  is_control  path_<channel> ...  [extra columns]
`plate` and `batch` are strings; `path_<channel>` holds each chosen channel's image file, in config order.
Splits are by group (plate by default), never by image (`assign_splits`); the label map is fixed once and saved
(`LabelMap`). `decode_batch` turns table rows into uint8 [C, H, W] crops; `build_dataset` runs it as a
streaming Ray Data pipeline; `BlockDataset` is the same for a torch DataLoader. Sites in Parquet shards (packed,
RxRx3-core) are read by camae.shards.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from camae.config import ConfigError, DataConfig

RXRX1_CHANNELS = {"nuclei": 1, "er": 2, "actin": 3, "rna": 4, "mito": 5, "golgi": 6}
META_COLUMNS = ["sample_id", "plate", "batch", "well", "site", "label", "is_control"]
SHARD_FORMATS = ("packed", "rxrx3_core")  # sites in Parquet shards, read by row group (camae.shards)
TRAIN_MIX = 4  # packed training: row groups (of random plates) per decode task
TRAIN_COLUMNS = ["image", "label_index"]  # what a training loop needs; all numeric, so iter_torch_batches works


class DataError(ValueError):
    """Bad input data; the message names the file or row and the fix."""


# ----------------------------------------------------------------------------------------------------------------
# The dataset table


def read_table(cfg: DataConfig) -> pd.DataFrame:
    """The dataset table for cfg.format, checked: every chosen channel present, labels and keys not missing."""
    from camae.shards import read_packed_table

    reader = {"rxrx1": _read_rxrx1, "jump": _read_jump, "manifest": _read_manifest, "packed": read_packed_table,
              "rxrx3_core": _read_rxrx3_core}[cfg.format]
    table = reader(cfg)
    for col in ("label", "plate", "well", "site"):
        missing = table[col].isna()
        if missing.any():
            row = table[missing].iloc[0]
            raise DataError(f"{missing.sum()} rows have no {col} (first: row {row.name}, sample "
                            f"{row.get('sample_id')}); fill it in or drop those rows from the table")
    table["plate"] = table["plate"].astype(str)
    table["batch"] = table["batch"].astype(str)
    table["well"] = table["well"].astype(str)
    table["site"] = table["site"].astype(int)
    table["label"] = table["label"].astype(str)
    table["sample_id"] = table["plate"] + "_" + table["well"] + "_s" + table["site"].astype(str)
    duplicated = table["sample_id"].duplicated()
    if duplicated.any():
        raise DataError(f"site {table['sample_id'][duplicated].iloc[0]} appears twice in the table; each row must "
                        "be one imaged site (plate, well, site)")
    for col in cfg.extra_columns:  # text with gaps (NaN among strings) as None: Arrow stores it as text, not pickles
        if pd.api.types.is_string_dtype(table[col]) or table[col].dtype == object:
            table[col] = pd.Series([None if pd.isna(v) else v for v in table[col]], index=table.index, dtype=object)
    return table[META_COLUMNS + where_columns(cfg) + list(cfg.extra_columns)].reset_index(drop=True)


def location_columns(columns) -> list[str]:
    """The columns of a dataset table that say where images are (not metadata), in any layout."""
    return [c for c in columns if c in ("path", "shard", "row", "row_group") or c.startswith(("path_", "shard_",
                                                                                                  "row_"))]


def where_columns(cfg: DataConfig) -> list[str]:
    """The table columns that say where a site's images are, for cfg.format."""
    if cfg.format == "packed":
        return ["shard", "row", "row_group"]
    if cfg.format == "rxrx3_core":
        return [f"{kind}_{c}" for c in cfg.channels for kind in ("shard", "row")]
    return ["path"] if cfg.image_column else [f"path_{c}" for c in cfg.channels]


def _read_any(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"dataset table {path} does not exist")
    return pd.read_parquet(path) if path.suffix in (".parquet", ".pq") else pd.read_csv(path)


def _require_columns(df: pd.DataFrame, columns, where: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(f"{where} lacks columns {missing}; it has {list(df.columns)[:20]} (set the *_column keys "
                        "of the data config to the names your table uses)")


def _common(df: pd.DataFrame, cfg: DataConfig, plate: str, well: str, site: str, where: str) -> pd.DataFrame:
    batch = [cfg.batch_column] if cfg.batch_column else []
    _require_columns(df, [plate, well, site, cfg.label_column, cfg.control_column, *batch, *cfg.extra_columns],
                     where)
    out = pd.DataFrame({"plate": df[plate], "well": df[well], "site": df[site], "label": df[cfg.label_column],
                        "is_control": df[cfg.control_column].astype(str).isin(cfg.control_values)})
    out["batch"] = df[cfg.batch_column] if cfg.batch_column else df[plate]
    for col in cfg.extra_columns:
        out[col] = df[col]
    return out


def _read_rxrx1(cfg: DataConfig) -> pd.DataFrame:
    root = Path(cfg.root)
    df = _read_any(root / "metadata.csv")
    unknown = [c for c in cfg.channels if c not in RXRX1_CHANNELS]
    if unknown:
        raise ConfigError(f"data.channels has {unknown}, not RxRx1 channels; choose from {list(RXRX1_CHANNELS)}")
    _require_columns(df, ["experiment", "plate", "well", "site"], str(root / "metadata.csv"))
    out = _common(df, cfg, "plate", "well", "site", str(root / "metadata.csv"))
    out["plate"] = df["experiment"].astype(str) + "_P" + df["plate"].astype(str)  # plate numbers repeat
    folder = root / "images" / df["experiment"].astype(str) / ("Plate" + df["plate"].astype(str))
    for name in cfg.channels:
        out[f"path_{name}"] = [str(f / f"{w}_s{s}_w{RXRX1_CHANNELS[name]}.png")
                               for f, w, s in zip(folder, df["well"], df["site"], strict=True)]
    return out


def _read_jump(cfg: DataConfig) -> pd.DataFrame:
    table = Path(cfg.root)
    df = _read_any(table)
    cols = [f"{kind}_Orig{c}" for c in cfg.channels for kind in ("FileName", "PathName")]
    _require_columns(df, cols, str(table))
    out = _common(df, cfg, cfg.plate_column, cfg.well_column, cfg.site_column, str(table))
    for name in cfg.channels:
        out[f"path_{name}"] = [str(_resolve(table.parent, Path(str(p)) / str(f)))
                               for p, f in zip(df[f"PathName_Orig{name}"], df[f"FileName_Orig{name}"], strict=True)]
    return out


def _read_manifest(cfg: DataConfig) -> pd.DataFrame:
    table = Path(cfg.root)
    df = _read_any(table)
    if cfg.image_column:
        unknown = [c for c in cfg.channels if c not in cfg.file_channels]
        if unknown:
            raise ConfigError(f"data.channels has {unknown}, not in data.file_channels {cfg.file_channels} (the "
                              "planes of each multi-channel file, in order)")
        _require_columns(df, [cfg.image_column], str(table))
        out = _common(df, cfg, cfg.plate_column, cfg.well_column, cfg.site_column, str(table))
        out["path"] = [str(_resolve(table.parent, Path(str(p)))) for p in df[cfg.image_column]]
        return out
    missing = [c for c in cfg.channels if c not in cfg.channel_columns]
    if missing:
        raise ConfigError(f"data.channel_columns names no column for channels {missing}")
    _require_columns(df, [cfg.channel_columns[c] for c in cfg.channels], str(table))
    out = _common(df, cfg, cfg.plate_column, cfg.well_column, cfg.site_column, str(table))
    for name in cfg.channels:
        out[f"path_{name}"] = [str(_resolve(table.parent, Path(str(p)))) for p in df[cfg.channel_columns[name]]]
    return out


def _read_rxrx3_core(cfg: DataConfig) -> pd.DataFrame:
    """metadata_rxrx3_core.csv (one site per well) joined to where each channel image is in the shards: `shard_<c>`
    and `row_<c>` per channel ("" and -1 where the shards lack it: that site fails to decode, per on_error)."""
    from camae import storage
    from camae.shards import rxrx3_key_index

    unknown = [c for c in cfg.channels if c not in RXRX1_CHANNELS]
    if unknown:
        raise ConfigError(f"data.channels has {unknown}, not RxRx3-core channels; choose from {list(RXRX1_CHANNELS)}")
    if cfg.jp2_decoder == "imagecodecs":
        import importlib.util

        if importlib.util.find_spec("imagecodecs") is None:
            raise ConfigError("data.jp2_decoder=imagecodecs, but imagecodecs is not installed on this node; "
                              "`pip install imagecodecs` on every node, or set data.jp2_decoder=pillow")
    where = storage.join(cfg.root, "metadata_rxrx3_core.csv")
    if not storage.exists(where):
        raise DataError(f"{where} does not exist; point data.root at the RxRx3-core directory (downloaded by you, "
                        "or written by `camae synth --set layout=rxrx3_core`)")
    df = pd.read_csv(io.StringIO(storage.read_text(where)))
    if cfg.site_column not in df.columns:
        df[cfg.site_column] = 1  # RxRx3-core images one site per well
    _require_columns(df, ["experiment_name", "plate", "address"], where)
    out = _common(df, cfg, cfg.plate_column, cfg.well_column, cfg.site_column, where)
    out["plate"] = df["experiment_name"].astype(str) + "_P" + df["plate"].astype(str)
    index = rxrx3_key_index(cfg.root)
    stem = df["experiment_name"].astype(str) + "/Plate" + df["plate"].astype(str) + "/" + df["address"].astype(str)
    for name in cfg.channels:
        found = index.reindex(stem + f"_s1_{RXRX1_CHANNELS[name]}")
        out[f"shard_{name}"] = found["shard"].fillna("").to_numpy()
        out[f"row_{name}"] = found["row"].fillna(-1).astype(np.int64).to_numpy()
    return out


def _resolve(base: Path, path: Path) -> Path:
    return path if path.is_absolute() else base / path


# ----------------------------------------------------------------------------------------------------------------
# Splits and labels


def assign_splits(table: pd.DataFrame, cfg: DataConfig) -> pd.Series:
    """'train' / 'val' / 'test' per row, by group (cfg.split_by): a group never straddles two splits."""
    if cfg.split_by not in table.columns:
        raise ConfigError(f"data.split_by={cfg.split_by!r} is not a table column; columns: {list(table.columns)}")
    groups = sorted(table[cfg.split_by].astype(str).unique())
    for name, given in (("val_groups", cfg.val_groups), ("test_groups", cfg.test_groups)):
        unknown = sorted(set(given) - set(groups))
        if unknown:
            raise ConfigError(f"data.{name} names {unknown}, which are not {cfg.split_by} values: {groups}")
    if set(cfg.val_groups) & set(cfg.test_groups):
        raise ConfigError(f"data.val_groups and data.test_groups share {set(cfg.val_groups) & set(cfg.test_groups)}")
    rest = [g for g in groups if g not in cfg.val_groups and g not in cfg.test_groups]
    np.random.default_rng(cfg.seed).shuffle(rest)
    n_test = 0 if cfg.test_groups else round(cfg.test_fraction * len(groups))
    n_val = 0 if cfg.val_groups else round(cfg.val_fraction * len(groups))
    test = set(cfg.test_groups) | set(rest[:n_test])
    val = set(cfg.val_groups) | set(rest[n_test:n_test + n_val])
    if len(test) + len(val) >= len(groups):
        raise ConfigError(f"the split leaves no training {cfg.split_by}: {len(groups)} groups, {len(val)} val, "
                          f"{len(test)} test; lower data.val_fraction / data.test_fraction or add plates")
    key = table[cfg.split_by].astype(str)
    return pd.Series(np.where(key.isin(test), "test", np.where(key.isin(val), "val", "train")), index=table.index)


@dataclass(frozen=True)
class LabelMap:
    """Label name <-> class index, fixed once (sorted names) and saved with every run."""

    names: tuple[str, ...]

    @classmethod
    def from_labels(cls, labels) -> LabelMap:
        return cls(tuple(sorted(set(map(str, labels)))))

    def encode(self, labels) -> np.ndarray:
        index = {n: i for i, n in enumerate(self.names)}
        unknown = sorted({str(label) for label in labels} - index.keys())
        if unknown:
            raise DataError(f"labels {unknown[:5]} are not in the run's label map ({len(self.names)} classes: "
                            f"{list(self.names)[:5]}...); evaluate with data labelled like the training data")
        return np.array([index[str(label)] for label in labels], dtype=np.int64)

    def save(self, path: str | Path) -> Path:
        Path(path).write_text(json.dumps({"names": list(self.names)}, indent=2) + "\n")
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> LabelMap:
        return cls(tuple(json.loads(Path(path).read_text())["names"]))

    def __len__(self) -> int:
        return len(self.names)


# ----------------------------------------------------------------------------------------------------------------
# Decoding


def to_uint8(img: np.ndarray, cfg: DataConfig) -> np.ndarray:
    """Map a 16-bit (or other integer) image to uint8 per cfg.uint16_mapping; uint8 passes through."""
    if img.dtype == np.uint8:
        return img
    if cfg.uint16_mapping == "shift":
        return np.clip(img.astype(np.int64) >> max(cfg.source_bits - 8, 0), 0, 255).astype(np.uint8)
    if cfg.uint16_mapping == "percentile":
        lo, hi = np.percentile(img, cfg.percentiles)
    else:
        lo, hi = float(img.min()), float(img.max())
    if hi <= lo:
        return np.zeros(img.shape, dtype=np.uint8)
    return np.rint(np.clip((img.astype(np.float32) - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def read_image(path: str, planes: int | None = None) -> np.ndarray:
    """One 2-D image (PNG, TIFF, ...), or with `planes` a multi-channel stack as [planes, H, W]; integer pixels;
    errors name the file."""
    if not os.path.isfile(path):
        raise DataError(f"image {path} does not exist")
    try:
        if path.lower().endswith((".tif", ".tiff")):
            import tifffile

            img = tifffile.imread(path)
        else:
            from PIL import Image

            with Image.open(path) as im:
                img = np.asarray(im)
    except Exception as err:  # noqa: BLE001 - any decoder failure is a corrupt file to the user
        raise DataError(f"image {path} cannot be decoded ({type(err).__name__}: {err}); the file is corrupt or "
                        "not an image") from err
    if planes is not None and img.ndim == 3 and img.shape[-1] == planes and img.shape[0] != planes:
        img = np.moveaxis(img, -1, 0)  # [H, W, C] -> [C, H, W]
    expected = (planes,) if planes is not None else ()
    if img.shape[:len(expected)] != expected or img.ndim != 2 + len(expected) or not np.issubdtype(img.dtype,
                                                                                                   np.integer):
        what = f"a stack of {planes} planes" if planes is not None else "one 2-D grayscale channel"
        raise DataError(f"image {path} has shape {img.shape} and dtype {img.dtype}; expected {what} of uint8 or "
                        "uint16 pixels per file")
    return img


def load_site(row: dict, cfg: DataConfig) -> np.ndarray:
    """uint8 [C, H, W] for one table row; all channels must have the same size."""
    if cfg.image_column:
        stack = read_image(row["path"], planes=len(cfg.file_channels))
        planes = [to_uint8(stack[cfg.file_channels.index(c)], cfg) for c in cfg.channels]
    else:
        planes = [to_uint8(read_image(row[f"path_{c}"]), cfg) for c in cfg.channels]
    shapes = {p.shape for p in planes}
    if len(shapes) > 1:
        raise DataError(f"site {row['sample_id']} has channels of different sizes {sorted(shapes)}")
    if min(planes[0].shape) < cfg.crop_size:
        raise DataError(f"site {row['sample_id']} is {planes[0].shape} pixels, smaller than data.crop_size="
                        f"{cfg.crop_size}")
    return np.stack(planes)


def load_or_skip(row: dict, cfg: DataConfig, skipped: list[dict]) -> np.ndarray | None:
    """load_site, or under on_error=skip None with the reason appended to `skipped`."""
    try:
        return load_site(row, cfg)
    except DataError as err:
        return skip_site(row["sample_id"], err, cfg, skipped)


def skip_site(sample_id, err: DataError, cfg: DataConfig, skipped: list[dict]) -> None:
    """A site that cannot be used: raise (on_error=raise), or record why and return None (on_error=skip)."""
    if cfg.on_error == "raise":
        raise err
    skipped.append({"sample_id": str(sample_id), "error": str(err)})
    return None


def batch_sites(batch: dict[str, np.ndarray], cfg: DataConfig, skipped: list[dict]) -> list[np.ndarray | None]:
    """uint8 [C, H, W] per table row of the batch (None: skipped, the reason appended to `skipped`)."""
    from camae.shards import packed_sites, rxrx3_sites

    if cfg.format == "packed":
        return packed_sites(batch, cfg)
    if cfg.format == "rxrx3_core":
        got = rxrx3_sites(batch, cfg)
        return [skip_site(sid, g, cfg, skipped) if isinstance(g, DataError) else g
                for sid, g in zip(batch["sample_id"], got, strict=True)]
    return [load_or_skip({k: v[i] for k, v in batch.items()}, cfg, skipped) for i in range(len(batch["sample_id"]))]


def crops(image: np.ndarray, cfg: DataConfig, train: bool, rng: np.random.Generator) -> list[np.ndarray]:
    """The crops of one site: a random one (train), the centre one, or all non-overlapping tiles."""
    _, H, W = image.shape
    s = cfg.crop_size
    if train:
        y, x = rng.integers(0, H - s + 1), rng.integers(0, W - s + 1)
        return [image[:, y:y + s, x:x + s]]
    if cfg.eval_crop == "center":
        y, x = (H - s) // 2, (W - s) // 2
        return [image[:, y:y + s, x:x + s]]
    return [image[:, y:y + s, x:x + s] for y in range(0, H - s + 1, s) for x in range(0, W - s + 1, s)]


def drop_channels(image: np.ndarray, p: float, rng: np.random.Generator) -> np.ndarray:
    """Zero each channel with probability p, always keeping at least one."""
    if p <= 0:
        return image
    drop = rng.random(image.shape[0]) < p
    if drop.all():
        drop[rng.integers(image.shape[0])] = False
    image = image.copy()
    image[drop] = 0
    return image


def decode_batch(batch: dict[str, np.ndarray], cfg: DataConfig, train: bool, label_map: LabelMap | None = None,
                 skip_log: str | None = None, columns: list[str] | None = None) -> dict[str, np.ndarray]:
    """Table rows (columnar) -> image crops: {"image": uint8 [N, C, s, s], "tile": int64 [N], "n_tiles": int64 [N]
    (crops of that site), "label_index": int64 [N] (with a label map), metadata columns}, only `columns` if given.
    Bad sites raise, or with on_error=skip are dropped and logged to skip_log."""
    rng = np.random.default_rng()
    n = len(batch["sample_id"])
    images, keep, tiles, skipped = [], [], [], []
    for i, site in enumerate(batch_sites(batch, cfg, skipped)):
        if site is None:
            continue
        for t, crop in enumerate(crops(site, cfg, train, rng)):
            images.append(drop_channels(crop, cfg.channel_dropout, rng) if train else crop)
            keep.append(i)
            tiles.append(t)
    if skipped:
        log_skipped(skipped, skip_log)
    out = {k: v[keep] for k, v in batch.items() if k in META_COLUMNS or k in cfg.extra_columns}
    shape = (0, len(cfg.channels), cfg.crop_size, cfg.crop_size)
    out["image"] = np.stack(images) if images else np.zeros(shape, dtype=np.uint8)
    out["tile"] = np.array(tiles, dtype=np.int64)
    out["n_tiles"] = np.bincount(keep, minlength=n)[keep].astype(np.int64) if keep else np.zeros(0, np.int64)
    if label_map is not None:
        out["label_index"] = label_map.encode(out["label"])
    return out if columns is None else {k: out[k] for k in columns}


def log_skipped(records: list[dict], skip_log: str | None) -> None:
    """Decode tasks run on any node: the log is a directory or URI every node writes to (camae.storage)."""
    from camae import storage

    if skip_log is None:
        raise DataError(f"{len(records)} sites were skipped but no skip log is set; first: {records[0]}")
    storage.write_text(storage.join(skip_log, f"skipped-{uuid.uuid4().hex}.jsonl"),
                       "".join(json.dumps(r) + "\n" for r in records))


def skipped_report(skip_log: str | Path) -> pd.DataFrame:
    """Every site skipped under on_error=skip, with the reason (from the logs decode tasks wrote, on any node)."""
    from camae import storage

    files = [f for f in storage.listdir(skip_log) if f.startswith("skipped-") and f.endswith(".jsonl")]
    rows = [json.loads(line) for f in files for line in storage.read_text(storage.join(skip_log, f)).splitlines()
            if line]
    return pd.DataFrame(rows, columns=["sample_id", "error"])


# ----------------------------------------------------------------------------------------------------------------
# Streams: Ray Data and torch


def blocks(table: pd.DataFrame, cfg: DataConfig, train: bool, n_blocks: int | None = None) -> list[pd.DataFrame]:
    """The table cut into decode tasks' inputs.
    - Image files: `n_blocks` (default: decode_batch_size sites each) contiguous parts, sites shuffled first for
      training.
    - Packed: one row group per block (training: TRAIN_MIX random row groups), so a task reads exactly the rows it
      decodes.
    - RxRx3-core: decode_batch_size sites in shard order, so a task reads few row groups.
    Training randomizes the block order (the consumer's local shuffle buffer mixes sites across blocks)."""
    if cfg.format == "packed":
        table = table.sort_values(["shard", "row"])
        groups = [g.reset_index(drop=True) for _, g in table.groupby(["shard", "row_group"], sort=True)]
        if not train:
            return groups
        # A row group holds neighbouring wells of one plate: a training block joins TRAIN_MIX random ones (each still
        # read whole), so every block, and the shuffle buffer after it, mixes plates and perturbations
        order = np.random.default_rng(cfg.seed).permutation(len(groups))
        return [pd.concat([groups[k] for k in order[i:i + TRAIN_MIX]], ignore_index=True)
                for i in range(0, len(order), TRAIN_MIX)]
    if cfg.format == "rxrx3_core":
        first = cfg.channels[0]
        table = table.sort_values([f"shard_{first}", f"row_{first}"])
    elif train:
        table = table.sample(frac=1.0, random_state=cfg.seed)
    n = n_blocks or max(1, min(len(table), -(-len(table) // cfg.decode_batch_size)))
    size = -(-len(table) // n)  # contiguous blocks: a consumer writing per-file outputs sees files complete
    return [table.iloc[i:i + size].reset_index(drop=True) for i in range(0, len(table), size)]


def build_dataset(table: pd.DataFrame, cfg: DataConfig, train: bool, label_map: LabelMap | None = None,
                  skip_log: str | None = None, columns: list[str] | None = None, n_blocks: int | None = None):
    """A streaming `ray.data.Dataset` of decoded crops. Only the table (where the images are, and metadata) is in
    memory; images are decoded in parallel tasks as the consumer pulls batches, so memory does not grow with the
    dataset. With columns=TRAIN_COLUMNS it feeds `iter_torch_batches` (or `get_dataset_shard` in Ray Train
    workers); with all columns (None), `iter_batches` / `map_batches` see the metadata too."""
    import functools

    import ray

    parts = blocks(table, cfg, train, n_blocks)
    ds = ray.data.from_pandas(parts)
    if train:
        ds = ds.randomize_block_order(seed=cfg.seed)
    decode = functools.partial(decode_batch, cfg=cfg, train=train, label_map=label_map, skip_log=skip_log,
                               columns=columns)
    # Shard layouts: one block is one task's reads, kept whole (batch_size=None); image files: decode_batch_size
    batch = None if cfg.format in SHARD_FORMATS else cfg.decode_batch_size
    ds = ds.map_batches(decode, batch_size=batch, batch_format="numpy")
    # Ray Data reserves resources per operator; on small clusters (measured on 2 CPUs) that leaves this one-stage
    # pipeline decoding one batch at a time, half the DataLoader's speed. Without it, decoding uses every CPU.
    ds.context.op_resource_reservation_enabled = False
    return ds


class BlockDataset(torch.utils.data.IterableDataset):
    """The same blocks and decoding as `build_dataset`, for a torch DataLoader (an IterableDataset: each loader
    worker decodes every num_workers-th block and yields its crops one by one)."""

    def __init__(self, table: pd.DataFrame, cfg: DataConfig, train: bool, label_map: LabelMap | None = None,
                 columns: list[str] | None = None):
        self.parts = blocks(table, cfg, train)
        self.cfg, self.train, self.label_map, self.columns = cfg, train, label_map, columns
        self.passes = 0  # in-process passes (no loader workers)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        order = np.arange(len(self.parts))
        if self.train:  # a new block order per pass, the same in every loader worker: the loader's base seed
            pass_seed = info.seed - info.id if info else self.passes
            self.passes += 1
            order = np.random.default_rng([self.cfg.seed, pass_seed]).permutation(order)
        for b in order[worker::workers]:
            part = self.parts[b]
            batch = decode_batch({c: part[c].to_numpy() for c in part.columns}, self.cfg, self.train,
                                 self.label_map, columns=self.columns)
            n = len(next(iter(batch.values())))
            yield from ({k: v[i] for k, v in batch.items()} for i in range(n))


def prepare_dataset(cfg: DataConfig, synth=None, run_dir: str | Path | None = None):
    """What every job starts with: the synthetic plates written first if `synth` (a SynthConfig) is given and
    data.root holds none yet; the table with its split column; the label map. With run_dir, the label map and
    the split table are saved there (labels.json, splits.csv)."""
    from camae.synth import ensure_dataset

    if synth is not None and cfg.format == synth.layout and ensure_dataset(cfg.root, synth):
        import logging

        logging.getLogger("camae.data").info("wrote synthetic plates to %s (the config's synth section)", cfg.root)
    table = read_table(cfg)
    table["split"] = assign_splits(table, cfg)
    labels = LabelMap.from_labels(table["label"])
    if run_dir is not None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        labels.save(Path(run_dir) / "labels.json")
        table[["sample_id", "plate", "batch", "label", "is_control", "split"]].to_csv(Path(run_dir) / "splits.csv",
                                                                                     index=False)
    return table, labels
