"""Sites/s and peak memory of camae's Ray Data pipeline against a torch DataLoader and single-process decoding.

All three decode the same synthetic plates (6 per-channel 256x256 PNGs per site) through the same
`camae.data.load_site`; the DataLoader gets as many worker processes as Ray gets CPUs. Each (mode, scale) runs in
its own process; a sampler sums PSS (shared pages counted once) over that process and all its children (Ray's
raylet, object store and workers included) to give the peak. Scales 1x and 10x show whether memory grows with
the dataset.

    python benchmarks/ingest.py                       # writes benchmarks/results/ingest.{json,md}
    python benchmarks/ingest.py --sites 120 --workers 2 --formats packed
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODES = ["ray", "dataloader", "single"]
WARM_EPOCHS = 3  # after the cold one; their median is the warm figure
FORMATS = ["png", "packed"]


class PeakMemory:
    """Peak PSS (MiB) of this process and all its descendants, sampled every `interval` seconds."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.peak, self._stop = interval, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> float:
        procs = [psutil.Process()] + psutil.Process().children(recursive=True)
        total = 0
        for p in procs:
            try:
                total += p.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return total / 2**20

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def dataset(root: Path, sites: int, fmt: str) -> Path:
    """Synthetic plates with about `sites` sites, or their pack (cached on disk by size)."""
    from camae.synth import SynthConfig, generate

    wells = 30
    plates = max(1, round(sites / (wells * 2)))
    out = root / f"plates-{plates * wells * 2}"
    if not (out / "metadata.csv").is_file():
        generate(out, SynthConfig(experiments=1, plates_per_experiment=plates, wells_per_plate=wells))
    if fmt == "png":
        return out
    packed = root / f"packed-{plates * wells * 2}"
    if not (packed / "manifest.json").is_file():
        data = root / f"pack-{plates * wells * 2}.yaml"
        data.write_text(f"root: {out}\n")
        subprocess.run([sys.executable, "-m", "camae", "pack", "--config", str(data), "--out", str(packed)],
                       check=True, capture_output=True, env={**os.environ, "RAY_ADDRESS": "local"})
    return packed


def _epoch(batches) -> tuple[int, float]:
    """Drain one epoch of batches: (sites, seconds)."""
    start, n = time.perf_counter(), 0
    for b in batches:
        n += len(b["image"])
    return n, time.perf_counter() - start


def run_mode(mode: str, root: str, workers: int, batch: int) -> dict:
    """Epochs over the dataset in `mode`: the first cold (worker start-up included), then WARM_EPOCHS warm, then one
    with the memory sampler."""
    from camae.config import DataConfig
    from camae.data import TRAIN_COLUMNS, BlockDataset, LabelMap, build_dataset, read_table

    fmt = "packed" if (Path(root) / "manifest.json").is_file() else "rxrx1"
    cfg = DataConfig(format=fmt, root=root, decode_batch_size=batch)
    table = read_table(cfg)
    labels = LabelMap.from_labels(table.label)
    if mode == "ray":
        import ray

        ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        ds = build_dataset(table, cfg, train=False, label_map=labels, columns=TRAIN_COLUMNS)
        # as many batches in flight as the DataLoader's workers x prefetch_factor (2)
        epoch = lambda: ds.iter_torch_batches(batch_size=batch, prefetch_batches=2 * workers)  # noqa: E731
    elif mode == "dataloader":
        import torch

        loader = torch.utils.data.DataLoader(BlockDataset(table, cfg, False, labels, TRAIN_COLUMNS),
                                             batch_size=batch, num_workers=workers, persistent_workers=True)
        epoch = lambda: loader  # noqa: E731
    else:
        import torch

        epoch = lambda: torch.utils.data.DataLoader(BlockDataset(table, cfg, False, labels, TRAIN_COLUMNS),  # noqa: E731
                                                    batch_size=batch)
    n, cold = _epoch(epoch())
    warm = statistics.median(_epoch(epoch())[1] for _ in range(WARM_EPOCHS))
    # memory in a pass of its own: reading smaps of every process is costly, most of all for Ray's many processes,
    # and would slow the timed passes unevenly
    with PeakMemory() as memory:
        _epoch(epoch())
    return {"mode": mode, "sites": n, "cold_s": round(cold, 2), "cold_sites_per_s": round(n / cold, 1),
            "warm_sites_per_s": round(n / warm, 1), "peak_pss_mib": round(memory.peak)}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=240, help="sites at scale 1x")
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--formats", nargs="+", default=FORMATS, choices=FORMATS)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--data", type=Path, default=Path("/tmp/camae-ingest"))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "ROOT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_mode(args.child[0], args.child[1], args.workers, args.batch)))
        return []
    rows = []
    for scale, fmt in [(s, f) for f in args.formats for s in args.scales]:
        root = dataset(args.data, args.sites * scale, fmt)
        for mode in MODES:
            cmd = [sys.executable, __file__, "--child", mode, str(root), "--workers", str(args.workers),
                   "--batch", str(args.batch)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            row = {"format": fmt, "scale": f"{scale}x", **json.loads(out)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    write(rows, args)
    return rows


def write(rows: list[dict], args) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"cpus": os.cpu_count(), "workers": args.workers, "batch": args.batch, "machine": platform.machine()}
    (args.out / "ingest.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"# ingest: {args.workers} workers on {os.cpu_count()} CPUs, batch {args.batch}, 6x256x256 sites "
             "(png: one PNG per channel; packed: `camae pack` shards), end to end into torch batches", "",
             "Five epochs per mode in a fresh process: epoch 1 cold (worker start-up included), warm: the median of "
             "epochs 2-4, peak PSS: epoch 5 (sampled apart: reading every process's smaps slows the timed epochs). "
             "Ray Data prefetches 2 x workers batches, as many as the DataLoader keeps in flight.", "",
             "| format | scale | mode | sites | epoch 1 s | epoch 1 sites/s | warm sites/s | warm vs DataLoader "
             "| packed vs png | peak PSS MiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    def find(scale: str, fmt: str, mode: str) -> dict | None:
        return next((x for x in rows if (x["scale"], x["format"], x["mode"]) == (scale, fmt, mode)), None)

    for r in rows:
        base, png = find(r["scale"], r["format"], "dataloader"), find(r["scale"], "png", r["mode"])
        vs_png = f"**{r['warm_sites_per_s'] / png['warm_sites_per_s']:.2f}x**" if png else "-"
        lines.append(f"| {r['format']} | {r['scale']} | {r['mode']} | {r['sites']} | {r['cold_s']} | "
                     f"{r['cold_sites_per_s']} | {r['warm_sites_per_s']} | "
                     f"**{r['warm_sites_per_s'] / base['warm_sites_per_s']:.2f}x** | {vs_png} | {r['peak_pss_mib']} |")
    (args.out / "ingest.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
