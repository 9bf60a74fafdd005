"""Steps/s of the Ray Train fine-tuning loop against a plain PyTorch loop, and the per-epoch cost of reporting.

Both run `finetune.worker.run_epoch` on the same model, batches and optimizer settings, single-threaded (one CPU
worker: Ray gives a 1-CPU worker one torch thread, so the plain loop gets one too). Images are decoded once up
front, so the comparison is about the training loop: Ray Train's worker, Ray Data's shard iterator and the
per-epoch `ray.train.report` with a checkpoint. Epoch 1 is warm-up; later epochs give the steady state.

    python benchmarks/train_step.py            # writes benchmarks/results/train_step.{json,md}
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from camae.config import FinetuneConfig, load_config  # noqa: E402

OVERRIDES = ["model.encoder.embed_dim=32", "model.encoder.depth=2", "model.encoder.num_heads=2", "train.mode=full",
             "train.lr=1e-3"]


def images_and_labels(n: int, channels: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Decoded synthetic sites (uint8 [n, C, 256, 256]) and labels, from camae's own generator."""
    from camae.config import DataConfig, SynthConfig
    from camae.data import LabelMap, load_site, read_table
    from camae.synth import generate

    root = Path(tempfile.gettempdir()) / f"camae-train-step-{n}"
    if not (root / "metadata.csv").is_file():
        generate(root, SynthConfig(plates_per_experiment=max(1, n // 120), experiments=1, seed=seed))
    cfg = DataConfig(root=str(root), channels=["nuclei", "er", "actin", "rna", "mito", "golgi"][:channels])
    table = read_table(cfg).iloc[:n]
    images = np.stack([load_site(r, cfg) for r in table.to_dict("records")])
    return images, LabelMap.from_labels(table.label).encode(table.label)


def epochs_plain(cfg: FinetuneConfig, images: np.ndarray, labels: np.ndarray, classes: int) -> list[dict]:
    from finetune.worker import build_model, build_optimizer, run_epoch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    b = cfg.train.batch_size
    model, _ = build_model(cfg, classes)
    optimizer, scheduler = build_optimizer(model, cfg)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    rows, step = [], 0
    for epoch in range(cfg.train.epochs):
        batches = ({"image": x[i:i + b], "label_index": y[i:i + b]} for i in range(0, len(x), b))
        start = time.perf_counter()
        _, n, seconds, step = run_epoch(model, batches, optimizer, scheduler, cfg, torch.device("cpu"), step, epoch,
                                        len(images))
        rows.append({"compute_s": seconds, "wall_s": time.perf_counter() - start, "steps": -(-n // b)})
    return rows


def train_fn(config: dict) -> None:
    """The Ray Train side: the job's epoch function, then a report with a checkpoint, timed apart."""
    import ray.train
    from ray.train import Checkpoint

    from camae.config import from_dict
    from finetune.worker import build_model, build_optimizer, run_epoch

    cfg = from_dict(FinetuneConfig, config["cfg"])
    torch.manual_seed(0)
    b = cfg.train.batch_size
    model, _ = build_model(cfg, config["classes"])
    optimizer, scheduler = build_optimizer(model, cfg)
    shard = ray.train.get_dataset_shard("train")
    step, timings = 0, []
    for epoch in range(cfg.train.epochs):
        start = time.perf_counter()
        _, n, seconds, step = run_epoch(model, shard.iter_torch_batches(batch_size=b), optimizer, scheduler, cfg,
                                        torch.device("cpu"), step, epoch, config["n"])
        reported = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, Path(tmp) / "state.pt")
            ray.train.report({"epoch": epoch}, checkpoint=Checkpoint.from_directory(tmp))
        end = time.perf_counter()
        timings.append({"compute_s": seconds, "wall_s": end - start, "report_s": end - reported, "steps": -(-n // b),
                        "threads": torch.get_num_threads()})
    Path(config["out"]).write_text(json.dumps(timings))


def epochs_ray(cfg: FinetuneConfig, images: np.ndarray, labels: np.ndarray, classes: int) -> list[dict]:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from camae.config import to_dict

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = ray.data.from_items([{"image": im, "label_index": lab} for im, lab in zip(images, labels, strict=True)])
    ds = ds.materialize()
    out = Path(tempfile.mkdtemp()) / "timings.json"
    with tempfile.TemporaryDirectory() as storage:
        TorchTrainer(train_fn, train_loop_config={"cfg": to_dict(cfg), "classes": classes, "n": len(images),
                                                  "out": str(out)},
                     scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                     run_config=RunConfig(name="train-step-bench", storage_path=storage),
                     datasets={"train": ds}).fit()
    return json.loads(out.read_text())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--channels", type=int, default=6)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    cfg = load_config(FinetuneConfig, None, [*OVERRIDES, f"train.batch_size={args.batch}",
                                             f"train.epochs={args.epochs}"])
    images, labels = images_and_labels(args.images, args.channels)
    classes = int(labels.max()) + 1
    plain = epochs_plain(cfg, images, labels, classes)
    ray_rows = epochs_ray(cfg, images, labels, classes)
    steady = lambda rows, key: statistics.median(r["steps"] / r[key] for r in rows[1:])  # noqa: E731
    result = {"images": args.images, "channels": args.channels, "batch": args.batch, "epochs": args.epochs,
              "plain_steps_per_s": round(steady(plain, "compute_s"), 3),
              "ray_steps_per_s": round(steady(ray_rows, "compute_s"), 3),
              "ray_steps_per_s_with_report": round(steady(ray_rows, "wall_s"), 3),
              "report_and_checkpoint_s": round(statistics.median(r["report_s"] for r in ray_rows[1:]), 3),
              "worker_threads": ray_rows[0]["threads"], "plain": plain, "ray": ray_rows}
    result["ratio"] = round(result["ray_steps_per_s"] / result["plain_steps_per_s"], 3)
    result["ratio_with_report"] = round(result["ray_steps_per_s_with_report"] / result["plain_steps_per_s"], 3)
    write(result, args.out)
    return result


def write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_step.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# train_step: tiny encoder (32/2/2), {result['images']} images {result['channels']}x256x256, batch "
             f"{result['batch']}, one CPU worker ({result['worker_threads']} torch thread), median of epochs 2.."
             f"{result['epochs']}", "",
             "| loop | steps/s | vs plain |", "|---|---|---|",
             f"| plain PyTorch | {result['plain_steps_per_s']} | 1.00x |",
             f"| Ray Train (training) | {result['ray_steps_per_s']} | **{result['ratio']}x** |",
             f"| Ray Train (with the per-epoch report + checkpoint) | {result['ray_steps_per_s_with_report']} | "
             f"{result['ratio_with_report']}x |", "",
             f"Per-epoch `ray.train.report` with a checkpoint: {result['report_and_checkpoint_s']} s."]
    (out / "train_step.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
