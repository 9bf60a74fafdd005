"""What every Ray Train worker of the fine-tuning job runs: the model, optimizer and schedule (plain torch, timm and
peft), one epoch, evaluation, and `train_fn_per_worker` itself.

This module is imported by the driver (`finetune.train`), never run as `__main__`: Ray pickles functions of an
importable module by reference, while a `python -m` entry module's functions go by value with all their globals
(seen: `cannot pickle 'CudnnModule'`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from ray.train import UserCallback

from camae.classifier import MAEClassifier, base_model
from camae.config import FinetuneConfig, from_dict
from camae.model import MAEModel

log = logging.getLogger("camae.finetune")

LORA_TARGETS = {"in_proj": r"blocks\.\d+\.in_proj", "attn_out_proj": r"blocks\.\d+\.attn_out_proj",
                "mlp_out_proj": r"blocks\.\d+\.mlp_out_proj", "patch_embed": r"patch_embed\.proj"}
CKPT_STATE, CKPT_METRICS = "state.pt", "metrics.json"
SCHEDULE_UNITS = 1000  # learning-rate schedule resolution per epoch


# ----------------------------------------------------------------------------------------------------------------
# The model, optimizer and schedule (plain torch/timm/peft; run in every worker)


def build_model(cfg: FinetuneConfig, num_classes: int) -> tuple[torch.nn.Module, MAEModel]:
    """The trainable model for cfg.train.mode, and the base model it started from (for the export)."""
    base = base_model(cfg.model.encoder)
    model = MAEClassifier.from_mae(base, num_classes, cfg.model.pool, cfg.model.head_dropout, cfg.model.head_norm)
    model.encoder.set_drop_path(0.0 if cfg.train.mode == "linear" else cfg.model.drop_path_rate)
    model.encoder.grad_checkpointing = cfg.model.grad_checkpointing
    # The classifier pools block outputs itself (as `predict` does): the encoder's fc_norm is outside its graph.
    # Left trainable, DDP waits for its gradients forever ("parameters that were not used in producing loss").
    model.encoder.fc_norm.requires_grad_(False)
    if cfg.train.mode == "linear":
        model.encoder.requires_grad_(False)
    elif cfg.train.mode == "lora":
        from peft import LoraConfig, get_peft_model

        lora = cfg.train.lora
        targets = r"encoder\.(" + "|".join(LORA_TARGETS[t] for t in lora.targets) + ")"
        model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                 target_modules=targets, modules_to_save=["head", "head_norm"]))
    return model, base


def build_optimizer(model: torch.nn.Module, cfg: FinetuneConfig):
    """timm's AdamW (no decay on biases, norms, tokens; layer-wise LR decay in mode=full) and its warmup +
    cosine schedule. The schedule runs on training progress in SCHEDULE_UNITS per epoch (updated after every
    optimizer step from the images all workers have seen), not on a step count: an elastic worker group that
    resumes with fewer workers takes more steps per epoch and still follows the same curve."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler

    t = cfg.train
    layer_decay = t.layer_decay if t.mode == "full" and t.layer_decay < 1 else None
    optimizer = create_optimizer_v2(model, "adamw", lr=t.lr, weight_decay=t.weight_decay, layer_decay=layer_decay)
    total = max(1, t.epochs * SCHEDULE_UNITS)
    warmup = min(int(t.warmup_epochs * SCHEDULE_UNITS), total - 1)
    scheduler = CosineLRScheduler(optimizer, t_initial=total, lr_min=t.min_lr, warmup_t=warmup,
                                  warmup_lr_init=t.lr * 0.01, t_in_epochs=False)
    return optimizer, scheduler


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module under DDP."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def autocast(device: torch.device, precision: str):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()


def run_epoch(model, batches, optimizer, scheduler, cfg: FinetuneConfig, device, step: int, epoch: int = 0,
              epoch_images: int = 1, world: int = 1):
    """One pass over this worker's training shard; returns (mean loss, images, seconds, optimizer steps done so
    far). `epoch_images` (all workers together) and `world` place each step on the schedule. The loss is summed on
    the device and read once at the end (no host sync per step); DDP skips its all-reduce on accumulation
    micro-batches (`no_sync`)."""
    model.train()
    if cfg.train.mode == "linear":
        unwrap(model).encoder.eval()  # frozen: no dropout or stochastic depth
    t, accumulate = cfg.train, cfg.train.accumulate
    total_loss, images, micro, start = torch.zeros((), device=device), 0, 0, time.perf_counter()
    for batch in batches:
        x, y = batch["image"].to(device, non_blocking=True), batch["label_index"].to(device, non_blocking=True)
        sync = (micro + 1) % accumulate == 0
        with _maybe_no_sync(model, sync):
            with autocast(device, t.precision):
                loss = F.cross_entropy(model(x).float(), y)
            (loss / accumulate).backward()
        micro, images = micro + 1, images + len(y)
        total_loss += loss.detach() * len(y)
        progress = epoch + world * images / epoch_images
        if sync:
            step = _optimizer_step(model, optimizer, scheduler, t.grad_clip, step, progress)
    if micro % accumulate:  # the last, partial accumulation
        step = _optimizer_step(model, optimizer, scheduler, t.grad_clip, step, epoch + world * images / epoch_images)
    return total_loss.item() / max(images, 1), images, time.perf_counter() - start, step


