"""Images/s of `camae embed` (Ray Data decoding + an actor pool, Parquet out) against a plain loop calling
`MAEModel.predict` on images decoded beforehand, as a ratio in one run: what Ray and decoding cost.

Both sides use the same random-weight encoder (tiny, or the full ViT-S/16), the same batch size and all the
machine's cores for torch; the plain loop's decoding happens before its clock starts. Each size runs the Ray
side twice (the first pays for actor start-up and model loading: "cold"), then the plain loop.

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

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SIZES = {"tiny": (32, 2, 2), "vit_s16": (384, 12, 6)}


def plain_loop(table, data, cfg) -> float:
    """Images/s of model.predict over pre-decoded crops."""
    from camae.classifier import base_model
    from camae.data import crops, load_site

    rng = np.random.default_rng(0)
    images = torch.from_numpy(np.stack([crops(load_site(r, data), data, False, rng)[0]
                                        for r in table.to_dict("records")]))
    model = base_model(cfg.encoder).eval()
    model.predict(images[:cfg.batch_size])  # warm-up
    start = time.perf_counter()
    for batch in images.split(cfg.batch_size):
        model.predict(batch)
    return len(images) / (time.perf_counter() - start)


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
    from camae.synth import ensure_dataset

    synth = SynthConfig(experiments=1, plates_per_experiment=max(1, args.sites // 60), wells_per_plate=30,
                        sites_per_well=2)
    ensure_dataset(args.data, synth)
    data = DataConfig(root=args.data, decode_batch_size=args.batch_size)
    full_table = read_table(data)
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
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
        plain = plain_loop(table, data, cfg)
        rows.append({"encoder": size, "sites": n, "batch_size": args.batch_size, "ray_cold": round(cold, 2),
                     "ray_warm": round(warm, 2), "plain": round(plain, 2), "ratio_warm": round(warm / plain, 3),
                     "ratio_cold": round(cold / plain, 3)})
        print(rows[-1], flush=True)
        shutil.rmtree(scratch, ignore_errors=True)
    meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "embed_cpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = ["| encoder | sites | camae embed (warm) | camae embed (cold) | plain loop, pre-decoded | ratio warm | "
             "ratio cold |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['encoder']} | {r['sites']} | {r['ray_warm']} img/s | {r['ray_cold']} img/s | {r['plain']} img/s | "
              f"{r['ratio_warm']}x | {r['ratio_cold']}x |" for r in rows]
    header = f"CPU, {meta['cpus']} cores, batch {args.batch_size}\n\n"
    (out / "embed_cpu.md").write_text(header + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
