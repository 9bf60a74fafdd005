"""Sites/s per core of the decode path alone, per on-disk format, and the cores it takes to feed one H100.

Every format goes through the same `camae.data.decode_batch` a Ray Data task runs (read, decode, random 256x256
training crop), one block at a time in this process with one thread, so the figure is per core:

    png-256        one PNG per channel, 256x256 sites (camae synth's default)
    png-512        one PNG per channel, 512x512 sites cropped to 256 (RxRx1's native size)
    packed-256     `camae pack` shards of the png-256 sites (uint8 in Parquet, read by row group)
    packed-512     `camae pack` shards of the png-512 sites
    jp2-<decoder>  RxRx3-core's layout: 512x512 JPEG 2000 channel images in Parquet rows, per decoder

Full fine-tuning of ViT-S/16 at 6x256x256 is 327 GFLOP per image; at 40% of an H100's bf16 peak that is about
1,200 images/s, so the cores needed per GPU are 1,200 / (sites/s per core).

    python benchmarks/decode.py                  # writes benchmarks/results/decode.{json,md}
    python benchmarks/decode.py --sites 48
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

H100_IMAGES_PER_S = 1200
DECODERS = ["pillow", "imagecodecs"]


def datasets(root: Path, sites: int) -> dict:
    """The data configs of every format, written under `root` on first use (synthetic plates, packed copies)."""
    from camae.config import DataConfig, SynthConfig
    from camae.shards import pack
    from camae.synth import ensure_dataset

    wells = max(6, sites // 2)
    out = {}
    for size in (256, 512):
        plates = root / f"png-{size}"
        ensure_dataset(plates, SynthConfig(experiments=1, plates_per_experiment=1, wells_per_plate=wells,
                                           controls_per_plate=2, size=size))
        out[f"png-{size}"] = DataConfig(root=str(plates))
        packed = root / f"packed-{size}"
        if not (packed / "manifest.json").is_file():
            pack(out[f"png-{size}"], str(packed))
        out[f"packed-{size}"] = DataConfig(format="packed", root=str(packed))
    core = root / "rxrx3-core"
    ensure_dataset(core, SynthConfig(layout="rxrx3_core", experiments=2, plates_per_experiment=1,
                                     wells_per_plate=max(6, sites // 2), controls_per_plate=2, size=512,
                                     sites_per_well=1))
    jp2 = DataConfig(format="rxrx3_core", root=str(core), label_column="treatment", control_column="treatment",
                     control_values=["EMPTY_control"], batch_column="experiment_name", well_column="address")
    for decoder in DECODERS:
        out[f"jp2-{decoder}"] = replace(jp2, jp2_decoder=decoder)
    return out


def sites_per_s(cfg, sites: int, repeats: int) -> float:
    """Median over repeats of one pass over `sites` sites through decode_batch (training crops), one thread."""
    from camae.data import blocks, decode_batch, read_table

    table = read_table(cfg).head(sites)
    parts = blocks(table, cfg, train=False)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        n = sum(len(decode_batch({c: p[c].to_numpy() for c in p.columns}, cfg, train=True)["image"]) for p in parts)
        rates.append(n / (time.perf_counter() - start))
    return float(np.median(rates))


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", type=Path, default=Path("/tmp/camae-decode"))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    import ray

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    configs = datasets(args.data, args.sites)  # packing runs on Ray; the measurements below do not
    ray.shutdown()
    import torch

    torch.set_num_threads(1)
    rows = []
    for name, cfg in configs.items():
        rate = sites_per_s(cfg, args.sites, args.repeats)
        rows.append({"format": name, "sites_per_s_per_core": round(rate, 1),
                     "cores_for_h100": round(H100_IMAGES_PER_S / rate, 2)})
        print(json.dumps(rows[-1]), flush=True)
    write(rows, args)
    return rows


def write(rows: list[dict], args) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "sites": args.sites}
    (args.out / "decode.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    png = {r["format"]: r["sites_per_s_per_core"] for r in rows}
    lines = [f"# decode path per core: {args.sites} sites per format, 6 channels, random 256x256 training crop, "
             f"one thread, median of {args.repeats}", "",
             "| format | sites/s per core | vs PNG of the same size | cores to feed one H100 at 1,200 img/s |",
             "|---|---|---|---|"]
    for r in rows:
        size = "512" if r["format"].endswith("512") or r["format"].startswith("jp2") else "256"
        ratio = r["sites_per_s_per_core"] / png[f"png-{size}"]
        lines.append(f"| {r['format']} | {r['sites_per_s_per_core']} | **{ratio:.2f}x** | {r['cores_for_h100']} |")
    (args.out / "decode.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