def _maybe_no_sync(model, sync: bool):
    return model.no_sync() if not sync and isinstance(model, torch.nn.parallel.DistributedDataParallel) \
        else nullcontext()


def _optimizer_step(model, optimizer, scheduler, grad_clip, step: int, progress: float) -> int:
    """One update; the schedule moves to `progress` (epochs done, fractional)."""
    if grad_clip:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step_update(round(progress * SCHEDULE_UNITS))
    return step + 1


@torch.no_grad()
def predict(model, batches, device, precision: str = "auto") -> tuple[np.ndarray, np.ndarray, float]:
    """(true labels, predicted labels, mean cross-entropy) over batches of {"image", "label_index"}; results stay
    on the device until the end (one host sync, not one per batch)."""
    model.eval()
    ys, preds, loss = [], [], torch.zeros((), device=device)
    for batch in batches:
        x, y = batch["image"].to(device, non_blocking=True), batch["label_index"].to(device, non_blocking=True)
        with autocast(device, precision):
            logits = model(x).float()
        loss += F.cross_entropy(logits, y, reduction="sum")
        ys.append(y)
        preds.append(logits.argmax(1))
    if not ys:
        raise RuntimeError("the evaluation split produced no images; check data.val_groups / the split")
    y = torch.cat(ys).cpu().numpy()
    return y, torch.cat(preds).cpu().numpy(), loss.item() / len(y)


# ----------------------------------------------------------------------------------------------------------------
# The Ray Train worker


def train_fn_per_worker(config: dict) -> None:
    """Runs in every Ray Train worker: build, resume, train, validate (rank 0), report and checkpoint per epoch.
    `config`: the resolved FinetuneConfig as a dict ("cfg"), label names, the MLflow run (rank 0 logs into it,
    each rank tags it with its node), training sites per epoch, the driver's run_dir (in-process runs only) and
    the job's state location in shared storage (the fault-injection marker)."""
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    from camae.metrics import classification_metrics
    from camae.tracking import MetricBuffer

    cfg = from_dict(FinetuneConfig, config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    in_process = cfg.run.num_workers == 0
    torch.manual_seed(cfg.train.seed)
    device = ray.train.torch.get_device() if world > 1 or cfg.run.use_gpu else torch.device("cpu")
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed-shape crops: let cuDNN pick its fastest convs
    model, _ = build_model(cfg, len(config["labels"]))
    optimizer, scheduler = build_optimizer(model, cfg)
    start_epoch, step = resume(model, optimizer, scheduler)
    if start_epoch and rank == 0:
        log.info("resuming after epoch %d (%d workers)", start_epoch, world)
    _tag_placement(config, rank, world, start_epoch)
    model = ray.train.torch.prepare_model(model) if world > 1 else model.to(device)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    # With Ray workers, EpochLogger logs each epoch on the controller once its checkpoint is registered; in-process
    # runs (num_workers=0) get no callbacks, so rank 0 logs there
    tracker = MetricBuffer(config["tracking_uri"], config["run_id"]) if in_process else None
    monitor = _system_metrics(config, resume=start_epoch > 0) if rank == 0 else None
    for epoch in range(start_epoch, cfg.train.epochs):
        if rank == 0:
            _maybe_inject_fault(cfg, epoch, config["state_dir"])
        batches = train_shard.iter_torch_batches(  # uint8 pixels, pinned and prefetched; normalized on the device
            batch_size=cfg.train.batch_size, prefetch_batches=cfg.train.prefetch_batches,
            pin_memory=device.type == "cuda", local_shuffle_buffer_size=4 * cfg.train.batch_size,
            local_shuffle_seed=cfg.train.seed + epoch)
        loss, images, seconds, step = run_epoch(model, batches, optimizer, scheduler, cfg, device, step, epoch,
                                                config["train_sites"], world)
        metrics = {"epoch": epoch + 1, "train/loss": loss, "train/images_per_s": images * world / seconds,
                   "lr": optimizer.param_groups[-1]["lr"], "workers": world}
        if rank == 0:
            y, pred, val_loss = predict(unwrap(model), val_shard.iter_torch_batches(
                batch_size=cfg.train.batch_size, prefetch_batches=cfg.train.prefetch_batches,
                pin_memory=device.type == "cuda"), device, cfg.train.precision)
            metrics |= {"val/loss": val_loss, **classification_metrics(y, pred, "val")}
        ckpt_dir = None
        if rank == 0:  # in-process runs keep checkpoints under run_dir, since no Ray storage copies them
            base = Path(config["run_dir"]) / "checkpoints" if in_process else Path(tempfile.mkdtemp())
            ckpt_dir = _write_checkpoint(base, unwrap(model), optimizer, scheduler, epoch, step, metrics,
                                         config["labels"])
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None)
        if tracker is not None:
            tracker.log(metrics, step=epoch + 1)
        if rank == 0:
            log.debug("epoch %d/%d: %s", epoch + 1, cfg.train.epochs, metrics)
            if in_process:
                prune_local_checkpoints(cfg, Path(config["run_dir"]))
            else:
                shutil.rmtree(Path(ckpt_dir).parent, ignore_errors=True)  # persisted by Ray Train: drop the copy
    if tracker is not None:
        tracker.flush()
    if monitor is not None:
        monitor.finish()


