"""Typed experiment configuration: one YAML per experiment, `--set a.b=c` overrides, unknown keys are errors.

Each section is a dataclass with a docstring per field (LitGPT style). `load_config(Cls, path, overrides)`
reads YAML into it, checking every key and type and naming the bad one; `save_config` writes the resolved
config that runs keep beside their outputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config a run cannot use; the message names the key and the fix."""


# ----------------------------------------------------------------------------------------------------------------
# Sections


@dataclass
class DataConfig:
    """Where a dataset lives, how its table is read, split and decoded."""

    format: Literal["rxrx1", "jump", "manifest", "packed", "rxrx3_core"] = "rxrx1"
    """Layout: "rxrx1" (metadata.csv + images/{experiment}/Plate{plate}/{well}_s{site}_w{n}.png), "jump" (a
    JUMP load_data CSV/Parquet with FileName_Orig*/PathName_Orig* columns), "manifest" (any CSV/Parquet
    whose columns the fields below name), "packed" (Parquet shards written by `camae pack`: uint8 sites with
    their metadata; labels, plates and controls are as packed) or "rxrx3_core" (RxRx3-core as published:
    metadata_rxrx3_core.csv + data/*.parquet with one JPEG 2000 channel image per row)."""
    root: str = "data/synthetic"
    """rxrx1 / rxrx3_core: the dataset directory. jump/manifest: the table file (CSV or Parquet); relative image
    paths in it are resolved against the table's directory. packed: the directory `camae pack` wrote. packed and
    rxrx3_core also take an object-store URI (s3://bucket/prefix)."""
    channels: list[str] = field(default_factory=lambda: ["nuclei", "er", "actin", "rna", "mito", "golgi"])
    """Channels to load, by name, in the order the model sees them. rxrx1 names: nuclei er actin rna mito
    golgi (w1..w6); jump names: the suffix of FileName_Orig<name> (DNA ER RNA AGP Mito); manifest: keys of
    channel_columns."""
    channel_columns: dict[str, str] = field(default_factory=dict)
    """manifest only: channel name -> column holding that channel's image path."""
    image_column: str | None = None
    """manifest only, instead of channel_columns: a column with one multi-channel file per site (a TIFF stack,
    [C, H, W] or [H, W, C])."""
    file_channels: list[str] = field(default_factory=list)
    """With image_column: the names of the planes in each file, in file order (channels picks among them)."""
    label_column: str = "sirna"
    """Column with the perturbation label (rxrx1: sirna; jump: e.g. Metadata_JCP2022 after joining the plate
    map)."""
    control_column: str = "well_type"
    """Column that marks control wells."""
    control_values: list[str] = field(default_factory=lambda: ["negative_control"])
    """Values of control_column that mean "control" (the wells batch correction is fitted on)."""
    plate_column: str = "plate"
    """jump/manifest: plate column (jump: Metadata_Plate)."""
    well_column: str = "well"
    """jump/manifest: well column (jump: Metadata_Well)."""
    site_column: str = "site"
    """jump/manifest: site column (jump: Metadata_Site)."""
    batch_column: str | None = "experiment"
    """Column naming the batch (experiment) of a plate; None: each plate is its own batch."""
    extra_columns: list[str] = field(default_factory=list)
    """Further metadata columns carried through to outputs."""
    split_by: str = "plate"
    """Column the split groups by: all images of one group land in the same split (never split by image)."""
    val_groups: list[str] = field(default_factory=list)
    """Groups (e.g. plates) for validation; empty: val_fraction of the groups, drawn with seed."""
    test_groups: list[str] = field(default_factory=list)
    """Groups for test; empty: test_fraction of the groups, drawn with seed."""
    val_fraction: float = 0.25
    """Fraction of groups for validation when val_groups is empty."""
    test_fraction: float = 0.25
    """Fraction of groups for test when test_groups is empty."""
    seed: int = 0
    """Seed of the group split and of the synthetic generator's defaults."""
    crop_size: int = 256
    """Side of the crops fed to the model (the encoder's positions are valid at 256)."""
    eval_crop: Literal["center", "tile"] = "center"
    """Evaluation: one centre crop per site, or every non-overlapping crop_size tile (aggregate per site)."""
    channel_dropout: float = 0.0
    """Training only: probability that each channel is zeroed (at least one is always kept); the encoder is
    channel-agnostic, so this teaches robustness to missing stains."""
    uint16_mapping: Literal["percentile", "minmax", "shift"] = "percentile"
    """How 16-bit images become uint8: per-image per-channel percentile clipping, min-max, or a bit shift."""
    percentiles: list[float] = field(default_factory=lambda: [0.1, 99.9])
    """Low and high percentile for uint16_mapping=percentile."""
    source_bits: int = 16
    """Bits used by the camera, for uint16_mapping=shift (12-bit data: shift by 4)."""
    on_error: Literal["raise", "skip"] = "raise"
    """A missing, unreadable or inconsistent image: stop with an error naming it, or skip the site, count it
    and report it (the skipped sites are written to skipped.jsonl beside the run's outputs)."""
    jp2_decoder: Literal["pillow", "imagecodecs"] = "pillow"
    """rxrx3_core: the JPEG 2000 decoder. Both wrap OpenJPEG and decode the same pixels; imagecodecs (pip install
    imagecodecs) measured 1.1x Pillow per core (README, performance)."""
    decode_batch_size: int = 32
    """Sites per Ray Data decode task (packed data: one row group per task, its size set by `camae pack`). Best
    equal to the consumer's batch size: re-batching blocks of another size costs a copy (measured: 16 into 32 ran
    at 0.7x of 32 into 32)."""


