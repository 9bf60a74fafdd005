"""Where outputs go: a local or NFS path, or any URI pyarrow understands (`s3://bucket/runs`, `gs://...`).

Every job output that must outlive a node (Ray Train checkpoints, the exported model, embedding Parquet, sweep
state) is written through these helpers, so one config key takes either kind of location. S3 endpoints and
credentials come from the usual AWS variables (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...), which a cluster job
passes to every node through its runtime env, or from the URI's query (`s3://b/p?endpoint_override=...`).

`check_shared` asks every alive node of the Ray cluster to read a marker the driver wrote: a path one node cannot
see is refused before any worker starts.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from camae.config import ConfigError


def is_uri(location: str | os.PathLike) -> bool:
    """A remote URI (s3://, gs://, ...); plain paths and file:// are local."""
    scheme = urlsplit(str(location)).scheme
    return len(scheme) > 1 and scheme != "file"


def resolve(location: str | os.PathLike) -> str:
    """A URI unchanged; a local path absolute (Ray Tune trials change directory)."""
    location = str(location)
    if is_uri(location):
        return location
    return str(Path(location.removeprefix("file://")).expanduser().resolve())


def join(location: str | os.PathLike, *parts: str) -> str:
    """`location/part/...` for a path or a URI (a URI's query, if any, stays at the end)."""
    location = resolve(location)
    if not is_uri(location):
        return str(Path(location, *parts))
    base, sep, query = location.partition("?")
    return posixpath.join(base, *parts) + sep + query


def filesystem(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a location; errors name the location."""
    location = resolve(location)
    try:
        return pafs.FileSystem.from_uri(location)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{location}: pyarrow cannot open this location ({err}); use a local path or a URI such "
                          "as s3://bucket/prefix") from err


def ray_storage(location: str | os.PathLike) -> tuple[str, pafs.FileSystem | None]:
    """(storage_path, storage_filesystem) as Ray's RunConfig expects them: a plain URI or path goes as it is (Ray
    builds the filesystem on every node from the AWS variables); a URI with a query (an endpoint or credentials
    inside it) goes as an explicit filesystem and the path inside it."""
    location = resolve(location)
    if is_uri(location) and "?" in location:
        fs, path = filesystem(location)
        return path, fs
    return location, None


def exists(location: str | os.PathLike) -> bool:
    fs, path = filesystem(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def write_bytes(location: str | os.PathLike, data: bytes) -> None:
    """Write a whole file (object stores: one PUT, so readers never see half of it)."""
    fs, path = filesystem(location)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def write_text(location: str | os.PathLike, text: str) -> None:
    write_bytes(location, text.encode())


def read_text(location: str | os.PathLike) -> str:
    fs, path = filesystem(location)
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def listdir(location: str | os.PathLike) -> list[str]:
    """Base names directly under a directory (empty if it does not exist)."""
    fs, path = filesystem(location)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(posixpath.basename(i.path) for i in infos)


def upload(local_dir: str | os.PathLike, location: str | os.PathLike) -> str:
    """Copy a local directory tree to a location (a no-op when they are the same place); returns the location."""
    location = resolve(location)
    if not is_uri(location) and Path(location) == Path(local_dir).resolve():
        return location
    fs, path = filesystem(location)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(Path(local_dir).resolve()), path, destination_filesystem=fs)
    return location


def download(location: str | os.PathLike, local_dir: str | os.PathLike) -> Path:
    """Copy a directory tree from a location to a local directory; returns the local directory."""
    fs, path = filesystem(location)
    Path(local_dir).mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(Path(local_dir).resolve()), source_filesystem=fs)
    return Path(local_dir)


# ----------------------------------------------------------------------------------------------------------------
# Is it shared? Asked of every node before any worker starts


def _visible(marker: str) -> str | None:
    """Runs on one node: None if the marker is readable there, else why not."""
    try:
        return None if exists(marker) else "the marker file is not there (a disk of the driver's node only)"
    except Exception as err:  # noqa: BLE001 -- any failure is the reason we report
        return f"{type(err).__name__}: {err}"


def check_shared(location: str | os.PathLike, key: str) -> None:
    """Refuse a storage location that some node of the Ray cluster cannot read (Ray Train persists checkpoints from
    every worker node into it, and restores from it on any node). `key` names the config key in the error."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from camae.cluster import alive_nodes

    marker = join(location, f".camae-shared-check-{uuid.uuid4().hex}")
    try:
        write_text(marker, "written by the camae driver\n")
    except (OSError, ConfigError) as err:
        raise ConfigError(f"{key}={location}: cannot write there from the driver ({err}); check the path, the "
                          "bucket and the credentials (AWS_* variables in the job's runtime env)") from err
    nodes = alive_nodes()
    probe = ray.remote(num_cpus=0)(_visible)
    try:
        answers = ray.get([probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                           .remote(marker) for n in nodes])
    finally:
        fs, path = filesystem(marker)
        fs.delete_file(path)
    blind = [(n["NodeManagerAddress"], n["NodeID"][:8], why) for n, why in zip(nodes, answers, strict=True) if why]
    if blind:
        where = "; ".join(f"node {ip} ({nid}): {why}" for ip, nid, why in blind)
        raise ConfigError(f"{key}={location} is not shared by every node of the Ray cluster ({where}). Ray Train "
                          "writes checkpoints from each worker's node and restores them on any node, so on a "
                          "multi-node cluster storage must be shared: set it to an NFS path mounted on every node or "
                          "to an object-store URI such as s3://bucket/runs")
