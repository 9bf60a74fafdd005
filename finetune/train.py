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
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from camae.classifier import MAEClassifier, base_model
from camae.config import FinetuneConfig, from_dict, job_parser, load_config, save_config, to_dict
from camae.model import MAEModel

log = logging.getLogger("camae.finetune")

LORA_TARGETS = {"in_proj": r"blocks\.\d+\.in_proj", "attn_out_proj": r"blocks\.\d+\.attn_out_proj",
                "mlp_out_proj": r"blocks\.\d+\.mlp_out_proj", "patch_embed": r"patch_embed\.proj"}
CKPT_STATE, CKPT_METRICS = "state.pt", "metrics.json"


# ----------------------------------------------------------------------------------------------------------------
# The model, optimizer and schedule (plain torch/timm/peft; run in every worker)


def build_model(cfg: FinetuneConfig, num_classes: int) -> tuple[torch.nn.Module, MAEModel]:
    """The trainable model for cfg.train.mode, and the base model it started from (for the export)."""
    base = base_model(cfg.model)
    model = MAEClassifier.from_mae(base, num_classes, cfg.model.pool, cfg.model.head_dropout, cfg.model.head_norm)
    model.encoder.set_drop_path(0.0 if cfg.train.mode == "linear" else cfg.model.drop_path_rate)
    model.encoder.grad_checkpointing = cfg.model.grad_checkpointing
    if cfg.train.mode == "linear":
        model.encoder.requires_grad_(False)
    elif cfg.train.mode == "lora":
        from peft import LoraConfig, get_peft_model

        lora = cfg.train.lora
        targets = r"encoder\.(" + "|".join(LORA_TARGETS[t] for t in lora.targets) + ")"
        model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                 target_modules=targets, modules_to_save=["head", "head_norm"]))
    return model, base