@dataclass
class SynthConfig:
    """Size and difficulty of the synthetic dataset."""

    layout: Literal["rxrx1", "rxrx3_core"] = "rxrx1"
    """Files written: RxRx1 (metadata.csv + one PNG per channel) or RxRx3-core as published (metadata_rxrx3_core.csv
    + data/train-*.parquet shards of JPEG 2000 channel images, one site per well, gene and compound experiments)."""
    experiments: int = 2
    """Experiments (batches); each has its own shift on top of per-plate effects."""
    plates_per_experiment: int = 2
    """Plates per experiment, numbered 1.. as in RxRx1."""
    wells_per_plate: int = 30
    """Wells used per plate (filled row-major on a 16x24 plate)."""
    controls_per_plate: int = 6
    """Negative-control wells per plate (well_type negative_control, sirna EMPTY)."""
    classes: int = 4
    """Perturbation classes; every plate holds each of them in (wells - controls) / classes wells."""
    sites_per_well: int = 2
    """Imaged sites per well."""
    size: int = 256
    """Image side in pixels."""
    cells_per_site: float = 22.0
    """Mean number of cells per site (Poisson)."""
    effect_size: float = 1.0
    """Class effect in units of the per-cell trait spread (1: a cell's own variation is as large)."""
    batch_effect: float = 1.0
    """Scale of the plate and experiment effects (0: none)."""
    seed: int = 0
    """Seed of everything."""
    workers: int = 0
    """Processes that render sites; 0: one per CPU."""


@dataclass
class EncoderSpec:
    """The encoder a job starts from. One definition for fine-tuning (`model.encoder`), embedding and probes
    (`embed.encoder`) and a sweep's baseline (its fine-tunes' spec, copied whole); its identity
    (`camae.identity.encoder_identity`) keys embeddings and baselines."""

    checkpoint: str | None = None
    """An OpenPhenom directory (config.json + model.safetensors) or a camae export. None: random weights, with a
    loud warning (smoke runs only)."""
    embed_dim: int = 384
    """Random weights only: encoder width (the published model: 384)."""
    depth: int = 12
    """Random weights only: encoder blocks."""
    num_heads: int = 6
    """Random weights only: attention heads."""
    seed: int = 0
    """Random weights only: the seed they are drawn with (the same spec gives the same encoder in every job)."""
    bias_routing: Literal["legacy", "modern"] | None = None
    """Override the checkpoint's bias routing (default: what the checkpoint says, legacy for OpenPhenom)."""


