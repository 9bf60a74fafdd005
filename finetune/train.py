"""Fine-tune OpenPhenom's encoder for classification with Ray Train (V2), tracked in MLflow.

    camae finetune --config configs/finetune/quickstart.yaml [--set train.lr=3e-4 ...]
    python -m finetune.train --config ...     # the same; for `ray job submit --working-dir . -- python -m ...`

`run_finetune` is the driver: table, plate split and label map; an MLflow run; Ray Data streams; a
`TorchTrainer` running `train_fn_per_worker`; then the best checkpoint is tested on the held-out plates and
exported in the official OpenPhenom format. Modes: linear (frozen encoder), lora (peft adapters), full
(layer-wise LR decay). Workers report once per epoch with a checkpoint, so a restarted worker group resumes from
the last finished epoch.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from camae import storage
from camae.config import FinetuneConfig, job_config, job_parser, load_config, save_config, to_dict
from finetune.worker import (
    CKPT_METRICS,
    CKPT_STATE,
    EpochLogger,
    build_model,
    predict,
    rank_local_checkpoints,
    train_fn_per_worker,
)

log = logging.getLogger("camae.finetune")


# ----------------------------------------------------------------------------------------------------------------
# The driver


@dataclass
class JobPlaces:
    """Where one fine-tuning job keeps things."""

    run_dir: Path
    """Local: the resolved config, split, label map, test report and export (logged to MLflow from here)."""
    storage_path: str
    """Ray Train storage (local, NFS or a URI): the job's checkpoints live in storage_path/run.name."""
    state_dir: str
    """storage_path/run.name: what every node of the job shares."""
    tracking_uri: str
    """The MLflow store."""


def places(cfg: FinetuneConfig) -> JobPlaces:
    from camae.tracking import resolve_tracking_uri

    out = Path(cfg.run.output_dir).resolve()
    path = storage.resolve(cfg.run.storage_path or out / "ray")
    return JobPlaces(out / cfg.run.name, path, storage.join(path, cfg.run.name),
                     resolve_tracking_uri(cfg.tracking.tracking_uri, out))


def run_finetune(cfg: FinetuneConfig, parent_run_id: str | None = None, callbacks: list | None = None,
                 tags: dict | None = None, progress: bool = True) -> dict:
    """The whole job; returns a summary (best epoch, val and test metrics, export path, MLflow run). A sweep
    trial passes its MLflow parent run, Ray Train callbacks (TuneReportCallback), extra run tags, and no progress
    display (the sweep shows its own)."""
    from contextlib import nullcontext

    from camae.classifier import warn_random
    from camae.cluster import check_cpus, check_outputs, connect
    from camae.console import FollowRun, ray_logs, say
    from camae.data import prepare_dataset
    from camae.tracking import end_run

    where = places(cfg)
    where.run_dir.mkdir(parents=True, exist_ok=True)
    connect()
    check_cpus(cfg.run.num_workers, cfg.run.cpus_per_worker)
    if progress:  # a job of its own (not a sweep's trial)
        warn_random(cfg.model.encoder)
        say(f"Ray's own logs: {ray_logs()} (--verbose shows them here)")
    check_outputs(where.storage_path, where.tracking_uri)
    table, labels = prepare_dataset(cfg.data, cfg.synth, where.run_dir)
    save_config(cfg, where.run_dir / "config.yaml")
    run_id = _start_run(cfg, where, table, parent_run_id, tags)
    try:
        with FollowRun(where.tracking_uri, run_id, cfg.train.epochs) if progress else nullcontext():
            result = make_trainer(cfg, where, table, labels, run_id, callbacks).fit()
        return finish(cfg, result, table, labels, where, run_id)
    except BaseException:
        end_run(where.tracking_uri, run_id, "FAILED")
        raise


def _start_run(cfg: FinetuneConfig, where: JobPlaces, table, parent_run_id: str | None, tags: dict | None) -> str:
    from camae.identity import split_identity
    from camae.tracking import flatten, log_split, start_run

    tags = {"camae.kind": "finetune", "camae.mode": cfg.train.mode, "camae.dataset": Path(cfg.data.root).name,
            "camae.channels": ",".join(cfg.data.channels), "camae.split": split_identity(table),
            "camae.storage": where.state_dir, **(tags or {})}
    run_id = start_run(where.tracking_uri, cfg.tracking.experiment, cfg.tracking.run_name or cfg.run.name,
                       flatten(to_dict(cfg)), tags,
                       parent_run_id=parent_run_id or os.environ.get("CAMAE_PARENT_RUN_ID"))
    log_split(where.tracking_uri, run_id, table, Path(cfg.data.root).name, str(cfg.data.root))
    return run_id


