"""Embed whole plates with a frozen encoder, streamed: Ray Data decodes sites in parallel tasks and an actor pool
runs the model (a GPU per actor when the cluster has them); the driver averages each site's crops and writes
Parquet files of `embed.sites_per_file` sites as they complete.

    camae embed --config configs/evaluate/quickstart.yaml [--set embed.encoder.checkpoint=DIR ...]

Output directory (a local path, or a URI such as s3://bucket/embeddings: camae.storage):
    embed.json           what was embedded (encoder, channels, crops); a rerun with other settings is refused
    part-00000.parquet   metadata columns + `embedding` (float32 [D]) [+ `embedding_channelwise` [C*D]]
    ...                  [+ `embedding_blocks` [depth*D]]; a rerun skips finished files (resumable per file)
    skipped/             sites skipped under data.on_error=skip, with the reason
Memory is bounded: images never reach the driver, which holds only the embeddings of files not yet complete.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from camae import storage
from camae.config import DataConfig, EmbedConfig
from camae.data import location_columns

log = logging.getLogger("camae.embed")

EMBED_COLUMNS = ("embedding", "embedding_channelwise", "embedding_blocks")


# ----------------------------------------------------------------------------------------------------------------
# The model replica (one per actor)


class Embedder:
    """A Ray Data actor: crops {"image": uint8 [N, C, s, s], "sample_id", "tile", "n_tiles"} -> their embeddings."""

    def __init__(self, cfg: EmbedConfig, use_gpu: bool, threads: int):
        from camae.classifier import base_model

        if threads > 0 and not use_gpu:
            torch.set_num_threads(threads)
        self.cfg = cfg
        self.device = torch.device("cuda" if use_gpu else "cpu")
        model = base_model(cfg.encoder)  # random weights (smoke runs) are drawn with encoder.seed: the same everywhere
        model.decoder = torch.nn.Identity()  # only the encoder runs here: free the decoder (155M values at ViT-S)
        self.model = model.to(self.device).eval()
        self.bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and use_gpu)

        import ray

        self.node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {k: batch[k] for k in ("sample_id", "tile", "n_tiles")}
        out["node"] = np.full(len(batch["sample_id"]), self.node)  # where it ran (not written to the files)
        x = torch.from_numpy(batch["image"])
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            blocks = self.model.forward_intermediates(x) if self.cfg.blocks else [self.model.forward_features(x)]
        out["embedding"] = self.model.forward_head(blocks[-1], pool="avg").float().cpu().numpy()
        if self.cfg.channelwise:
            out["embedding_channelwise"] = self.model.forward_head(blocks[-1], pool="channelwise").float().cpu().numpy()
        if self.cfg.blocks:  # [N, depth * D], block-major
            out["embedding_blocks"] = torch.cat([self.model.forward_head(b, pool="avg") for b in blocks], 1
                                                ).float().cpu().numpy()
        return out


# ----------------------------------------------------------------------------------------------------------------
# The driver


@dataclass
class EmbedResult:
    """What an embedding pass did."""

    output: str
    files: int
    files_written: int
    sites: int
    skipped: int
    seconds: float
    crops_per_s: float
    nodes: int = 0
    """Ray nodes whose actors embedded crops in this pass."""


def fingerprint(cfg: EmbedConfig, data: DataConfig, channels: list[str]) -> dict:
    """The settings an embedding depends on (camae.identity); a resumed pass must match them exactly."""
    from camae.identity import data_identity, encoder_identity

    return {"encoder": encoder_identity(cfg.encoder), "data": data_identity(data, channels),
            "channelwise": cfg.channelwise, "blocks": cfg.blocks, "sites_per_file": cfg.sites_per_file}


def plan_files(table: pd.DataFrame, sites_per_file: int) -> pd.DataFrame:
    """Sites in (plate, well, site) order with the output file each lands in."""
    table = table.sort_values(["plate", "well", "site"]).reset_index(drop=True)
    table["file"] = [f"part-{i // sites_per_file:05d}.parquet" for i in range(len(table))]
    return table


def embed_table(table: pd.DataFrame, data: DataConfig, cfg: EmbedConfig, out: str | Path,
                channels: list[str] | None = None) -> EmbedResult:
    """Embed every site of `table` (read_table's columns) into Parquet files under `out` (a path or URI),
    skipping files a previous pass finished. `channels` picks a subset of data.channels (channel leave-one-out)."""
    import ray

    from camae.data import build_dataset, skipped_report

    out = storage.resolve(out)
    channels = list(channels or data.channels)
    unknown = [c for c in channels if c not in data.channels]
    if unknown:
        raise ValueError(f"channels {unknown} are not among data.channels {data.channels}")
    data = DataConfig(**{**asdict(data), "channels": channels})
    stamp = fingerprint(cfg, data, channels)
    _check_or_write_stamp(out, stamp)
    plan = plan_files(table, cfg.sites_per_file)
    done = set(plan["file"].unique()) & set(storage.listdir(out))
    todo = plan[~plan["file"].isin(done)]
    start = time.perf_counter()
    if done:
        log.info("%s: %d of %d files already written; embedding the other %d", out, len(done),
                 plan["file"].nunique(), todo["file"].nunique())
    crops, nodes = 0, set()
    if len(todo):
        use_gpu = _use_gpu(cfg)
        actors = cfg.actors or (max(1, int(ray.cluster_resources().get("GPU", 0))) if use_gpu else 1)
        threads = cfg.threads or max(1, (os.cpu_count() or 1) // actors)
        if data.image_column is None:
            todo = todo.drop(columns=[c for c in todo.columns if c.startswith("path_") and
                                      c.removeprefix("path_") not in channels])
        ds = build_dataset(todo.drop(columns="file"), data, train=False, skip_log=storage.join(out, "skipped"))
        ds = ds.map_batches(Embedder, fn_constructor_kwargs={"cfg": cfg, "use_gpu": use_gpu, "threads": threads},
                            batch_size=cfg.batch_size, batch_format="numpy",
                            compute=ray.data.ActorPoolStrategy(size=actors),
                            num_gpus=1 if use_gpu else 0, num_cpus=0 if use_gpu else 1)
        crops = _write_as_completed(ds.iter_batches(batch_size=None, batch_format="numpy"), todo, out, nodes)
    skipped = len(skipped_report(storage.join(out, "skipped")))
    seconds = time.perf_counter() - start
    return EmbedResult(out, plan["file"].nunique(), todo["file"].nunique(), len(plan), skipped,
                       round(seconds, 2), round(crops / seconds, 2) if crops else 0.0, len(nodes))


def _use_gpu(cfg: EmbedConfig) -> bool:
    import ray

    has = ray.cluster_resources().get("GPU", 0) > 0
    if cfg.use_gpu == "yes" and not has:
        raise ValueError("embed.use_gpu=yes but the Ray cluster has no GPU; set embed.use_gpu=auto or no")
    return cfg.use_gpu == "yes" or (cfg.use_gpu == "auto" and has)


def _check_or_write_stamp(out: str, stamp: dict) -> None:
    path = storage.join(out, "embed.json")
    if storage.exists(path):
        old = json.loads(storage.read_text(path))
        if old != stamp:
            from camae.config import dotted_items

            was, now = dotted_items(old), dotted_items(stamp)
            diff = sorted(k for k in set(was) | set(now) if was.get(k) != now.get(k))
            raise ValueError(f"{out} holds embeddings made with other settings ({', '.join(diff)} differ); "
                             "delete it or set embed.output to a new directory")
        return
    storage.write_text(path, json.dumps(stamp, indent=2) + "\n")


def _write_as_completed(batches, plan: pd.DataFrame, out: str, nodes: set) -> int:
    """Collect crop embeddings per site; write each file once all its sites are in (the rest at the end: files
    with skipped sites). Returns the number of crops seen; adds the nodes that embedded them to `nodes`."""
    file_of = dict(zip(plan["sample_id"], plan["file"], strict=True))
    waiting = plan.groupby("file")["sample_id"].apply(set).to_dict()  # file -> sites not yet complete
    crops: dict[str, list] = {}  # sample_id -> [(tile, {column: vector})]
    seen = 0
    for batch in batches:
        columns = [c for c in EMBED_COLUMNS if c in batch]
        nodes.update(np.unique(batch["node"]).tolist())
        for i, sid in enumerate(batch["sample_id"]):
            crops.setdefault(sid, []).append({c: batch[c][i] for c in columns})
            if len(crops[sid]) == batch["n_tiles"][i]:
                waiting[file_of[sid]].discard(sid)
        seen += len(batch["sample_id"])
        for name in [f for f, left in waiting.items() if not left]:
            _write_file(plan[plan["file"] == name], crops, storage.join(out, name))
            del waiting[name]
    for name in list(waiting):  # sites skipped by decoding never arrive
        _write_file(plan[plan["file"] == name], crops, storage.join(out, name))
    return seen


def _write_file(rows: pd.DataFrame, crops: dict, path: str) -> None:
    """One Parquet file: metadata + the mean over each site's crops; locally written to a temp name, then renamed;
    to an object store in one upload (readers never see half a file either way)."""
    rows = rows[rows["sample_id"].isin(crops.keys())]
    meta = rows.drop(columns=["file", *location_columns(rows.columns)]).reset_index(drop=True)
    table = pa.Table.from_pandas(meta, preserve_index=False)
    for column in crops[rows["sample_id"].iloc[0]][0] if len(rows) else []:
        values = np.stack([np.mean([c[column] for c in crops[s]], axis=0) for s in rows["sample_id"]])
        table = table.append_column(column, pa.FixedSizeListArray.from_arrays(
            pa.array(values.astype(np.float32).ravel()), values.shape[1]))
    for s in rows["sample_id"]:
        del crops[s]
    if storage.is_uri(path):
        fs, inner = storage.filesystem(path)
        pq.write_table(table, inner, filesystem=fs)
    else:
        tmp = Path(path).with_suffix(".tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    log.info("wrote %s (%d sites)", path, len(rows))


def load_embeddings(path: str | Path, column: str = "embedding") -> tuple[pd.DataFrame, np.ndarray]:
    """All files of an embedding directory: (metadata, float32 [sites, dim] of `column`)."""
    meta, arrays = load_embedding_columns(path)
    if column not in arrays:
        raise KeyError(f"{path} has no column {column!r} (it has {sorted(arrays)}); embed with the matching "
                       "embed.channelwise / embed.blocks setting")
    return meta, arrays[column]


def load_embedding_columns(path: str | Path) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """All files of an embedding directory, read once: (metadata, {column: float32 [sites, dim]} for every
    embedding column present)."""
    files = [f for f in storage.listdir(path) if f.startswith("part-") and f.endswith(".parquet")]
    if not files:
        raise FileNotFoundError(f"{path} holds no part-*.parquet files; run `camae embed` first")
    fs, inner = storage.filesystem(path)
    tables = (pq.read_table(posixpath.join(inner, f), filesystem=fs) for f in files)
    tables = [t for t in tables if t.num_rows]  # a file whose sites were all skipped is empty
    if not tables:
        raise FileNotFoundError(f"{path} holds no embedded sites: every site was skipped (see {path}/skipped)")
    table = pa.concat_tables(tables)
    present = [c for c in EMBED_COLUMNS if c in table.column_names]
    arrays = {}
    for column in present:
        array = table.column(column).combine_chunks()
        arrays[column] = array.flatten().to_numpy(zero_copy_only=False).reshape(-1, array.type.list_size)
    return table.drop_columns(present).to_pandas(), arrays