@dataclass
class ModelConfig:
    """The encoder to fine-tune and the classification head on top."""

    encoder: EncoderSpec = field(default_factory=EncoderSpec)
    """The encoder fine-tuning starts from."""
    pool: Literal["avg", "cls"] = "avg"
    """Embedding pooled for the head: mean of patch tokens (as `predict`) or the cls token."""
    head_norm: bool = True
    """BatchNorm1d (no affine) on the pooled embedding before the head, MAE's linear-probe recipe: embeddings of
    any scale then train with one learning rate."""
    head_dropout: float = 0.0
    """Dropout before the linear head."""
    drop_path_rate: float = 0.1
    """Stochastic depth of the encoder's last block during fine-tuning (linear over blocks)."""
    grad_checkpointing: bool = False
    """Recompute encoder blocks in backward (less activation memory, about 30% more compute)."""


@dataclass
class LoraSection:
    """LoRA adapters (peft) for mode=lora."""

    r: int = 8
    """Adapter rank."""
    alpha: int = 16
    """Adapter scaling numerator (scale = alpha / r)."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    targets: list[Literal["in_proj", "attn_out_proj", "mlp_out_proj", "patch_embed"]] = field(
        default_factory=lambda: ["in_proj", "attn_out_proj", "mlp_out_proj"])
    """Modules that get adapters: each block's fused input projection (qkv + MLP in), attention and MLP output
    projections, and the shared patch embedding."""


@dataclass
class TrainConfig:
    """Optimization."""

    mode: Literal["linear", "lora", "full"] = "lora"
    """linear: encoder frozen, head trained; lora: adapters + head; full: everything, with layer-wise LR decay."""
    epochs: int = 10
    """Passes over the training plates."""
    batch_size: int = 32
    """Images per optimizer step per worker (before accumulation)."""
    lr: float = 1e-3
    """Peak learning rate (of the head; encoder layers get lr * layer_decay^depth-from-top in mode=full)."""
    min_lr: float = 1e-6
    """Learning rate at the end of the cosine schedule."""
    warmup_epochs: float = 1.0
    """Linear warmup length, in epochs."""
    weight_decay: float = 0.05
    """AdamW weight decay (not applied to biases, norms and tokens)."""
    layer_decay: float = 0.75
    """mode=full: learning-rate decay per encoder block from the top (1 = none)."""
    grad_clip: float | None = 1.0
    """Clip the global gradient norm to this (None: no clipping)."""
    accumulate: int = 1
    """Micro-batches per optimizer step."""
    prefetch_batches: int = 4
    """Batches Ray Data prepares ahead of the training step (decoded, collated, pinned and copied to the GPU in a
    background thread), so the device never waits on the host between steps."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 autocast on GPU, fp32 on CPU."""
    seed: int = 0
    """Seed of weights, adapters and data order."""
    lora: LoraSection = field(default_factory=LoraSection)
    """LoRA settings (mode=lora)."""