def scaling(cfg: FinetuneConfig):
    """Ray Train's ScalingConfig: a fixed worker count, or (run.min_workers, run.num_workers) for an elastic group
    that goes on with fewer workers when a node is lost; workers placed by run.placement_strategy."""
    from ray.train import ScalingConfig

    r = cfg.run
    workers = (r.min_workers, r.num_workers) if r.min_workers and r.num_workers else r.num_workers
    return ScalingConfig(num_workers=workers, use_gpu=r.use_gpu, placement_strategy=r.placement_strategy,
                         resources_per_worker={"CPU": r.cpus_per_worker, **r.resources_per_worker})


def make_trainer(cfg: FinetuneConfig, where: JobPlaces, table, labels, run_id: str, callbacks: list | None):
    """The TorchTrainer: Ray Data streams of the train (split across workers) and val plates, checkpoints in
    storage, worker-group restarts per run.max_failures."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train import DataConfig as RayDataConfig
    from ray.train.torch import TorchTrainer

    from camae.data import TRAIN_COLUMNS, build_dataset

    datasets = {name: build_dataset(table[table.split == name], cfg.data, train=name == "train", label_map=labels,
                                    columns=TRAIN_COLUMNS, skip_log=storage.join(where.state_dir, "skipped"))
                for name in ("train", "val")}
    path, filesystem = storage.ray_storage(where.storage_path)
    callbacks = [*(callbacks or []), EpochLogger(where.tracking_uri, run_id, cfg.train.epochs)]
    ranking = CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints, checkpoint_score_order=cfg.run.checkpoint_mode,
                               checkpoint_score_attribute=cfg.run.checkpoint_metric)
    return TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"cfg": to_dict(cfg), "labels": list(labels.names), "run_id": run_id,
                           "tracking_uri": where.tracking_uri, "train_sites": int((table.split == "train").sum()),
                           "run_dir": str(where.run_dir), "state_dir": where.state_dir},
        scaling_config=scaling(cfg),
        run_config=RunConfig(name=cfg.run.name, storage_path=path, storage_filesystem=filesystem,
                             checkpoint_config=ranking, failure_config=FailureConfig(max_failures=cfg.run.max_failures),
                             callbacks=callbacks),
        datasets=datasets, dataset_config=RayDataConfig(datasets_to_split=["train"]))


def best_checkpoint(result, cfg: FinetuneConfig, run_dir: Path) -> Path:
    """The local directory of the checkpoint with the best cfg.run.checkpoint_metric (Ray's ranking, downloaded
    from remote storage; or ours in-process)."""
    import pyarrow.fs

    if result.best_checkpoints:
        sign = 1 if cfg.run.checkpoint_mode == "max" else -1
        checkpoint, _ = max(result.best_checkpoints, key=lambda cm: sign * cm[1][cfg.run.checkpoint_metric])
        if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
            return Path(checkpoint.path)
        return Path(checkpoint.to_directory(str(run_dir / "best_checkpoint")))
    ranked = rank_local_checkpoints(cfg, run_dir)
    if not ranked:
        raise RuntimeError(f"training produced no checkpoint in {run_dir}")
    return ranked[0]


def finish(cfg: FinetuneConfig, result, table, labels, where: JobPlaces, run_id: str) -> dict:
    """Test the best checkpoint on the held-out plates, export it (also to remote storage), log everything to
    MLflow; returns the summary (also written to summary.json, locally and in storage)."""
    from camae.tracking import end_run, log_metrics

    best = best_checkpoint(result, cfg, where.run_dir)
    best_metrics = json.loads((best / CKPT_METRICS).read_text())
    model, base = build_model(cfg, len(labels))
    model.load_state_dict(torch.load(best / CKPT_STATE, map_location="cpu", weights_only=True)["model"])
    summary = {"run_id": run_id, "tracking_uri": where.tracking_uri, "best_epoch": int(best_metrics["epoch"]),
               **{f"best/{k}": v for k, v in best_metrics.items() if k.startswith("val/")}}
    summary |= evaluate_heldout(cfg, model, table, labels, where.run_dir)
    log_metrics(where.tracking_uri, run_id, {k: v for k, v in summary.items() if "/" in k}
                | {"best_epoch": summary["best_epoch"]}, step=summary["best_epoch"])
    model = export(cfg, model, base, labels, where, summary)
    log_artifacts(cfg, model, where, run_id, summary)
    write_summary(where, summary)
    end_run(where.tracking_uri, run_id)
    return summary


def evaluate_heldout(cfg: FinetuneConfig, model, table, labels, run_dir: Path) -> dict:
    """test/* metrics on the held-out plates, the per-class table and the confusion matrix ({} without them)."""
    from camae.data import TRAIN_COLUMNS, build_dataset
    from camae.metrics import classification_metrics, confusion, per_class_table
    from camae.plots import plot_confusion

    test = table[table.split == "test"]
    if not len(test):
        return {}
    device = torch.device("cuda" if cfg.run.use_gpu and torch.cuda.is_available() else "cpu")
    ds = build_dataset(test, cfg.data, train=False, label_map=labels, columns=TRAIN_COLUMNS)
    y, pred, loss = predict(model.to(device), ds.iter_torch_batches(batch_size=cfg.train.batch_size), device,
                            cfg.train.precision)
    per_class_table(y, pred, list(labels.names)).to_csv(run_dir / "per_class_test.csv", index=False)
    plot_confusion(confusion(y, pred, len(labels)), list(labels.names), run_dir / "confusion_test.png")
    return {"test/loss": loss, **classification_metrics(y, pred, "test")}


def export(cfg: FinetuneConfig, model, base, labels, where: JobPlaces, summary: dict):
    """The official-format export (LoRA merged; the adapter also on its own), uploaded beside the checkpoints when
    storage is remote; summary.json written locally and to storage. Returns the (merged) model."""
    export_dir = where.run_dir / "export"
    if cfg.train.mode == "lora":
        model.save_pretrained(str(where.run_dir / "adapter"))  # the adapter + head on their own (peft format)
        model = model.merge_and_unload()
    model.cpu().export(base, export_dir, list(labels.names))
    summary["export"] = str(export_dir)
    if storage.is_uri(where.state_dir):  # where every node (and the sweep's driver) can read it
        summary["export_uri"] = storage.upload(export_dir, storage.join(where.state_dir, "export"))
    return model


def write_summary(where: JobPlaces, summary: dict) -> None:
    """summary.json locally and in storage (where a sweep's driver reads it), logged to the run."""
    from camae.tracking import active_run

    text = json.dumps(summary, indent=2) + "\n"
    (where.run_dir / "summary.json").write_text(text)
    storage.write_text(storage.join(where.state_dir, "summary.json"), text)
    with active_run(where.tracking_uri, summary["run_id"]):
        import mlflow

        mlflow.log_artifact(str(where.run_dir / "summary.json"))


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("torch", "timm", "safetensors", "numpy")]


# The logged model is self-contained: camae's code travels with it (it unpickles camae's classes), and its
# requirements are stated rather than inferred (MLflow's inference loads the model in a subprocess: ~5 s a model)
MODEL_REQUIREMENTS, CAMAE_CODE = _requirements(), str(Path(__file__).resolve().parents[1] / "camae")


def log_artifacts(cfg: FinetuneConfig, model, where: JobPlaces, run_id: str, summary: dict) -> None:
    """The run's files, the export (and adapter) and, with tracking.log_model, the MLflow model: an MLflow 3
    LoggedModel linked to this run (the runs table's Models column), with the signature and input example of a
    uint8 batch; `summary["model_uri"]` names it."""
    import mlflow

    from camae.tracking import active_run

    run_dir = where.run_dir
    with active_run(where.tracking_uri, run_id):
        for name in ("config.yaml", "labels.json", "splits.csv", "per_class_test.csv", "confusion_test.png"):
            if (run_dir / name).is_file():
                mlflow.log_artifact(str(run_dir / name))
        mlflow.log_artifacts(str(run_dir / "export"), "export")
        if (run_dir / "adapter").is_dir():
            mlflow.log_artifacts(str(run_dir / "adapter"), "adapter")
        if cfg.tracking.log_model:  # a traced (pt2) model; a batch of 2 keeps the batch size dynamic (1 is static)
            example = np.zeros((2, len(cfg.data.channels), cfg.data.crop_size, cfg.data.crop_size), dtype=np.uint8)
            name = re.sub(r"[/:.%\"']", "_", cfg.tracking.run_name or cfg.run.name)  # what MLflow allows
            info = mlflow.pytorch.log_model(model.eval(), name=name, input_example=example,
                                            params={"mode": cfg.train.mode}, model_type="image-classifier",
                                            pip_requirements=MODEL_REQUIREMENTS, code_paths=[CAMAE_CODE])
            summary["model_uri"] = info.model_uri


def main(argv: list[str] | None = None) -> int:
    from camae.console import setup
    from camae.tracking import ui_command

    args = job_parser("finetune.train", __doc__, "finetune").parse_args(argv)
    setup(args.verbose)
    try:
        cfg = load_config(FinetuneConfig, job_config(args), args.set)
        summary = run_finetune(cfg)
    except ValueError as err:  # the config, or what the data, cluster, storage or tracking server refused up front
        print(f"finetune: error: {err}", file=sys.stderr)
        return 2
    print(result_lines(summary))
    print(f"outputs: {Path(summary['export']).parent} (summary.json, export/, confusion_test.png)")
    print(ui_command(summary["tracking_uri"], cfg.tracking.experiment))
    return 0


def result_lines(summary: dict) -> str:
    """The job's result in two lines: the best epoch's validation and the held-out test, beside chance."""
    line = f"best epoch {summary['best_epoch']}: val/accuracy {summary['best/val/accuracy']:.3f}"
    if "test/accuracy" in summary:
        line += (f"\ntest plates: accuracy {summary['test/accuracy']:.3f} (95% CI {summary['test/accuracy_ci_low']:.3f}"
                 f"-{summary['test/accuracy_ci_high']:.3f}), chance {summary['test/chance_accuracy']:.3f}")
    return line


if __name__ == "__main__":
    sys.exit(main())
