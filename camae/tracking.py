"""MLflow glue: where runs go, how configs become params, and per-epoch metrics from workers.

A run is created by the driver (`start_run`), which logs the flattened resolved config, tags and the config
file; training workers log metrics into that run by id (`log_metrics`), so nothing depends on an active run in
the worker process, and no job leaves a global tracking URI behind for the next one (`active_run`). Tracking
URIs are made absolute, because Ray Tune trials change directory.
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from camae.config import ConfigError

log = logging.getLogger("camae.tracking")


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


def check_tracking(uri: str, key: str = "tracking.tracking_uri", timeout: float = 10.0) -> None:
    """Before any training starts: an MLflow server (http/https URI) must answer its /health endpoint. On a cluster
    the job's rank-0 worker may run on any node, so a server (not a SQLite file beside the driver) is the way to
    track there."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=timeout).raise_for_status()
    except requests.RequestException as err:
        raise ConfigError(f"{key}={uri}: the MLflow server does not answer ({type(err).__name__}); start it "
                          "(`mlflow server --host 0.0.0.0 --port 5000 --serve-artifacts ...`) or fix the URI") from err


def flatten(d: dict) -> dict[str, str]:
    """Nested config dict -> {"train.lr": "0.001", ...}; lists and None as JSON."""
    from camae.config import dotted_items

    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in dotted_items(d).items()}


def ui_command(tracking_uri: str, experiment: str | None = None) -> str:
    """The lines every job ends with: how to open the MLflow UI on its store (127.0.0.1 only; the venv's mlflow,
    so it works in a fresh shell), and the experiment's page in the comparison view (`VIEW`) when it has one."""
    import sys

    mlflow_bin = Path(sys.executable).parent / "mlflow"
    command = f"{mlflow_bin if mlflow_bin.is_file() else 'mlflow'} ui --backend-store-uri {tracking_uri} " \
              "--host 127.0.0.1 --port 5000"
    if not tracking_uri.startswith("sqlite:///"):
        command = f"MLflow server: {tracking_uri}"
        base = tracking_uri.rstrip("/")
    else:
        command, base = f"MLflow UI: {command}", "http://127.0.0.1:5000"
    exp = MlflowClient(tracking_uri).get_experiment_by_name(experiment) if experiment else None
    if exp is None:
        return command
    return f"{command}\nthen open {experiment_url(base, exp.experiment_id)}"


def experiment_url(base: str, experiment_id: str) -> str:
    """The experiment's runs table in the model-training view, with camae's comparison columns (`VIEW`)."""
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning&{VIEW_KEY}={VIEW}"


def start_run(tracking_uri: str, experiment: str, run_name: str, params: dict, tags: dict,
              parent_run_id: str | None = None) -> str:
    """Create a run (nested under parent_run_id if given) with params and tags; returns its id."""
    client = MlflowClient(tracking_uri)
    exp = experiment_for(client, tracking_uri, experiment)
    all_tags = {k: str(v) for k, v in tags.items()}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp.experiment_id, run_name=run_name, tags=all_tags)
    items = list(params.items())
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, str(v)[:6000]) for k, v in items[i:i + 100]])
    return run.info.run_id


# ----------------------------------------------------------------------------------------------------------------
# The experiment page: what MLflow 3's UI shows first

EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # the model-training view, not GenAI's
VIEW_KEY, VIEW = "viewStateShareKey", "camae-comparison"
COLUMNS = ("best/val/accuracy", "test/accuracy", "test/chance_accuracy", "test/balanced_accuracy", "test/macro_f1")


def experiment_for(client: MlflowClient, tracking_uri: str, name: str):
    """The experiment `name` (created if missing), set to open in the model-training view with camae's comparison
    view stored beside it."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        client.create_experiment(name, artifact_location=_artifact_location(tracking_uri, name))
        exp = client.get_experiment_by_name(name)
    if exp.tags.get(f"mlflow.sharedViewState.{VIEW}") != comparison_view():
        for key, value in {**EXPERIMENT_KIND, f"mlflow.sharedViewState.{VIEW}": comparison_view()}.items():
            client.set_experiment_tag(exp.experiment_id, key, value)
    return exp


def comparison_view() -> str:
    """A shared view of the runs table (what the UI's Share button stores as an experiment tag and opens with
    ?viewStateShareKey=...): the accuracy columns beside chance, sorted by test accuracy, every run visible.
    MLflow 3 has no server-side default columns; this link is the way to open the page set up."""
    metric = lambda k: f"metrics.`{k}`"  # noqa: E731 -- the UI's column key
    state = {"orderByKey": metric("test/accuracy"), "orderByAsc": False, "searchFilter": "",
             "selectedColumns": [metric(k) for k in COLUMNS] + ["tags.`camae.kind`", "attributes.`Models`",
                                                                 "attributes.`Dataset`"],
             "runsHiddenMode": "SHOW_ALL", "runsExpanded": {}, "hideEmptyCharts": True}
    return json.dumps(state, sort_keys=True)


def log_split(tracking_uri: str, run_id: str, table, name: str, source: str) -> None:
    """The run's inputs (the runs table's Dataset column): one MLflow dataset per split of the plate split table,
    in context train / val / test, with its digest, source and size."""
    import warnings

    import mlflow.data
    from mlflow.entities import DatasetInput, InputTag

    columns = [c for c in ("sample_id", "experiment", "plate", "well", "site", "label", "is_control", "split")
               if c in table]
    inputs = []
    with warnings.catch_warnings():  # MLflow's hints on a local source and integer columns: not for users
        warnings.simplefilter("ignore")
        for split, rows in table[columns].groupby("split", sort=False):
            ds = mlflow.data.from_pandas(rows.reset_index(drop=True), source=source, name=f"{name} {split}",
                                         targets="label")
            inputs.append(DatasetInput(ds._to_mlflow_entity(), [InputTag("mlflow.data.context", str(split))]))
    MlflowClient(tracking_uri).log_inputs(run_id, datasets=inputs)


def _artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """A SQLite store keeps its artifacts beside the database (not in ./mlruns of whatever directory the job ran
    in); a server decides for itself (`--serve-artifacts`: they travel through it)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return (Path(tracking_uri.removeprefix("sqlite:///")).parent / "artifacts" / experiment).as_uri()


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