def _system_metrics(config: dict, resume: bool):
    """MLflow's system metrics (CPU, memory, disk, network; GPU where pynvml finds one) of rank 0's node, logged
    into the run as `system/...` every 5 s while it trains; None if the monitor cannot start."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    try:
        monitor = SystemMetricsMonitor(config["run_id"], sampling_interval=5, resume_logging=resume,
                                       tracking_uri=config["tracking_uri"])
        monitor.start()
    except Exception as err:  # noqa: BLE001 -- an optional view: training goes on without it
        log.warning("system metrics are not logged (%s)", err)
        return None
    return monitor


class EpochLogger(UserCallback):
    """A Ray Train callback on the controller: logs each epoch's metrics (rank 0's report; `epoch` and the step
    count epochs done, from 1) to the MLflow run once
    the controller has registered that epoch's checkpoint. A worker that dies after its report but before the
    controller collected it loses the epoch, which then runs again: logging from the worker would record that
    epoch twice (seen on a killed node), logging here records each committed epoch once, with continuous steps,
    in the one run. Queued through MetricBuffer, so a tracking-server outage loses nothing."""

    def __init__(self, tracking_uri: str, run_id: str, epochs: int):
        self.tracking_uri, self.run_id, self.epochs = tracking_uri, run_id, epochs
        self.buffer = None

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        from camae.tracking import MetricBuffer

        self.buffer = self.buffer or MetricBuffer(self.tracking_uri, self.run_id)
        epoch = int(metrics[0]["epoch"])
        self.buffer.log({k: v for k, v in metrics[0].items() if isinstance(v, int | float)}, step=epoch)
        if epoch == self.epochs:
            self.buffer.flush()


def _tag_placement(config: dict, rank: int, world: int, start_epoch: int) -> None:
    """Each rank records its node on the MLflow run (`camae.node.rank<r>`, per attempt of the worker group, so a
    restart on other nodes shows too)."""
    import ray
    from mlflow.tracking import MlflowClient

    client = MlflowClient(config["tracking_uri"])
    try:
        client.set_tag(config["run_id"], f"camae.node.rank{rank}", ray.get_runtime_context().get_node_id())
        if rank == 0:
            client.set_tag(config["run_id"], f"camae.workers.from_epoch{start_epoch + 1}", str(world))
    except Exception as err:  # noqa: BLE001 -- a tracking outage must not stop training; metrics are buffered
        log.warning("could not tag the MLflow run with this worker's node (%s)", err)


def resume(model, optimizer, scheduler) -> tuple[int, int]:
    """Load Ray Train's checkpoint of this run, if any (what `_write_checkpoint` wrote), into the model, optimizer
    and schedule; returns (first epoch to run, optimizer steps so far), (0, 0) on a fresh start."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return 0, 0
    with checkpoint.as_directory() as d:
        state = torch.load(Path(d) / CKPT_STATE, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state["epoch"] + 1, state["step"]


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


def _maybe_inject_fault(cfg: FinetuneConfig, epoch: int, state_dir: str) -> None:
    """Testing recovery: once, kill this worker during the epoch after run.fault_injection_epoch, after waiting
    out two controller polls so that epoch's checkpoint is committed (a report not yet collected by the
    controller is lost with its worker, and its epoch is rightly run again). The once-marker lives in the job's
    shared storage: the restarted rank 0 may be on another node."""
    from camae import storage

    marker = storage.join(state_dir, "fault_injected")
    if cfg.run.fault_injection_epoch is None or epoch != cfg.run.fault_injection_epoch + 1 or storage.exists(marker):
        return
    time.sleep(2 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 2.0)))
    storage.write_text(marker, f"killed during epoch {epoch}\n")
    log.warning("fault injection: killing this worker during epoch %d", epoch)
    os.kill(os.getpid(), signal.SIGKILL)


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
