"""MLflow glue: where runs go, how configs become params, and per-epoch metrics from workers.

A run is created by the driver (`start_run`), which logs the flattened resolved config, tags and the config
file; training workers log metrics into that run by id (`log_metrics`), so nothing depends on an active run in
the worker process, and no job leaves a global tracking URI behind for the next one (`active_run`). Tracking
URIs are made absolute, because Ray Tune trials change directory.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient


def resolve_tracking_uri(uri: str | None, output_dir: str | os.PathLike) -> str:
    """The config's URI, else $MLFLOW_TRACKING_URI, else sqlite:///<output_dir>/mlflow.db, with paths absolute."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(output_dir) / 'mlflow.db'}"
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///")).expanduser().resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    if "://" not in uri:  # a bare directory: MLflow 3 refuses file stores, so keep a database there instead
        path = Path(uri).expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path / 'mlflow.db'}"
    return uri


def flatten(d: dict) -> dict[str, str]:
    """Nested config dict -> {"train.lr": "0.001", ...}; lists and None as JSON."""
    from camae.config import dotted_items

    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in dotted_items(d).items()}


def ui_command(tracking_uri: str) -> str:
    """The line every job ends with: how to open the MLflow UI on its store, on 127.0.0.1 only."""
    return f"MLflow UI: mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000"


def start_run(tracking_uri: str, experiment: str, run_name: str, params: dict, tags: dict,
              parent_run_id: str | None = None) -> str:
    """Create a run (nested under parent_run_id if given) with params and tags; returns its id."""
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        client.create_experiment(experiment)
        exp = client.get_experiment_by_name(experiment)
    all_tags = {k: str(v) for k, v in tags.items()}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp.experiment_id, run_name=run_name, tags=all_tags)
    items = list(params.items())
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, str(v)[:6000]) for k, v in items[i:i + 100]])
    return run.info.run_id


@contextmanager
def using_tracking_uri(tracking_uri: str):
    """MLflow's fluent API (log_artifact, pytorch.log_model / load_model) against one store, leaving no tracking
    URI behind: `mlflow.set_tracking_uri` also exports $MLFLOW_TRACKING_URI, which the next job in this process
    (a notebook, a test) would otherwise read as its own store."""
    from mlflow.tracking._tracking_service import utils

    previous, previous_env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if previous_env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = previous_env


@contextmanager
def active_run(tracking_uri: str, run_id: str):
    """The fluent API on one existing run (see `using_tracking_uri`)."""
    with using_tracking_uri(tracking_uri), mlflow.start_run(run_id=run_id):
        yield


def log_metrics(tracking_uri: str, run_id: str, metrics: dict[str, float], step: int) -> None:
    """Log numeric metrics into a run by id (safe from any process)."""
    client = MlflowClient(tracking_uri)
    stamp = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[mlflow.entities.Metric(k, float(v), stamp, step) for k, v in metrics.items()])


def end_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    MlflowClient(tracking_uri).set_terminated(run_id, status)


def baseline_key(cfg, split: str) -> str:
    """Identity of a probe baseline (an EvaluateConfig on a split): the same key means the same encoder, channels,
    crops, corrections and probes on the same plates, so a sweep may reuse the runs instead of recomputing them."""
    import hashlib

    from camae.config import to_dict

    d = to_dict(cfg)
    ckpt = d["embed"]["checkpoint"]
    identity = {"split": split, "checkpoint": str(Path(ckpt).resolve()) if ckpt else None,
                "random": None if ckpt else [d["embed"][k] for k in ("embed_dim", "depth", "num_heads", "seed")],
                "data": {k: d["data"][k] for k in ("channels", "crop_size", "eval_crop", "uint16_mapping")},
                "correction": d["correction"], "probes": d["probes"]}
    return hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def find_runs(tracking_uri: str, experiment: str, tags: dict[str, str]) -> list:
    """Finished runs of `experiment` carrying all `tags`."""
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    query = " and ".join([f"tags.`{k}` = '{v}'" for k, v in tags.items()] + ["attributes.status = 'FINISHED'"])
    return client.search_runs([exp.experiment_id], filter_string=query, max_results=1000)