class MetricBuffer:
    """Per-epoch metrics from a training worker that survive a short outage of the tracking server: a batch that
    cannot be sent stays queued (in order, with its original step and time) and goes with the next one; `flush`
    at the end waits for the server up to `patience_s`. Nothing is lost and the job is not killed by a server
    restart. Each attempt makes one HTTP try (MLflow's own retries would stall training for minutes)."""

    def __init__(self, tracking_uri: str, run_id: str, patience_s: float = 120.0):
        self.client, self.run_id, self.patience_s = MlflowClient(tracking_uri), run_id, patience_s
        self.pending: list = []
        if tracking_uri.startswith(("http://", "https://")):
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")

    def log(self, metrics: dict[str, float], step: int) -> bool:
        """Queue the metrics and try to send everything queued; True when nothing is left pending."""
        stamp = int(time.time() * 1000)
        self.pending += [mlflow.entities.Metric(k, float(v), stamp, step) for k, v in metrics.items()]
        return self._send()

    def _send(self) -> bool:
        while self.pending:
            batch = self.pending[:1000]
            try:
                self.client.log_batch(self.run_id, metrics=batch)
            except Exception as err:  # noqa: BLE001 -- any failure to reach the server: keep the metrics, go on
                log.warning("MLflow tracking server unreachable (%s); %d metric values queued for the next try",
                            type(err).__name__, len(self.pending))
                return False
            del self.pending[:len(batch)]
        return True

    def flush(self) -> None:
        """Send what is queued, retrying until patience_s; then fail loudly rather than drop metrics."""
        deadline = time.monotonic() + self.patience_s
        while not self._send():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the MLflow server stayed unreachable for {self.patience_s:.0f} s; "
                                   f"{len(self.pending)} metric values of run {self.run_id} were not logged")
            time.sleep(2.0)


def end_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    MlflowClient(tracking_uri).set_terminated(run_id, status)


METRICS_VERSION = 2  # what a probe run logs (2: best/val/..., datasets); older runs are not reused


def baseline_key(cfg, split: str) -> str:
    """Identity of a probe baseline (an EvaluateConfig on a split): the same key means the same encoder (weights
    by content), the same images (dataset root and layout, channels, 16-bit mapping, crops), the same corrections
    and probes on the same plates, so a sweep may reuse the runs instead of recomputing them."""
    from camae.config import to_dict
    from camae.identity import data_identity, digest, encoder_identity

    d = to_dict(cfg)
    return digest({"metrics": METRICS_VERSION, "split": split, "encoder": encoder_identity(cfg.embed.encoder),
                   "data": data_identity(cfg.data), "correction": d["correction"], "probes": d["probes"]})


def find_runs(tracking_uri: str, experiment: str, tags: dict[str, str]) -> list:
    """Finished runs of `experiment` carrying all `tags`."""
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    query = " and ".join([f"tags.`{k}` = '{v}'" for k, v in tags.items()] + ["attributes.status = 'FINISHED'"])
    return client.search_runs([exp.experiment_id], filter_string=query, max_results=1000)


def comparison(tracking_uri: str, experiment: str, split: str):
    """The comparison a biologist reads, straight from MLflow: every finished probe and fine-tune run of
    `experiment` on plate split `split`, best test accuracy first, with its 95% interval and chance."""
    import pandas as pd

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = [] if exp is None else client.search_runs(
        [exp.experiment_id], f"tags.`camae.split` = '{split}' and attributes.status = 'FINISHED'", max_results=1000)
    runs = [r for r in runs if r.data.tags.get("camae.kind") in ("probe", "finetune")]  # (tags have no IN filter)
    keys = ("best/val/accuracy", "test/accuracy", "test/accuracy_ci_low", "test/accuracy_ci_high",
            "test/chance_accuracy")
    rows = [{"run": r.info.run_name, "kind": r.data.tags["camae.kind"], **{k: r.data.metrics.get(k) for k in keys}}
            for r in runs]
    frame = pd.DataFrame(rows, columns=["run", "kind", *keys])
    return frame.sort_values("test/accuracy", ascending=False, ignore_index=True)