@dataclass
class RunSection:
    """Where and how the job runs."""

    name: str = "finetune"
    """Run name: outputs go to output_dir/name."""
    output_dir: str = "outputs"
    """Root of run outputs (checkpoints, exports, the default MLflow store)."""
    storage_path: str | None = None
    """Ray Train storage: checkpoints (and, for a URI, the export) go to storage_path/name. A local path, an NFS
    path mounted on every node, or a URI pyarrow understands (s3://bucket/runs, gs://...; endpoint and credentials
    from the AWS_* variables of the job's runtime env, or in the URI's query). On a multi-node cluster a path some
    node cannot read is refused before training. Default: output_dir/ray (single machine)."""
    num_workers: int = 0
    """Ray Train workers; 0 runs the loop in this process (quick runs), >1 trains with DDP."""
    min_workers: int | None = None
    """Elastic training: with a node lost, go on with as few as this many workers (Ray Train's
    ScalingConfig(num_workers=(min_workers, num_workers))); None: always num_workers (a restart waits for them)."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """How workers are placed on nodes (a Ray placement group strategy); STRICT_SPREAD: one worker per node."""
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    """Extra Ray resources each worker needs besides its CPUs (and GPU), e.g. {trainer: 1} to pin workers to
    nodes started with `--resources '{"trainer": 1}'`."""
    cpus_per_worker: int = 1
    """CPUs per training worker; leave some for Ray Data's decoding."""
    use_gpu: bool = False
    """One GPU per worker."""
    keep_checkpoints: int = 2
    """Best checkpoints kept, by checkpoint_metric."""
    checkpoint_metric: str = "val/accuracy"
    """Metric that ranks checkpoints and picks the exported model."""
    checkpoint_mode: Literal["max", "min"] = "max"
    """Whether a higher or lower checkpoint_metric is better."""
    max_failures: int = 0
    """Worker-group restarts Ray Train allows; a restarted run resumes from its last checkpoint."""
    fault_injection_epoch: int | None = None
    """Testing recovery: kill the rank-0 worker process once, during the epoch after this one (once this
    epoch's checkpoint is committed); the restarted run must resume at the next epoch."""


@dataclass
class TrackingConfig:
    """MLflow."""

    tracking_uri: str | None = None
    """MLflow tracking URI; None: $MLFLOW_TRACKING_URI, else sqlite:///<output_dir>/mlflow.db (made absolute)."""
    experiment: str = "camae"
    """MLflow experiment; fine-tunes, sweeps and probes share one so the comparison view lines them up."""
    run_name: str | None = None
    """MLflow run name; default: run.name."""
    log_model: bool = True
    """Log the fine-tuned classifier as an MLflow model (plus the official-format export as artifacts)."""


@dataclass
class FinetuneConfig:
    """A fine-tuning experiment: one YAML in configs/finetune/."""

    data: DataConfig = field(default_factory=DataConfig)
    """The dataset and its split."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Encoder and head."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimization."""
    run: RunSection = field(default_factory=RunSection)
    """Workers, outputs, checkpoints."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow."""
    synth: SynthConfig | None = None
    """If set and data.root holds no dataset yet, write these synthetic plates there first (the embedded
    default, so a fresh checkout runs)."""


@dataclass
class EmbedConfig:
    """Embedding plates with a frozen encoder (`camae embed`), streamed by Ray Data through an actor pool."""

    encoder: EncoderSpec = field(default_factory=EncoderSpec)
    """The encoder (an OpenPhenom directory, a camae export, or random weights for smoke runs)."""
    output: str | None = None
    """Parquet directory or URI (s3://...); default: run.output_dir/run.name/embeddings."""
    channelwise: bool = False
    """Also store the channel-wise embedding (one D-vector per channel, concatenated) as `embedding_channelwise`."""
    blocks: bool = True
    """Also store every encoder block's pooled output as `embedding_blocks` [depth * D] (for per-block probes)."""
    batch_size: int = 32
    """Crops per model call."""
    sites_per_file: int = 512
    """Sites per output Parquet file: the unit of resumption (finished files are skipped on a rerun)."""
    actors: int = 0
    """Model replicas in the actor pool; 0: one per GPU when the cluster has GPUs, else one."""
    use_gpu: Literal["auto", "yes", "no"] = "auto"
    """One GPU per actor: auto uses them when the cluster has any."""
    threads: int = 0
    """CPU only: torch threads per actor; 0: the node's CPUs divided among the actors (decoding is light next to
    the model, so the actors use the cores Ray Data's decode tasks leave idle)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 autocast on GPU, fp32 on CPU (embeddings are stored as float32 either way)."""


