"""Continue OpenPhenom's masked-autoencoder pretraining on a lab's own plates (no labels) with Ray Train (V2),
tracked in MLflow, exported in the official format.

    camae pretrain --config configs/pretrain/quickstart.yaml [--set train.epochs=20 ...]
    python -m finetune.pretrain --config ...     # the same; for `ray job submit --working-dir . -- python -m ...`

`run_pretrain` is the driver: table and plate split; an MLflow run; Ray Data streams of the training and
held-out plates; a `TorchTrainer` running `pretrain_fn_per_worker` (masked reconstruction, MSE on masked tokens
plus the optional Fourier term, optional whole-channel masking), checkpointed every epoch and resumable; then the
checkpoint with the lowest held-out loss is exported with its decoder, so `MAEModel.from_pretrained`,
`predict_missing_channels` and every job's `model.encoder.checkpoint` / `embed.encoder.checkpoint` load it.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch

from camae import storage
from camae.config import PretrainConfig, job_config, job_parser, load_config, save_config, to_dict
from finetune.pretrain_worker import build_mae, pretrain_fn_per_worker
from finetune.train import JobPlaces, best_checkpoint, places, scaling, write_summary
from finetune.worker import CKPT_METRICS, CKPT_STATE, EpochLogger

log = logging.getLogger("camae.pretrain")


def run_pretrain(cfg: PretrainConfig) -> dict:
    """The whole job; returns its summary (best epoch, held-out losses, the export)."""
    from camae.classifier import warn_random
    from camae.cluster import check_cpus, check_outputs, connect
    from camae.console import FollowRun, ray_logs, say
    from camae.data import prepare_dataset
    from camae.tracking import end_run

    check_config(cfg)
    where = places(cfg)
    where.run_dir.mkdir(parents=True, exist_ok=True)
    connect()
    check_cpus(cfg.run.num_workers, cfg.run.cpus_per_worker)
    check_outputs(where.storage_path, where.tracking_uri)
    warn_random(cfg.model.encoder)
    say(f"Ray's own logs: {ray_logs()} (--verbose shows them here)")
    table, labels = prepare_dataset(cfg.data, cfg.synth, where.run_dir)
    save_config(cfg, where.run_dir / "config.yaml")
    run_id = _start_run(cfg, where, table)
    try:
        with FollowRun(where.tracking_uri, run_id, cfg.train.epochs):
            result = make_trainer(cfg, where, table, labels, run_id).fit()
        return finish(cfg, result, where, run_id)
    except BaseException:
        end_run(where.tracking_uri, run_id, "FAILED")
        raise


REPORTED = ("val/loss", "train/loss")  # what every epoch reports that can rank checkpoints


def check_config(cfg: PretrainConfig) -> None:
    """The MAE reconstructs exactly its decoder's channel slots (6 for OpenPhenom), and checkpoints are ranked by a
    metric the job reports: say so before anything runs."""
    from camae.config import ConfigError
    from camae.model_config import DecoderConfig

    slots = DecoderConfig().num_modalities
    if len(cfg.data.channels) != slots:
        raise ConfigError(f"data.channels has {len(cfg.data.channels)} channels, but the MAE decoder reconstructs "
                          f"exactly {slots}: list {slots} channels (the order is the decoder's slot order)")
    if cfg.run.checkpoint_metric not in REPORTED:
        raise ConfigError(f"run.checkpoint_metric={cfg.run.checkpoint_metric!r} is not reported by pretraining; "
                          f"use one of {list(REPORTED)} (with run.checkpoint_mode: min)")


def _start_run(cfg: PretrainConfig, where: JobPlaces, table) -> str:
    from camae.identity import split_identity
    from camae.tracking import flatten, log_split, start_run

    run_id = start_run(where.tracking_uri, cfg.tracking.experiment, cfg.tracking.run_name or cfg.run.name,
                       flatten(to_dict(cfg)), {"camae.kind": "pretrain", "camae.dataset": Path(cfg.data.root).name,
                                               "camae.channels": ",".join(cfg.data.channels),
                                               "camae.split": split_identity(table), "camae.storage": where.state_dir})
    log_split(where.tracking_uri, run_id, table, Path(cfg.data.root).name, str(cfg.data.root))
    return run_id


def make_trainer(cfg: PretrainConfig, where: JobPlaces, table, labels, run_id: str):
    """The TorchTrainer: Ray Data streams of the training plates (split across workers) and the validation
    plates (held-out loss and figures, rank 0), checkpoints in storage ranked by val/loss."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train import DataConfig as RayDataConfig
    from ray.train.torch import TorchTrainer

    from camae.data import TRAIN_COLUMNS, build_dataset

    datasets = {name: build_dataset(table[table.split == name], cfg.data, train=name == "train", label_map=labels,
                                    columns=TRAIN_COLUMNS, skip_log=storage.join(where.state_dir, "skipped"))
                for name in ("train", "val")}
    path, filesystem = storage.ray_storage(where.storage_path)
    ranking = CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints, checkpoint_score_order=cfg.run.checkpoint_mode,
                               checkpoint_score_attribute=cfg.run.checkpoint_metric)
    return TorchTrainer(
        pretrain_fn_per_worker,
        train_loop_config={"cfg": to_dict(cfg), "run_id": run_id, "tracking_uri": where.tracking_uri,
                           "train_sites": int((table.split == "train").sum()), "run_dir": str(where.run_dir),
                           "state_dir": where.state_dir},
        scaling_config=scaling(cfg),
        run_config=RunConfig(name=cfg.run.name, storage_path=path, storage_filesystem=filesystem,
                             checkpoint_config=ranking, failure_config=FailureConfig(max_failures=cfg.run.max_failures),
                             callbacks=[EpochLogger(where.tracking_uri, run_id, cfg.train.epochs)]),
        datasets=datasets, dataset_config=RayDataConfig(datasets_to_split=["train"]))


