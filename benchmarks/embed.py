"""Images/s of `camae embed` (Ray Data decoding + an actor pool, Parquet out) against a bare loop that reads and
decodes the same packed shards and calls `MAEModel.predict`, as a ratio in one run: what Ray costs or gives.

Both sides read the same `camae pack` shards of synthetic plates through the same `decode_batch`, with the same
random-weight encoder (tiny, or the full ViT-S/16), the same batch size and all the machine's cores for torch; the
bare loop decodes inside its clock, one block after the other, as a hand-written script would. Each size runs the
Ray side twice (the first pays for actor start-up and model loading: "cold"), then once on one batch of sites
(its time is the fixed start-up of a pass; the rate after it is the pipeline's own), then the bare loop.

    python benchmarks/embed.py                          # writes benchmarks/results/embed_cpu.{json,md}
    python benchmarks/embed.py --sizes tiny --sites 60
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SIZES = {"tiny": (32, 2, 2), "vit_s16": (384, 12, 6)}


def plain_loop(table, data, cfg) -> float:
    """Images/s of read + decode + model.predict, block after block in this process."""
    from camae.classifier import base_model
    from camae.data import blocks, decode_batch

    model = base_model(cfg.encoder).eval()
    model.predict(torch.zeros(2, len(data.channels), data.crop_size, data.crop_size, dtype=torch.uint8))  # warm-up
    start, n = time.perf_counter(), 0
    for part in blocks(table, data, train=False):
        images = torch.from_numpy(decode_batch({c: part[c].to_numpy() for c in part.columns}, data, False)["image"])
        for batch in images.split(cfg.batch_size):
            model.predict(batch)
        n += len(images)
    return n / (time.perf_counter() - start)


def ray_embed(table, data, cfg, out: Path) -> float:
    """Images/s of the embedding pass, start to last file written."""
    from evaluation.embed import embed_table

    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    result = embed_table(table, data, cfg, out)
    assert result.sites == len(table) and result.skipped == 0
    return len(table) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--sites", type=int, default=240, help="sites for the tiny encoder")
    parser.add_argument("--sites-full", type=int, default=96, help="sites for ViT-S/16 (slow on CPU)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--data", default=str(REPO / "outputs" / "bench-embed-data"))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()

    import ray

    from camae.config import DataConfig, EmbedConfig, EncoderSpec, SynthConfig
    from camae.data import read_table
    from camae.shards import pack
    from camae.synth import ensure_dataset

    synth = SynthConfig(experiments=1, plates_per_experiment=max(1, args.sites // 60), wells_per_plate=30,
                        sites_per_well=2)
    ensure_dataset(args.data, synth)
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    packed = f"{args.data}-packed"
    if not Path(packed, "manifest.json").is_file():
        pack(DataConfig(root=args.data), packed, rows_per_group=args.batch_size)
    data = DataConfig(format="packed", root=packed)
    full_table = read_table(data)
    rows = []
    for size in args.sizes:
        dim, depth, heads = SIZES[size]
        n = args.sites if size == "tiny" else args.sites_full
        table = full_table.iloc[:n]
        cfg = EmbedConfig(EncoderSpec(embed_dim=dim, depth=depth, num_heads=heads), blocks=False,
                          batch_size=args.batch_size, sites_per_file=max(16, n // 4))
        scratch = Path(args.data).parent / f"bench-embed-out-{size}"
        cold = ray_embed(table, data, cfg, scratch)
        warm = ray_embed(table, data, cfg, scratch)
        # one batch of sites: what a pass costs before its first embedding (actor start, model load, executor)
        few = table.iloc[:args.batch_size]
        startup = len(few) / ray_embed(few, data, cfg, scratch)
        steady = (n - len(few)) / (n / warm - startup)
        plain = plain_loop(table, data, cfg)
        rows.append({"encoder": size, "sites": n, "batch_size": args.batch_size, "ray_cold": round(cold, 2),
                     "ray_warm": round(warm, 2), "startup_s": round(startup, 2), "ray_steady": round(steady, 2),
                     "plain": round(plain, 2), "ratio_warm": round(warm / plain, 3),
                     "ratio_cold": round(cold / plain, 3), "ratio_steady": round(steady / plain, 3)})
        print(rows[-1], flush=True)
        shutil.rmtree(scratch, ignore_errors=True)
    meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "embed_cpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = ["| encoder | sites | camae embed (warm) | (cold) | first batch s | after the first batch | bare loop, "
             "decoding the pack | ratio warm | ratio cold | ratio after the first batch |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['encoder']} | {r['sites']} | {r['ray_warm']} img/s | {r['ray_cold']} img/s | {r['startup_s']} | "
              f"{r['ray_steady']} img/s | {r['plain']} img/s | **{r['ratio_warm']}x** | {r['ratio_cold']}x | "
              f"**{r['ratio_steady']}x** |" for r in rows]
    header = (f"CPU, {meta['cpus']} cores, batch {args.batch_size}, packed shards of 6x256x256 sites read and decoded "
              "by both sides (`python benchmarks/embed.py`)\n\n")
    (out / "embed_cpu.md").write_text(header + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