@dataclass
class CorrectionConfig:
    """Batch correction of embeddings (evaluation.batch_correction), fitted on controls."""

    methods: list[Literal["raw", "pca_centerscale", "tvn", "harmony"]] = field(
        default_factory=lambda: ["raw", "pca_centerscale", "tvn", "harmony"])
    """Embeddings evaluated: uncorrected, PCA-CenterScale (the model card's recipe), Typical Variation
    Normalization (exactly EFAAR's tvn_on_controls, on the PCA-CenterScale output) and Harmony (harmonypy, on the
    PCA-CenterScale output)."""
    by: Literal["batch", "plate"] = "plate"
    """Unit of the per-batch StandardScaler, TVN's CORAL step and Harmony's batch variable: the data's batch column,
    or each plate (the default of `camae evaluate` and of a sweep's baseline alike)."""
    n_components: int | None = None
    """PCA components; None: as many as the fitting controls allow (min(controls - 1, D))."""
    fit_on: Literal["train", "all"] = "train"
    """Plates whose controls fit the PCA and the whitening: the training split (no test plate leaks into the
    fitted projection), or all plates. The per-batch scalers always use each batch's own controls (labels play no
    part in them)."""
    coral: bool = True
    """TVN: end with EFAAR's per-batch CORAL step, X_b @ (C_b + 0.5 I)^(-1/2) with C_b the covariance of the batch's
    controls (tvn_on_controls with batch_col); false: tvn_on_controls without it."""


@dataclass
class ProbeConfig:
    """Frozen-embedding probes: the baselines every fine-tune is compared with."""

    kinds: list[Literal["logistic", "knn"]] = field(default_factory=lambda: ["logistic", "knn"])
    """scikit-learn LogisticRegression on standardized embeddings, and a cosine kNN classifier."""
    C: float = 1.0
    """Inverse L2 strength of the logistic regression."""
    max_iter: int = 1000
    """Logistic regression iterations."""
    k: int = 5
    """Neighbours of the kNN probe."""
    per_block: bool = True
    """Also fit the logistic probe on each encoder block's pooled output (needs embed.blocks)."""
    per_block_correction: Literal["raw", "pca_centerscale", "tvn", "harmony"] = "pca_centerscale"
    """Correction applied before the per-block probes."""


@dataclass
class BiologyConfig:
    """Biology metrics on well-level profiles."""

    replicate_map: bool = True
    """Mean average precision of retrieving a perturbation's replicate wells against control wells (copairs)."""
    null_size: int = 10000
    """Random rankings in the null distribution of average precision."""
    fdr: float = 0.05
    """Benjamini-Hochberg threshold on mAP p-values: a perturbation below it is "retrieved"."""
    relationships: str | None = None
    """CSV of known related pairs (columns perturbation_a, perturbation_b); default: relationships.csv in
    data.root when it exists (the synthetic generator writes one)."""
    recall_thresholds: list[list[float]] = field(default_factory=lambda: [[0.05, 0.95], [0.1, 0.9]])
    """EFAAR's known-relationship recall threshold pairs (left, right): a known pair is recalled when its cosine
    similarity ranks at or below `left` or at or above `right` of all perturbation pairs (bio/recall_<l>_<r>)."""
    consistency: bool = True
    """Phenotypic consistency (copairs): mAP of perturbations retrieving those that share an annotation group (the
    connected groups of the known relationships)."""
    batch_effect: bool = True
    """How well the plate is predicted from control embeddings (cross-validated logistic regression)."""
    channel_leave_one_out: bool = True
    """Re-embed with each channel left out in turn and repeat the logistic probe and mAP (slow: one embedding
    pass per channel)."""
    loo_correction: Literal["raw", "pca_centerscale", "tvn", "harmony"] = "pca_centerscale"
    """Correction used for the leave-one-out metrics."""


