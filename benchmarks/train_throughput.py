"""Images/s of the fine-tuning step: Ray Train end to end on packed shards against the model alone, with MFU.

- model only: forward + backward + optimizer step of the job's model (`finetune.worker.build_model`, mode full) on
  a uint8 batch already on the device, at the given batch and precision; variants: eager, timm AdamW with
  `fused=True` (CUDA), and `torch.compile`.
- Ray Train: one worker (one GPU when present; on CPU one core, and the model-only side then gets one thread
  too) running the job's `run_epoch` over `iter_torch_batches` of a `camae pack` dataset, pinned and prefetched
  as in the job; img/s of the epochs after the first.

MFU = img/s x FLOPs per image (counted by torch's FlopCounterMode on one forward + backward) / --peak-tflops.

    python benchmarks/train_throughput.py                          # CUDA if present; ViT-S/16, bf16
    python benchmarks/train_throughput.py --device cpu --encoder tiny --batch 16 --steps 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ENCODERS = {"tiny": (32, 2, 2), "vit_s16": (384, 12, 6)}
H100_BF16_DENSE_TFLOPS = 989.0


def job_config(args):
    from camae.config import FinetuneConfig, load_config

    dim, depth, heads = ENCODERS[args.encoder]
    precision = "bf16" if args.device == "cuda" else "fp32"
    return load_config(FinetuneConfig, None, [
        f"model.encoder.embed_dim={dim}", f"model.encoder.depth={depth}", f"model.encoder.num_heads={heads}",
        "train.mode=full", f"train.batch_size={args.batch}", f"train.precision={precision}",
        f"train.epochs={args.epochs}", "data.channels=[nuclei, er, actin, rna, mito, golgi]"])


def flops_per_image(cfg, device) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    from finetune.worker import autocast, build_model

    model, _ = build_model(cfg, 4)
    model.to(device).train()
    x = torch.randint(0, 256, (2, 6, 256, 256), dtype=torch.uint8, device=device)
    with FlopCounterMode(display=False) as counter:
        with autocast(device, cfg.train.precision):
            loss = model(x).float().sum()
        loss.backward()
    return counter.get_total_flops() / 2


def model_only(cfg, device, variant: str, steps: int) -> float:
    """img/s of forward + backward + step on one device-resident uint8 batch."""
    import torch.nn.functional as F
    from timm.optim import create_optimizer_v2

    from finetune.worker import autocast, build_model

    model, _ = build_model(cfg, 4)
    model.to(device).train()
    extra = {"fused": True} if variant == "fused" else {}
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-4, weight_decay=0.05, **extra)
    step_model = torch.compile(model) if variant == "compile" else model
    b = cfg.train.batch_size
    x = torch.randint(0, 256, (b, 6, 256, 256), dtype=torch.uint8, device=device)
    y = torch.randint(0, 4, (b,), device=device)

    def step():
        with autocast(device, cfg.train.precision):
            loss = F.cross_entropy(step_model(x).float(), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):  # warm-up (and compilation)
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return steps * b / (time.perf_counter() - start)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_fn(config: dict) -> None:
    """One Ray Train worker: the job's model, optimizer and epoch loop over the packed stream."""
    import ray.train
    import ray.train.torch

    from camae.config import FinetuneConfig, from_dict
    from finetune.worker import build_model, build_optimizer, run_epoch

    cfg = from_dict(FinetuneConfig, config["cfg"])
    device = ray.train.torch.get_device() if cfg.run.use_gpu else torch.device("cpu")
    model, _ = build_model(cfg, config["classes"])
    model.to(device)
    optimizer, scheduler = build_optimizer(model, cfg)
    shard, step, rates = ray.train.get_dataset_shard("train"), 0, []
    for epoch in range(cfg.train.epochs):
        batches = shard.iter_torch_batches(batch_size=cfg.train.batch_size, prefetch_batches=cfg.train.prefetch_batches,
                                           pin_memory=device.type == "cuda")
        _, n, seconds, step = run_epoch(model, batches, optimizer, scheduler, cfg, device, step, epoch, config["n"])
        rates.append(n / seconds)
    Path(config["out"]).write_text(json.dumps(rates))


