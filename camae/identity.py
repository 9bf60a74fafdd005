"""The identity of every derived result, defined once: what an embedding, a probe baseline and a split depend on.

`encoder_identity` (weights: the checkpoint's content digest, or random dims and seed; bias routing) and
`data_identity` (dataset root and layout, channels, 16-bit mapping, crops) key the embedding files
(`embed.json`) and probe baselines (`camae.baseline_key`), so a sweep never reuses a baseline computed on another
dataset or encoder, and a resumed embedding pass never mixes encoders. `split_identity` says which site is in which
split.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

import pandas as pd

from camae import storage


def digest(obj) -> str:
    """A short stable hash of a JSON-able object."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=16)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:32]


def checkpoint_digest(checkpoint: str | os.PathLike) -> str:
    """sha256 of a checkpoint directory's weights file (cached per path, size and modification time): the same
    weights under another path are the same encoder, other weights under the same path are not."""
    weights = Path(checkpoint) / "model.safetensors"
    if not weights.is_file():
        return f"missing:{Path(checkpoint).resolve()}"
    stat = weights.stat()
    return _file_digest(str(weights.resolve()), stat.st_size, stat.st_mtime_ns)


def encoder_identity(spec) -> dict:
    """What an encoder's outputs depend on (`spec`: an EncoderSpec)."""
    if spec.checkpoint:
        weights = {"checkpoint_sha256": checkpoint_digest(spec.checkpoint)}
    else:
        weights = {"random": {"embed_dim": spec.embed_dim, "depth": spec.depth, "num_heads": spec.num_heads,
                              "seed": spec.seed}}
    return {**weights, "bias_routing": spec.bias_routing}


def data_identity(data, channels: list[str] | None = None) -> dict:
    """What the images an encoder sees depend on (`data`: a DataConfig; `channels`: a subset, e.g. leave-one-out)."""
    return {"root": storage.resolve(data.root), "format": data.format, "channels": list(channels or data.channels),
            "uint16_mapping": data.uint16_mapping, "percentiles": list(data.percentiles),
            "source_bits": data.source_bits, "crop_size": data.crop_size, "eval_crop": data.eval_crop}


def split_identity(table: pd.DataFrame) -> str:
    """A short hash of which site is in which split: runs with the same identity saw the same plates."""
    lines = sorted(f"{s}:{p}" for s, p in zip(table["sample_id"], table["split"], strict=True))
    return hashlib.sha1("\n".join(lines).encode()).hexdigest()[:12]