@dataclass
class OutputSection:
    """Where an evaluation writes."""

    name: str = "evaluate"
    """Run name: outputs go to output_dir/name."""
    output_dir: str = "outputs"
    """Root of outputs (and of the default MLflow store)."""
    plots: bool = True
    """Write and log the plots (confusion, 2-D projections, per-block curve)."""


@dataclass
class MAESection:
    """The masked autoencoder pretraining continues (or starts): masking, loss and, from scratch, the decoder."""

    encoder: EncoderSpec = field(default_factory=EncoderSpec)
    """The encoder to start from: an OpenPhenom directory (its decoder comes with it) or random weights of the
    spec's dims (with a fresh decoder of the decoder_* dims below)."""
    decoder_dim: int = 32
    """From scratch only: decoder width (OpenPhenom's: 512)."""
    decoder_depth: int = 1
    """From scratch only: decoder blocks per channel."""
    decoder_heads: int = 2
    """From scratch only: decoder attention heads."""
    matched_attention_init: float = 1.5
    """From scratch only: the gain of one random matrix drawn as both the query and the key projection of the
    decoder's cross-attention, so every token starts attending to tokens at its own and nearby positions (0:
    independent draws). The official decoder has no residual around that cross-attention: with independent draws
    at small widths its attention stays uniform, every masked token gets the same input and the loss sits at the
    targets' variance for hundreds of steps (measured: 0.985 after 300 steps, against 0.72 after 200 with it)."""
    mask_ratio: float = 0.75
    """Fraction of patch tokens masked (over all channels); the loss is on those."""
    fourier_loss_weight: float = 0.0
    """w in (1 - w) * MSE + w * Fourier: the Fourier term is the L1 distance of each patch's |FFT2|."""
    channel_mask_prob: float = 0.0
    """Per site, the probability that one random channel is masked whole, so the decoder learns to predict a
    missing stain from the others (the model card's third use)."""
    grad_checkpointing: bool = False
    """Recompute encoder blocks in backward (less activation memory, about 30% more compute)."""


@dataclass
class PretrainTrainSection:
    """Optimization of the MAE (timm's AdamW, warmup then cosine)."""

    epochs: int = 10
    """Passes over the training plates."""
    batch_size: int = 32
    """Sites per optimizer step per worker."""
    lr: float = 1.5e-4
    """Peak learning rate."""
    min_lr: float = 1e-6
    """Learning rate at the end of the cosine schedule."""
    warmup_epochs: float = 1.0
    """Linear warmup length, in epochs."""
    weight_decay: float = 0.05
    """AdamW weight decay (not applied to biases, norms and tokens)."""
    grad_clip: float | None = 1.0
    """Clip the global gradient norm to this (None: no clipping)."""
    prefetch_batches: int = 4
    """Batches Ray Data prepares ahead of the training step."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 autocast on GPU, fp32 on CPU."""
    seed: int = 0
    """Seed of masking and data order."""
    figure_every: int = 2
    """Log the reconstruction and missing-stain figures every this many epochs (and after the last)."""
    figure_sites: int = 2
    """Held-out sites shown in the figures (always the same ones)."""


@dataclass
class PretrainRunSection(RunSection):
    """Where and how pretraining runs: RunSection, with checkpoints ranked by the held-out loss."""

    name: str = "pretrain"
    """Run name: outputs go to output_dir/name."""
    checkpoint_metric: str = "val/loss"
    """Metric that ranks checkpoints and picks the exported model (the held-out reconstruction loss)."""
    checkpoint_mode: Literal["max", "min"] = "min"
    """Whether a higher or lower checkpoint_metric is better."""