def build_optimizer(model: torch.nn.Module, cfg: FinetuneConfig, steps_per_epoch: int):
    """timm's AdamW (no decay on biases, norms, tokens; layer-wise LR decay in mode=full) and its warmup +
    cosine schedule, stepped per optimizer update."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler

    t = cfg.train
    layer_decay = t.layer_decay if t.mode == "full" and t.layer_decay < 1 else None
    optimizer = create_optimizer_v2(model, "adamw", lr=t.lr, weight_decay=t.weight_decay, layer_decay=layer_decay)
    total = max(1, t.epochs * steps_per_epoch)
    warmup = min(int(t.warmup_epochs * steps_per_epoch), total - 1)
    scheduler = CosineLRScheduler(optimizer, t_initial=total, lr_min=t.min_lr, warmup_t=warmup,
                                  warmup_lr_init=t.lr * 0.01, t_in_epochs=False)
    return optimizer, scheduler


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module under DDP."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def autocast(device: torch.device, precision: str):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()


def run_epoch(model, batches, optimizer, scheduler, cfg: FinetuneConfig, device, step: int):
    """One pass over the training shard; returns (mean loss, images, seconds, optimizer steps done so far)."""
    model.train()
    if cfg.train.mode == "linear":
        unwrap(model).encoder.eval()  # frozen: no dropout or stochastic depth
    t, accumulate = cfg.train, cfg.train.accumulate
    total_loss, images, micro, start = 0.0, 0, 0, time.perf_counter()
    for batch in batches:
        x, y = batch["image"].to(device, non_blocking=True), batch["label_index"].to(device, non_blocking=True)
        with autocast(device, t.precision):
            loss = F.cross_entropy(model(x).float(), y)
        (loss / accumulate).backward()
        micro += 1
        if micro % accumulate == 0:
            step = _optimizer_step(model, optimizer, scheduler, t.grad_clip, step)
        total_loss, images = total_loss + loss.item() * len(y), images + len(y)
    if micro % accumulate:
        step = _optimizer_step(model, optimizer, scheduler, t.grad_clip, step)
    return total_loss / max(images, 1), images, time.perf_counter() - start, step


def _optimizer_step(model, optimizer, scheduler, grad_clip, step: int) -> int:
    if grad_clip:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step_update(step + 1)
    return step + 1


@torch.no_grad()
def predict(model, batches, device, precision: str = "auto") -> tuple[np.ndarray, np.ndarray, float]:
    """(true labels, predicted labels, mean cross-entropy) over batches of {"image", "label_index"}."""
    model.eval()
    ys, preds, loss, n = [], [], 0.0, 0
    for batch in batches:
        x, y = batch["image"].to(device), batch["label_index"].to(device)
        with autocast(device, precision):
            logits = model(x).float()
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        n += len(y)
        ys.append(y.cpu().numpy())
        preds.append(logits.argmax(1).cpu().numpy())
    if n == 0:
        raise RuntimeError("the evaluation split produced no images; check data.val_groups / the split")
    return np.concatenate(ys), np.concatenate(preds), loss / n


# ----------------------------------------------------------------------------------------------------------------
# The Ray Train worker


def train_fn_per_worker(config: dict) -> None:
    """Runs in every Ray Train worker: build, resume, train, validate (rank 0), report and checkpoint per epoch."""
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    from camae.metrics import classification_metrics
    from camae.tracking import log_metrics

    cfg = from_dict(FinetuneConfig, config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    in_process = cfg.run.num_workers == 0
    torch.manual_seed(cfg.train.seed)
    device = ray.train.torch.get_device() if world > 1 or cfg.run.use_gpu else torch.device("cpu")
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed-shape crops: let cuDNN pick its fastest convs
    model, _ = build_model(cfg, len(config["labels"]))
    optimizer, scheduler = build_optimizer(model, cfg, config["steps_per_epoch"])
    start_epoch, step = 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / CKPT_STATE, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, step = state["epoch"] + 1, state["step"]
        if rank == 0:
            log.info("resuming from the checkpoint of epoch %d", state["epoch"])
    model = ray.train.torch.prepare_model(model) if world > 1 else model.to(device)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    for epoch in range(start_epoch, cfg.train.epochs):
        if rank == 0:
            _maybe_inject_fault(cfg, epoch, config["run_dir"])
        batches = train_shard.iter_torch_batches(batch_size=cfg.train.batch_size, local_shuffle_buffer_size=
                                                 4 * cfg.train.batch_size, local_shuffle_seed=cfg.train.seed + epoch)
        loss, images, seconds, step = run_epoch(model, batches, optimizer, scheduler, cfg, device, step)
        metrics = {"epoch": epoch, "train/loss": loss, "train/images_per_s": images * world / seconds,
                   "lr": optimizer.param_groups[-1]["lr"]}
        if rank == 0:
            y, pred, val_loss = predict(unwrap(model), val_shard.iter_torch_batches(
                batch_size=cfg.train.batch_size), device, cfg.train.precision)
            metrics |= {"val/loss": val_loss, **classification_metrics(y, pred, "val")}
        ckpt_dir = None
        if rank == 0:  # in-process runs keep checkpoints under run_dir, since no Ray storage copies them
            base = Path(config["run_dir"]) / "checkpoints" if in_process else Path(tempfile.mkdtemp())
            ckpt_dir = _write_checkpoint(base, unwrap(model), optimizer, scheduler, epoch, step, metrics,
                                         config["labels"])
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None)
        if rank == 0:
            log_metrics(config["tracking_uri"], config["run_id"], metrics, step=epoch)
            print(f"[camae] epoch {epoch + 1}/{cfg.train.epochs}  train/loss {loss:.4f}  val/loss {val_loss:.4f}  "
                  f"val/accuracy {metrics['val/accuracy']:.3f}  {metrics['train/images_per_s']:.1f} img/s",
                  flush=True)
            if in_process:
                prune_local_checkpoints(cfg, Path(config["run_dir"]))
            else:
                shutil.rmtree(Path(ckpt_dir).parent, ignore_errors=True)  # persisted by Ray Train: drop the copy


def _write_checkpoint(base: Path, model, optimizer, scheduler, epoch: int, step: int, metrics: dict,
                      labels: list[str]) -> str:
    """A checkpoint directory under `base`: weights (adapters included), optimizer, schedule, epoch, metrics,
    label names."""
    path = base / f"epoch_{epoch:04d}"
    path.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "epoch": epoch, "step": step}, path / CKPT_STATE)
    (path / CKPT_METRICS).write_text(json.dumps(metrics, indent=2) + "\n")
    (path / "labels.json").write_text(json.dumps({"names": labels}) + "\n")
    return str(path)


def _maybe_inject_fault(cfg: FinetuneConfig, epoch: int, run_dir: str) -> None:
    """Testing recovery: once, kill this worker during the epoch after run.fault_injection_epoch, after waiting
    out two controller polls so that epoch's checkpoint is committed (a report not yet collected by the
    controller is lost with its worker, and its epoch is rightly run again)."""
    marker = Path(run_dir) / "fault_injected"
    if cfg.run.fault_injection_epoch is None or epoch != cfg.run.fault_injection_epoch + 1 or marker.exists():
        return
    time.sleep(2 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 2.0)))
    marker.write_text(f"killed during epoch {epoch}\n")
    log.warning("fault injection: killing this worker during epoch %d", epoch)
    os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------------------------------------------
# The driver


def check_cpus(cfg: FinetuneConfig) -> None:
    """Ray Data needs CPUs of its own: if training workers take them all, fit() hangs without an error."""
    import ray

    total = ray.cluster_resources().get("CPU", 0)
    taken = cfg.run.num_workers * cfg.run.cpus_per_worker
    if taken >= total:
        raise ValueError(f"run.num_workers x run.cpus_per_worker = {taken} CPUs, but the cluster has {total}: "
                         "Ray Data needs at least one CPU left to decode images; lower them")


def run_finetune(cfg: FinetuneConfig, parent_run_id: str | None = None, callbacks: list | None = None,
                 tags: dict | None = None) -> dict:
    """The whole job; returns a summary (best epoch, val and test metrics, export path, MLflow run). A sweep
    trial passes its MLflow parent run, Ray Train callbacks (TuneReportCallback) and extra run tags."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train import DataConfig as RayDataConfig
    from ray.train.torch import TorchTrainer

    from camae.data import TRAIN_COLUMNS, build_dataset, prepare_dataset, split_fingerprint
    from camae.tracking import flatten, resolve_tracking_uri, start_run

    out = Path(cfg.run.output_dir).resolve()
    run_dir = out / cfg.run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    ray.init(ignore_reinit_error=True, log_to_driver=True)
    check_cpus(cfg)
    table, labels = prepare_dataset(cfg.data, cfg.synth, run_dir)
    save_config(cfg, run_dir / "config.yaml")
    tracking_uri = resolve_tracking_uri(cfg.tracking.tracking_uri, out)
    run_id = start_run(tracking_uri, cfg.tracking.experiment, cfg.tracking.run_name or cfg.run.name,
                       flatten(to_dict(cfg)), {"camae.kind": "finetune", "camae.mode": cfg.train.mode,
                                               "camae.dataset": Path(cfg.data.root).name,
                                               "camae.channels": ",".join(cfg.data.channels),
                                               "camae.split": split_fingerprint(table), **(tags or {})},
                       parent_run_id=parent_run_id or os.environ.get("CAMAE_PARENT_RUN_ID"))
    train = table[table.split == "train"]
    world = max(cfg.run.num_workers, 1)
    steps_per_epoch = math.ceil(len(train) / (cfg.train.batch_size * world * cfg.train.accumulate))
    datasets = {name: build_dataset(table[table.split == name], cfg.data, train=name == "train", label_map=labels,
                                    columns=TRAIN_COLUMNS, skip_log=str(run_dir / "skipped"))
                for name in ("train", "val")}
    storage = Path(cfg.run.storage_path or out / "ray").resolve()
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"cfg": to_dict(cfg), "labels": list(labels.names), "run_id": run_id,
                           "tracking_uri": tracking_uri, "steps_per_epoch": steps_per_epoch,
                           "run_dir": str(run_dir)},
        scaling_config=ScalingConfig(num_workers=cfg.run.num_workers, use_gpu=cfg.run.use_gpu,
                                     resources_per_worker={"CPU": cfg.run.cpus_per_worker}),
        run_config=RunConfig(name=cfg.run.name, storage_path=str(storage),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints,
                                                                checkpoint_score_attribute=cfg.run.checkpoint_metric,
                                                                checkpoint_score_order=cfg.run.checkpoint_mode),
                             failure_config=FailureConfig(max_failures=cfg.run.max_failures),
                             callbacks=callbacks),
        datasets=datasets,
        dataset_config=RayDataConfig(datasets_to_split=["train"]),
    )
    try:
        result = trainer.fit()
        summary = finish(cfg, result, table, labels, run_dir, tracking_uri, run_id)
    except BaseException:
        from camae.tracking import end_run

        end_run(tracking_uri, run_id, "FAILED")
        raise
    return summary


