"""What every Ray Train worker of the pretraining job runs: the MAE (camae.model), its optimizer, one epoch of
masked reconstruction, the held-out loss, the figures, and `pretrain_fn_per_worker` itself.

Imported by the driver (`finetune.pretrain`), never run as `__main__` (Ray would pickle its functions by value).
The fine-tuning worker's pieces that do not depend on the task (precision, DDP no_sync, checkpoints, fault
injection, node tags, system metrics) are shared from `finetune.worker`.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path

import torch

from camae.classifier import base_model
from camae.config import PretrainConfig, from_dict
from camae.model import MAEModel, normalize_images, patchify, unpatchify
from finetune.worker import (
    _maybe_inject_fault,
    _maybe_no_sync,
    _system_metrics,
    _tag_placement,
    _write_checkpoint,
    autocast,
    prune_local_checkpoints,
    resume,
    unwrap,
)

log = logging.getLogger("camae.pretrain")
SCHEDULE_UNITS = 1000  # learning-rate schedule resolution per epoch


# ----------------------------------------------------------------------------------------------------------------
# The model, its masking and optimizer


def build_mae(cfg: PretrainConfig) -> MAEModel:
    """The MAE to train: the checkpoint's (encoder and decoder) or random weights of the spec, with the config's
    masking and loss."""
    m = cfg.model
    model = base_model(m.encoder, decoder=(m.decoder_dim, m.decoder_depth, m.decoder_heads))
    if not m.encoder.checkpoint:
        scratch_init(model, m.matched_attention_init, m.encoder.seed)
    model.mask_ratio = model.config.mask_ratio = m.mask_ratio
    model.config.fourier_loss_weight = m.fourier_loss_weight
    model.set_grad_checkpointing(m.grad_checkpointing)
    return model


@torch.no_grad()
def scratch_init(model: MAEModel, gain: float, seed: int) -> None:
    """From scratch: one random matrix [E, E] * gain / sqrt(E) as both the decoder cross-attention's query and key
    projection (see `MAESection.matched_attention_init`); the rest keeps the official init. Deterministic."""
    if gain <= 0:
        return
    attn = model.decoder.cross_attention
    E = attn.q.weight.shape[0]
    shared = torch.randn(E, E, generator=torch.Generator().manual_seed(seed)) * gain / E**0.5
    attn.q.weight.copy_(shared)
    attn.kv.weight[:E].copy_(shared)  # kv = [k; v]


class MAETrainer(torch.nn.Module):
    """The MAE with its loss as forward (what DDP wraps): (uint8 sites, masking noise) -> loss."""

    def __init__(self, mae: MAEModel):
        super().__init__()
        self.mae = mae

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.mae.forward_loss(x, noise)[0]


def core(module: torch.nn.Module) -> MAEModel:
    """The MAEModel under DDP and the trainer wrapper."""
    return unwrap(module).mae


def mask_noise(batch: int, channels: int, tokens: int, p_channel: float, generator: torch.Generator) -> torch.Tensor:
    """Masking noise [B, channels * tokens] (the lowest values are kept): uniform, and for a fraction p_channel of
    sites one random channel's tokens pushed above every other, so that channel is masked whole."""
    noise = torch.rand(batch, channels * tokens, generator=generator)
    whole = torch.rand(batch, generator=generator) < p_channel
    channel = torch.randint(channels, (batch,), generator=generator)
    for i in torch.nonzero(whole).flatten().tolist():
        c = int(channel[i])
        noise[i, c * tokens:(c + 1) * tokens] += 1.0
    return noise


def build_optimizer(model: torch.nn.Module, cfg: PretrainConfig):
    """timm's AdamW (no decay on biases, norms, tokens) and its warmup + cosine schedule on training progress in
    SCHEDULE_UNITS per epoch (as fine-tuning's: an elastic group with fewer workers follows the same curve)."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler

    t = cfg.train
    optimizer = create_optimizer_v2(model, "adamw", lr=t.lr, weight_decay=t.weight_decay, betas=(0.9, 0.95))
    total = max(1, t.epochs * SCHEDULE_UNITS)
    scheduler = CosineLRScheduler(optimizer, t_initial=total, lr_min=t.min_lr, warmup_lr_init=t.lr * 0.01,
                                  warmup_t=min(int(t.warmup_epochs * SCHEDULE_UNITS), total - 1), t_in_epochs=False)
    return optimizer, scheduler


# ----------------------------------------------------------------------------------------------------------------
# One epoch, the held-out loss, the figures


def mae_step_loss(module, x: torch.Tensor, cfg: PretrainConfig, generator: torch.Generator) -> torch.Tensor:
    """The MAE loss of one batch of uint8 sites [B, M, H, W] under this batch's masking noise (`module`: an
    MAETrainer, under DDP or not)."""
    dec = core(module).config.decoder
    noise = mask_noise(len(x), dec.num_modalities, dec.tokens_per_modality, cfg.model.channel_mask_prob, generator)
    return module(x, noise.to(x.device))


def run_epoch(model, batches, optimizer, scheduler, cfg: PretrainConfig, device, epoch: int, epoch_sites: int,
              world: int, generator: torch.Generator):
    """One pass over this worker's shard: (mean loss, sites, seconds). The loss stays on the device until the end."""
    model.train()
    total, sites, start = torch.zeros((), device=device), 0, time.perf_counter()
    for batch in batches:
        x = batch["image"].to(device, non_blocking=True)
        with _maybe_no_sync(model, True), autocast(device, cfg.train.precision):
            loss = mae_step_loss(model, x, cfg, generator)
        loss.backward()
        if cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sites += len(x)
        scheduler.step_update(round((epoch + world * sites / epoch_sites) * SCHEDULE_UNITS))
        total += loss.detach() * len(x)
    return total.item() / max(sites, 1), sites, time.perf_counter() - start