@dataclass
class PretrainConfig:
    """Continued MAE pretraining on unlabeled plates: one YAML in configs/pretrain/."""

    data: DataConfig = field(default_factory=DataConfig)
    """The plates (labels, if any, are ignored); validation plates give the held-out reconstruction loss."""
    model: MAESection = field(default_factory=MAESection)
    """Where pretraining starts, masking and loss."""
    train: PretrainTrainSection = field(default_factory=PretrainTrainSection)
    """Optimization."""
    run: PretrainRunSection = field(default_factory=PretrainRunSection)
    """Workers, outputs, checkpoints (ranked by val/loss, lowest first, also when the YAML has a run section)."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow."""
    synth: SynthConfig | None = None
    """If set and data.root holds no dataset yet, write these synthetic plates there first."""


@dataclass
class EvaluateConfig:
    """An evaluation: embed, correct, probe, measure. One YAML in configs/evaluate/ (also read by `camae embed`)."""

    data: DataConfig = field(default_factory=DataConfig)
    """The dataset and its split (the same keys as fine-tuning, so splits match)."""
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    """The encoder and the embedding pass."""
    correction: CorrectionConfig = field(default_factory=CorrectionConfig)
    """Batch correction."""
    probes: ProbeConfig = field(default_factory=ProbeConfig)
    """Classification probes."""
    biology: BiologyConfig = field(default_factory=BiologyConfig)
    """Replicate, relationship, batch and channel metrics."""
    run: OutputSection = field(default_factory=OutputSection)
    """Outputs."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow (log_model is unused here)."""
    synth: SynthConfig | None = None
    """If set and data.root holds no dataset yet, write these synthetic plates there first."""


@dataclass
class SchedulerSection:
    """Early stopping of sweep trials."""

    kind: Literal["asha", "none"] = "asha"
    """ASHA (asynchronous successive halving) or none (every trial runs all epochs)."""
    grace_period: int = 2
    """ASHA: epochs every trial runs before it may be stopped."""
    reduction_factor: float = 2.0
    """ASHA: the fraction 1/reduction_factor of trials is promoted at each rung."""


@dataclass
class BaselineSection:
    """The frozen-embedding probe baseline a sweep is compared with."""

    enabled: bool = True
    """Run (or reuse) the baseline probes on the sweep's split."""
    config: str | None = None
    """An evaluate YAML for the baseline (its data section is replaced by the sweep's); None: the defaults with
    the sweep's encoder, all three corrections, biology metrics off."""
    reuse: bool = True
    """Reuse a finished baseline in the MLflow experiment with the same split, encoder and probe settings."""
    set: list[str] = field(default_factory=list)
    """Further `key=value` overrides of the baseline's evaluate config."""


@dataclass
class SweepSection:
    """The search."""

    search_space: dict[str, Any] = field(default_factory=dict)
    """Finetune config key -> distribution, e.g. `train.lr: {loguniform: [1e-4, 1e-2]}`; kinds: choice, grid,
    uniform, loguniform, randint; a plain value fixes the key."""
    num_samples: int = 1
    """Samples drawn from the space (grid keys are crossed with every sample)."""
    metric: str = "val/accuracy"
    """Metric trials are ranked and stopped by."""
    mode: Literal["max", "min"] = "max"
    """Whether higher or lower metric is better."""
    scheduler: SchedulerSection = field(default_factory=SchedulerSection)
    """Early stopping."""
    max_concurrent_trials: int = 0
    """Trials at once; 0: as many as the cluster's CPUs and GPUs hold, leaving CPUs for Ray Data."""
    seed: int = 0
    """Seed of the random search."""