def rank_local_checkpoints(cfg: FinetuneConfig, run_dir: Path) -> list[Path]:
    """In-process checkpoints under run_dir/checkpoints, best cfg.run.checkpoint_metric first."""
    sign = 1 if cfg.run.checkpoint_mode == "max" else -1
    score = lambda d: sign * json.loads((d / CKPT_METRICS).read_text())[cfg.run.checkpoint_metric]  # noqa: E731
    return sorted((run_dir / "checkpoints").glob("epoch_*"), key=score, reverse=True)


def prune_local_checkpoints(cfg: FinetuneConfig, run_dir: Path) -> None:
    """Keep the best run.keep_checkpoints and the latest (to resume from); Ray does this for its own storage."""
    ranked = rank_local_checkpoints(cfg, run_dir)
    keep = set(ranked[:cfg.run.keep_checkpoints]) | {max(ranked)}
    for d in ranked:
        if d not in keep:
            shutil.rmtree(d, ignore_errors=True)


def best_checkpoint(result, cfg: FinetuneConfig, run_dir: Path) -> Path:
    """The checkpoint directory with the best cfg.run.checkpoint_metric (Ray's ranking, or ours in-process)."""
    if result.best_checkpoints:
        sign = 1 if cfg.run.checkpoint_mode == "max" else -1
        checkpoint, _ = max(result.best_checkpoints, key=lambda cm: sign * cm[1][cfg.run.checkpoint_metric])
        return Path(checkpoint.path)
    ranked = rank_local_checkpoints(cfg, run_dir)
    if not ranked:
        raise RuntimeError(f"training produced no checkpoint in {run_dir}")
    return ranked[0]