@torch.no_grad()
def heldout_loss(model: MAETrainer, batches, cfg: PretrainConfig, device) -> float:
    """Mean MAE loss on the held-out plates under fixed masking (the same noise every epoch and every run)."""
    model.eval()
    generator = torch.Generator().manual_seed(cfg.train.seed + 10_000)
    total, sites = 0.0, 0
    for batch in batches:
        x = batch["image"].to(device)
        with autocast(device, cfg.train.precision):
            total += float(mae_step_loss(model, x, cfg, generator)) * len(x)
        sites += len(x)
    if not sites:
        raise RuntimeError("the validation plates produced no sites; check data.val_groups / the split")
    return total / sites


@torch.no_grad()
def reconstruction_figure(model: MAEModel, x: torch.Tensor, channels: list[str], seed: int):
    """Per site and channel: the input, what the encoder saw (masked patches grey) and the reconstruction, all
    in self-standardized units."""
    from camae.plots import plt

    model.eval()
    p, dec = model.config.encoder.patch_size, model.config.decoder
    noise = mask_noise(len(x), dec.num_modalities, dec.tokens_per_modality, 0.0,
                       torch.Generator().manual_seed(seed))
    _, recon, mask = model(x, noise)
    xn = normalize_images(x)
    seen = unpatchify(patchify(xn, p) * (1 - mask[..., None]), p, len(channels))
    out = unpatchify(recon.float(), p, len(channels))
    rows = [(f"site {i}: {what}", img[i]) for i in range(len(x)) for what, img in
            (("input", xn), ("masked", seen), ("reconstruction", out))]
    fig, axes = plt.subplots(len(rows), len(channels), figsize=(1.6 * len(channels), 1.6 * len(rows)), squeeze=False)
    for r, (label, img) in enumerate(rows):
        for c, name in enumerate(channels):
            axes[r, c].imshow(img[c].cpu().numpy(), cmap="gray", vmin=-2, vmax=3)
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            if r == 0:
                axes[r, c].set_title(name, fontsize=8)
        axes[r, 0].set_ylabel(label, fontsize=7)
    fig.tight_layout()
    return fig


@torch.no_grad()
def missing_stain_figure(model: MAEModel, x: torch.Tensor, channels: list[str], withheld: int):
    """One channel withheld and predicted from the others (`predict_missing_channels`), per site: the true stain,
    the prediction, and both errors' MSE against predicting the channel mean (0 in these units)."""
    from camae.plots import plt

    model.eval()
    true = normalize_images(x)[:, withheld]
    pred = model.predict_missing_channels(x, [withheld])[:, 0]
    fig, axes = plt.subplots(len(x), 2, figsize=(4, 2 * len(x)), squeeze=False)
    for i in range(len(x)):
        mse = float(((pred[i] - true[i]) ** 2).mean())
        for j, (title, img) in enumerate(((f"{channels[withheld]} (true)", true[i]),
                                          (f"predicted, MSE {mse:.2f} (mean: {float((true[i] ** 2).mean()):.2f})",
                                           pred[i]))):
            axes[i, j].imshow(img.cpu().numpy(), cmap="gray", vmin=-2, vmax=3)
            axes[i, j].set_title(title, fontsize=7)
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
    fig.tight_layout()
    return fig


def log_figures(model: MAEModel, x: torch.Tensor, cfg: PretrainConfig, config: dict, epoch: int) -> None:
    """Both figures into the MLflow run: figures/reconstruction_epoch<e>.png, figures/missing_<stain>_epoch<e>.png."""
    from mlflow.tracking import MlflowClient

    from camae.plots import plt

    client = MlflowClient(config["tracking_uri"])
    withheld = len(cfg.data.channels) - 1
    for name, fig in ((f"reconstruction_epoch{epoch:03d}.png",
                       reconstruction_figure(model, x, cfg.data.channels, cfg.train.seed)),
                      (f"missing_{cfg.data.channels[withheld]}_epoch{epoch:03d}.png",
                       missing_stain_figure(model, x, cfg.data.channels, withheld))):
        try:
            client.log_figure(config["run_id"], fig, f"figures/{name}")
        except Exception as err:  # noqa: BLE001 -- a tracking outage must not stop training
            log.warning("could not log %s (%s)", name, err)
        plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# The Ray Train worker