@dataclass
class SweepConfig:
    """A Ray Tune sweep of fine-tunes: one YAML in configs/tune/."""

    base: str = "configs/finetune/quickstart.yaml"
    """The finetune YAML every trial starts from (relative paths: against the working directory)."""
    finetune: dict[str, Any] = field(default_factory=dict)
    """Overrides of the base config shared by all trials, as a nested mapping (checked like the base)."""
    sweep: SweepSection = field(default_factory=SweepSection)
    """The search space, its size, metric and scheduler."""
    baseline: BaselineSection = field(default_factory=BaselineSection)
    """The frozen-embedding probe baseline."""
    name: str = "sweep"
    """Sweep name: outputs go to <the base's run.output_dir>/name (rerunning resumes it)."""
    experiment: str | None = None
    """MLflow experiment; default: the base config's tracking.experiment."""
    register: bool = True
    """Register the best finished trial's MLflow model in the Model Registry under `name`, with the alias
    @champion (needs the trials' tracking.log_model, the default)."""


# ----------------------------------------------------------------------------------------------------------------
# Loading and saving


def from_dict(cls: type, data: dict | None, where: str = "") -> Any:
    """Build dataclass `cls` from a dict, checking keys and types; errors name the dotted key."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"'{where or cls.__name__}' must be a mapping of keys, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{where}{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key '{where}{key}'{hint}")
        kwargs[key] = _coerce(hints[key], value, f"{where}{key}")
    return cls(**kwargs)


def _coerce(tp, value, key: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, f"{key}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _coerce(next(a for a in args if a is not type(None)), value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"config key '{key}' is {value!r}; choose one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return {str(k): _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int | float | str) and not isinstance(value, bool):
        try:
            return float(value)  # also "2e-3", which YAML 1.1 reads as a string
        except ValueError:
            pass
    if tp is Any or (isinstance(tp, type) and isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        return value
    raise ConfigError(f"config key '{key}' must be {getattr(tp, '__name__', tp)}, got {value!r}")


def set_key(tree: dict, dotted: str, value) -> dict:
    """tree[a][b] = value for the dotted key "a.b", in place (missing sections are created); returns tree."""
    node = tree
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"'{part}' is not a section (setting '{dotted}')")
    node[leaf] = value
    return tree


def dotted_items(tree: dict, prefix: str = "") -> dict:
    """Nested dict -> {"a.b": value}; an empty mapping is a value, not a section."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out |= dotted_items(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b=c` overrides to a nested dict; values are parsed as YAML (`x=1e-4`, `x=[a, b]`)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.subkey=value")
        try:
            set_key(data, key, yaml.safe_load(raw))
        except ConfigError as err:
            raise ConfigError(f"override {item!r}: {err}") from err
    return data


def job_parser(prog: str, doc: str | None, configs: str) -> argparse.ArgumentParser:
    """The command line every job shares: --config (a YAML in configs/<configs>/; without it the quickstart there,
    said aloud), repeatable --set, and --verbose (Ray's own output in the terminal too)."""
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    quickstart = f"configs/{configs}/quickstart.yaml"
    parser.add_argument("--config", default=None, help=f"a YAML in configs/{configs}/ (default: {quickstart}, the "
                                                       "small synthetic run; never the full-size defaults)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--verbose", action="store_true", help="show Ray's worker, Train, Tune and Data output too "
                                                               "(otherwise in the Ray session's log files)")
    parser.set_defaults(quickstart=quickstart)
    return parser


def job_config(args: argparse.Namespace) -> str:
    """The config file a job runs: --config, else the quickstart of its kind (run from the repository root)."""
    if args.config:
        return args.config
    if not Path(args.quickstart).is_file():
        raise ConfigError(f"no --config given and {args.quickstart} is not here (run from the repository root, or "
                          "pass --config FILE)")
    print(f"[camae] no --config: running the quickstart, {args.quickstart}", flush=True)
    return args.quickstart


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | None = None) -> Any:
    """Read a YAML file (or nothing: the defaults) into `cls`, then apply overrides."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{p} is not valid YAML: {err}") from err
    return from_dict(cls, apply_overrides(data, list(overrides or [])))


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg, path: str | Path) -> Path:
    """Write the resolved config as YAML (what a run actually used)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return p