def finish(cfg: FinetuneConfig, result, table, labels, run_dir: Path, tracking_uri: str, run_id: str) -> dict:
    """Test the best checkpoint on the held-out plates, export it, log everything to MLflow."""
    import mlflow

    from camae.data import TRAIN_COLUMNS, build_dataset
    from camae.metrics import classification_metrics, confusion, per_class_table
    from camae.plots import plot_confusion
    from camae.tracking import active_run, end_run, log_metrics

    best = best_checkpoint(result, cfg, run_dir)
    best_metrics = json.loads((best / CKPT_METRICS).read_text())
    model, base = build_model(cfg, len(labels))
    model.load_state_dict(torch.load(best / CKPT_STATE, map_location="cpu", weights_only=True)["model"])
    device = torch.device("cuda" if cfg.run.use_gpu and torch.cuda.is_available() else "cpu")
    model.to(device)
    summary = {"run_id": run_id, "tracking_uri": tracking_uri, "best_epoch": best_metrics["epoch"],
               **{k: v for k, v in best_metrics.items() if k.startswith("val/")}}
    test = table[table.split == "test"]
    if len(test):
        ds = build_dataset(test, cfg.data, train=False, label_map=labels, columns=TRAIN_COLUMNS)
        y, pred, loss = predict(model, ds.iter_torch_batches(batch_size=cfg.train.batch_size), device,
                                cfg.train.precision)
        summary |= {"test/loss": loss, **classification_metrics(y, pred, "test")}
        per_class_table(y, pred, list(labels.names)).to_csv(run_dir / "per_class_test.csv", index=False)
        plot_confusion(confusion(y, pred, len(labels)), list(labels.names), run_dir / "confusion_test.png")
    log_metrics(tracking_uri, run_id, {k: v for k, v in summary.items() if "/" in k}, step=best_metrics["epoch"])
    export_dir, adapter_dir = run_dir / "export", run_dir / "adapter"
    if cfg.train.mode == "lora":
        model.save_pretrained(str(adapter_dir))  # the adapter + head on their own (peft format)
        model = model.merge_and_unload()
    model.cpu().export(base, export_dir, list(labels.names))
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    with active_run(tracking_uri, run_id):
        for name in ("config.yaml", "labels.json", "splits.csv", "summary.json", "per_class_test.csv",
                     "confusion_test.png"):
            if (run_dir / name).is_file():
                mlflow.log_artifact(str(run_dir / name))
        mlflow.log_artifacts(str(export_dir), "export")
        if adapter_dir.is_dir():
            mlflow.log_artifacts(str(adapter_dir), "adapter")
        if cfg.tracking.log_model:  # a traced (pt2) model; a batch of 2 keeps the batch size dynamic (1 is static)
            example = np.zeros((2, len(cfg.data.channels), cfg.data.crop_size, cfg.data.crop_size), dtype=np.uint8)
            summary["model_uri"] = mlflow.pytorch.log_model(model.eval(), name="model", input_example=example).model_uri
    end_run(tracking_uri, run_id)
    summary["export"] = str(export_dir)
    return summary


def main(argv: list[str] | None = None) -> int:
    from camae.tracking import ui_command

    args = job_parser("finetune.train", __doc__, "finetune").parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(FinetuneConfig, args.config, args.set)
    except ValueError as err:
        print(f"finetune: error: {err}", file=sys.stderr)
        return 2
    summary = run_finetune(cfg)
    print(json.dumps(summary, indent=2))
    print("\n" + ui_command(summary["tracking_uri"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