def finish(cfg: PretrainConfig, result, where: JobPlaces, run_id: str) -> dict:
    """Export the checkpoint with the lowest held-out loss in the official format (with its decoder), log it and
    the best metrics, write the summary."""
    from mlflow.tracking import MlflowClient

    from camae.tracking import end_run, log_metrics

    best = best_checkpoint(result, cfg, where.run_dir)
    metrics = json.loads((best / CKPT_METRICS).read_text())
    model = build_mae(cfg)
    model.load_state_dict(torch.load(best / CKPT_STATE, map_location="cpu", weights_only=True)["model"])
    export_dir = where.run_dir / "export"
    model.save_pretrained(export_dir)
    history = MlflowClient(where.tracking_uri).get_metric_history(run_id, "val/loss_untrained")
    summary = {"run_id": run_id, "tracking_uri": where.tracking_uri, "best_epoch": int(metrics["epoch"]),
               "best/val/loss": metrics["val/loss"], "export": str(export_dir),
               **({"val/loss_untrained": history[0].value} if history else {})}
    if storage.is_uri(where.state_dir):
        summary["export_uri"] = storage.upload(export_dir, storage.join(where.state_dir, "export"))
    log_metrics(where.tracking_uri, run_id, {"best/val/loss": summary["best/val/loss"],
                                             "best_epoch": summary["best_epoch"]}, step=summary["best_epoch"])
    _log_files(where, run_id)
    write_summary(where, summary)
    end_run(where.tracking_uri, run_id)
    return summary


def _log_files(where: JobPlaces, run_id: str) -> None:
    import mlflow

    from camae.tracking import active_run

    with active_run(where.tracking_uri, run_id):
        for name in ("config.yaml", "splits.csv"):
            if (where.run_dir / name).is_file():
                mlflow.log_artifact(str(where.run_dir / name))
        mlflow.log_artifacts(str(where.run_dir / "export"), "export")


def main(argv: list[str] | None = None) -> int:
    from camae.console import setup
    from camae.tracking import ui_command

    args = job_parser("finetune.pretrain", __doc__, "pretrain").parse_args(argv)
    setup(args.verbose)
    try:
        cfg = load_config(PretrainConfig, job_config(args), args.set)
        summary = run_pretrain(cfg)
    except ValueError as err:  # the config, or what the data, cluster, storage or tracking server refused up front
        print(f"pretrain: error: {err}", file=sys.stderr)
        return 2
    untrained = summary.get("val/loss_untrained")
    print(f"best epoch {summary['best_epoch']}: held-out reconstruction loss {summary['best/val/loss']:.4f}"
          + (f" (the starting weights: {untrained:.4f})" if untrained is not None else ""))
    print(f"export (official format, with the decoder): {summary['export']}")
    print(ui_command(summary["tracking_uri"], cfg.tracking.experiment))
    return 0


if __name__ == "__main__":
    sys.exit(main())