def ray_train(cfg, args) -> list[float]:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from camae.config import DataConfig, SynthConfig, to_dict
    from camae.data import TRAIN_COLUMNS, LabelMap, build_dataset, read_table
    from camae.shards import pack
    from camae.synth import ensure_dataset

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    plates, packed = args.data / "plates", args.data / "packed"
    ensure_dataset(plates, SynthConfig(experiments=1, plates_per_experiment=max(1, args.sites // 60),
                                       wells_per_plate=30))
    if not (packed / "manifest.json").is_file():
        pack(DataConfig(root=str(plates)), str(packed), rows_per_group=args.batch)
    data = DataConfig(format="packed", root=str(packed))
    table = read_table(data).head(args.sites)
    labels = LabelMap.from_labels(table.label)
    ds = build_dataset(table, data, train=True, label_map=labels, columns=TRAIN_COLUMNS)
    cfg.run.use_gpu = args.device == "cuda"
    out = Path(tempfile.mkdtemp()) / "rates.json"
    with tempfile.TemporaryDirectory() as storage:
        TorchTrainer(train_fn, train_loop_config={"cfg": to_dict(cfg), "classes": len(labels), "n": len(table),
                                                  "out": str(out)},
                     scaling_config=ScalingConfig(num_workers=1, use_gpu=cfg.run.use_gpu,
                                                  resources_per_worker={"CPU": 1}),
                     run_config=RunConfig(name="train-throughput", storage_path=storage), datasets={"train": ds}).fit()
    return json.loads(out.read_text())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--encoder", default="vit_s16", choices=list(ENCODERS))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--sites", type=int, default=1920)
    parser.add_argument("--variants", nargs="+", choices=["eager", "compile", "fused"],
                        help="model-only variants (default: all three on CUDA, eager on CPU)")
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS)
    parser.add_argument("--data", type=Path, default=Path("/tmp/camae-train-throughput"))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # as the 1-CPU Ray Train worker gets (Ray sets OMP_NUM_THREADS=1): a fair pair
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    cfg = job_config(args)
    flops = flops_per_image(cfg, device)
    variants = args.variants or (["eager", "compile", "fused"] if device.type == "cuda" else ["eager"])
    rows = [{"loop": f"model only, {v}", "images_per_s": round(model_only(cfg, device, v, args.steps), 1)}
            for v in variants]
    rates = ray_train(cfg, args)
    rows.append({"loop": "Ray Train on packed shards, end to end", "images_per_s": round(statistics.median(
        rates[1:] or rates), 1)})
    base = rows[0]["images_per_s"]
    for r in rows:
        r["vs_model_eager"] = round(r["images_per_s"] / base, 3)
        r["mfu"] = round(r["images_per_s"] * flops / (args.peak_tflops * 1e12), 4) if device.type == "cuda" else None
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "encoder": args.encoder,
              "batch": args.batch, "precision": cfg.train.precision, "gflop_per_image": round(flops / 1e9, 1),
              "rows": rows}
    write(result, args.out, device.type)
    return result


def write(result: dict, out: Path, kind: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"train_throughput_{kind}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# train_throughput on {result['device']}: {result['encoder']}, batch {result['batch']}, "
             f"{result['precision']}, {result['gflop_per_image']} GFLOP per image (forward + backward)", "",
             "| loop | img/s | vs model-only eager | MFU |", "|---|---|---|---|"]
    for r in result["rows"]:
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        lines.append(f"| {r['loop']} | {r['images_per_s']} | **{r['vs_model_eager']}x** | {mfu} |")
    (out / f"train_throughput_{kind}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