def pretrain_fn_per_worker(config: dict) -> None:
    """Runs in every Ray Train worker: build (or resume) the MAE, train on this worker's shard, and on rank 0
    measure the held-out loss, draw the figures and checkpoint; report every epoch. `config`: the resolved
    PretrainConfig ("cfg"), the MLflow run, training sites per epoch, the driver's run_dir and the shared state
    location (see `finetune.worker.train_fn_per_worker`)."""
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    from camae.tracking import MetricBuffer

    cfg = from_dict(PretrainConfig, config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    in_process = cfg.run.num_workers == 0
    torch.manual_seed(cfg.train.seed)
    device = ray.train.torch.get_device() if world > 1 or cfg.run.use_gpu else torch.device("cpu")
    model = MAETrainer(build_mae(cfg))
    optimizer, scheduler = build_optimizer(model, cfg)
    start_epoch, step = resume(model.mae, optimizer, scheduler)  # checkpoints hold the MAEModel's state
    _tag_placement(config, rank, world, start_epoch)
    # the encoder's final norm is not on the MAE path (as in the official model): DDP must not wait for it
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True}) \
        if world > 1 else model.to(device)
    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
    val_batches = lambda: val_shard.iter_torch_batches(batch_size=cfg.train.batch_size)  # noqa: E731
    tracker = MetricBuffer(config["tracking_uri"], config["run_id"]) if in_process else None
    monitor = _system_metrics(config, resume=start_epoch > 0) if rank == 0 else None
    figure_sites = None
    if rank == 0:
        figure_sites = next(iter(val_batches()))["image"][:cfg.train.figure_sites].to(device)
        if start_epoch == 0:  # the starting point, for "clearly below the untrained model"
            untrained = heldout_loss(unwrap(model), val_batches(), cfg, device)
            _log_start(config, tracker, untrained)
    generator = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + rank)
    for epoch in range(start_epoch, cfg.train.epochs):
        if rank == 0:
            _maybe_inject_fault(cfg, epoch, config["state_dir"])
        generator.manual_seed(cfg.train.seed * 1_000_003 + 7919 * epoch + rank)  # resumable masking
        batches = train_shard.iter_torch_batches(
            batch_size=cfg.train.batch_size, prefetch_batches=cfg.train.prefetch_batches,
            pin_memory=device.type == "cuda", local_shuffle_buffer_size=4 * cfg.train.batch_size,
            local_shuffle_seed=cfg.train.seed + epoch)
        loss, sites, seconds = run_epoch(model, batches, optimizer, scheduler, cfg, device, epoch,
                                         config["train_sites"], world, generator)
        step += 1
        metrics = {"epoch": epoch + 1, "train/loss": loss, "train/images_per_s": sites * world / seconds,
                   "lr": optimizer.param_groups[0]["lr"], "workers": world}
        ckpt_dir = None
        if rank == 0:
            metrics["val/loss"] = heldout_loss(unwrap(model), val_batches(), cfg, device)
            if (epoch + 1) % cfg.train.figure_every == 0 or epoch + 1 == cfg.train.epochs:
                log_figures(core(model), figure_sites, cfg, config, epoch + 1)
            base = Path(config["run_dir"]) / "checkpoints" if in_process else Path(tempfile.mkdtemp())
            ckpt_dir = _write_checkpoint(base, core(model), optimizer, scheduler, epoch, step, metrics, [])
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None)
        if tracker is not None:
            tracker.log(metrics, step=epoch + 1)
        if rank == 0:
            if in_process:
                prune_local_checkpoints(cfg, Path(config["run_dir"]))
            else:
                shutil.rmtree(Path(ckpt_dir).parent, ignore_errors=True)
    if tracker is not None:
        tracker.flush()
    if monitor is not None:
        monitor.finish()


def _log_start(config: dict, tracker, untrained: float) -> None:
    """val/loss_untrained (step 0): the held-out loss of the starting weights."""
    from camae.tracking import log_metrics

    if tracker is not None:
        tracker.log({"val/loss_untrained": untrained}, step=0)
        return
    try:
        log_metrics(config["tracking_uri"], config["run_id"], {"val/loss_untrained": untrained}, step=0)
    except Exception as err:  # noqa: BLE001 -- a tracking outage must not stop training
        log.warning("could not log val/loss_untrained (%s)", err)

