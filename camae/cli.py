"""The `camae` command line.

    camae demo [--checkpoint DIR] [--out outputs/demo]   embed synthetic images with OpenPhenom (or random weights)
    camae info DIR                                       describe and strictly check an OpenPhenom directory
    camae synth --out DIR [--config F] [--set k=v ...]   write synthetic Cell Painting plates (RxRx1 layout, or
                                                         RxRx3-core's with --set layout=rxrx3_core)
    camae pack --config DATA --out DIR|URI [--set k=v]   pack any layout into Parquet shards (data.format: packed)
    camae pretrain --config F [--set k=v ...]            continue MAE pretraining on unlabeled plates (= python -m
                                                         finetune.pretrain); exports in the official format
    camae finetune --config F [--set k=v ...]            fine-tune with Ray Train (= python -m finetune.train)
    camae sweep --config F [--set k=v ...]               Ray Tune sweep of fine-tunes (= python -m finetune.tune)
    camae embed --config F [--set k=v ...]               embed plates into Parquet (Ray Data actor pool)
    camae evaluate --config F [--set k=v ...]            probes, batch correction, biology metrics (= python -m
                                                         evaluation.evaluate)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from camae import MAEModel
from camae.checkpoint import ZIP_MAGIC
from camae.config import load_config
from camae.model_config import HUB_CONFIG

log = logging.getLogger("camae")

TINY_DIMS = {"embed_dim": 32, "depth": 2, "num_heads": 2}  # the shared test fixture's encoder


def synthetic_sites(n: int, channels: int, seed: int = 0) -> torch.Tensor:
    """uint8 [n, channels, 256, 256]: sites from camae's synthetic Cell Painting generator (one plate, the
    classes in turn), the first `channels` of its six stains."""
    from camae.config import SynthConfig
    from camae.synth import CHANNELS, class_effects, plate_effects, render_site

    if not 1 <= channels <= len(CHANNELS):
        raise ValueError(f"--channels {channels}: the synthetic sites have {len(CHANNELS)} stains ({CHANNELS})")
    cfg = SynthConfig(seed=seed)
    effects, plate = class_effects(cfg), plate_effects(cfg, 1, 1)
    sites = [render_site(cfg, effects[i % cfg.classes], plate, [seed, 6, i]) for i in range(n)]
    return torch.from_numpy(np.stack(sites)[:, :channels])


def random_checkpoint(out: Path, tiny: bool, seed: int) -> Path:
    """Write an OpenPhenom-config directory with random weights (official container) and return it."""
    config = json.loads(json.dumps(HUB_CONFIG))
    if tiny:
        config["encoder"]["vit_backbone"]["vit_backbone"].update(TINY_DIMS)
        config["decoder"].update(embed_dim=32, depth=1, num_heads=2)
    torch.manual_seed(seed)
    MAEModel.from_config(config).save_pretrained(out)
    return out


def demo(args: argparse.Namespace) -> dict:
    """The model card's uses on synthetic images: pooled and channel-wise embeddings, and a missing stain."""
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    ckpt = Path(args.checkpoint) if args.checkpoint else None
    if ckpt is None:
        log.warning("no --checkpoint given: using RANDOM weights in the OpenPhenom format (a smoke run; the "
                    "embeddings mean nothing). Pass --checkpoint DIR with the downloaded OpenPhenom directory.")
        ckpt = random_checkpoint(out / "random-checkpoint", args.tiny, args.seed)
    model = MAEModel.from_pretrained(ckpt, map_location=args.device)
    images = synthetic_sites(args.images, args.channels, seed=args.seed)
    start = time.perf_counter()
    pooled = torch.cat([model.predict(b) for b in images.split(args.batch_size)])
    seconds = time.perf_counter() - start
    model.return_channelwise_embeddings = True
    channelwise = torch.cat([model.predict(b) for b in images.split(args.batch_size)])
    summary = {"checkpoint": str(ckpt), "random_weights": args.checkpoint is None, "device": str(model.device),
               "images": args.images, "channels": args.channels, "embedding_dim": pooled.shape[1],
               "channelwise_dim": channelwise.shape[1], "images_per_s": round(args.images / seconds, 2),
               "outputs": {"embeddings": str(out / "embeddings.npy"),
                           "channelwise": str(out / "embeddings_channelwise.npy")}}
    np.save(out / "embeddings.npy", pooled.float().cpu().numpy())
    np.save(out / "embeddings_channelwise.npy", channelwise.float().cpu().numpy())
    slots = model.config.decoder.num_modalities
    if args.channels == slots:
        filled = model.predict_missing_channels(images[:1], missing=[slots - 1])
        summary["missing_stain_reconstruction"] = list(filled.shape)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def info(args: argparse.Namespace) -> dict:
    """Describe a checkpoint directory after loading it strictly."""
    model = MAEModel.from_pretrained(args.path)
    config = model.config
    with open(Path(args.path) / "model.safetensors", "rb") as f:
        container = "torch zip (official)" if f.read(len(ZIP_MAGIC)) == ZIP_MAGIC else "safetensors"
    enc, dec = config.encoder, config.decoder
    return {"path": str(Path(args.path).resolve()), "container": container,
            "tensors": len(model.state_dict()), "values": sum(t.numel() for t in model.state_dict().values()),
            "encoder": f"ViT D={enc.embed_dim} depth={enc.depth} heads={enc.num_heads} patch={enc.patch_size} "
                       f"img={enc.img_size} max_channels={enc.max_in_chans} bias_routing={enc.bias_routing}",
            "decoder": f"D={dec.embed_dim} depth={dec.depth} heads={dec.num_heads} slots={dec.num_modalities}",
            "mask_ratio": config.mask_ratio, "return_channelwise_embeddings": config.return_channelwise_embeddings}


def synth(args: argparse.Namespace) -> dict:
    """Write a synthetic dataset; settings from --config YAML and --set overrides (keys of SynthConfig)."""
    from camae.synth import SynthConfig, generate

    cfg = load_config(SynthConfig, args.config, args.set)
    start = time.perf_counter()
    meta = generate(args.out, cfg)
    seconds = time.perf_counter() - start
    return {"out": str(Path(args.out).resolve()), "layout": cfg.layout, "sites": len(meta),
            "plates": int(meta.groupby(["experiment_name" if cfg.layout == "rxrx3_core" else "experiment",
                                        "plate"]).ngroups),
            "images": len(meta) * 6, "seconds": round(seconds, 1), "sites_per_s": round(len(meta) / seconds, 1)}


def pack(args: argparse.Namespace) -> dict:
    """Pack the dataset a data config (--config, DataConfig keys) describes into Parquet shards at --out."""
    from dataclasses import asdict

    from camae.cluster import connect
    from camae.config import DataConfig
    from camae.shards import pack as pack_shards

    cfg = load_config(DataConfig, args.config, args.set)
    connect()
    return asdict(pack_shards(cfg, args.out, shard_mb=args.shard_mb, rows_per_group=args.rows_per_group))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="camae", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="embed synthetic images with OpenPhenom (random weights without --checkpoint)")
    p.add_argument("--checkpoint", help="an OpenPhenom directory (config.json + model.safetensors)")
    p.add_argument("--out", default="outputs/demo", help="where embeddings and summary.json go")
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--channels", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tiny", action="store_true", help="random weights at the test fixture's size (fast)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=demo)
    p = sub.add_parser("synth", help="write synthetic Cell Painting plates in the RxRx1 layout")
    p.add_argument("--out", default="data/synthetic")
    p.add_argument("--config", help="YAML with SynthConfig keys")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    p.set_defaults(func=synth)
    p = sub.add_parser("pack", help="pack a dataset into Parquet shards of uint8 sites (read with data.format: "
                                    "packed, from a path or s3://)")
    p.add_argument("--config", required=True, help="a data config YAML (DataConfig keys: format, root, channels...)")
    p.add_argument("--out", required=True, help="a directory or URI (s3://bucket/prefix)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a data setting")
    p.add_argument("--shard-mb", type=float, default=256, help="target shard size in MiB of pixels (default 256)")
    p.add_argument("--rows-per-group", type=int, default=32,
                   help="sites per Parquet row group = per decode task when reading (default 32)")
    p.set_defaults(func=pack)
    sub.add_parser("pretrain", help="continue MAE pretraining with Ray Train: camae pretrain --config F")
    sub.add_parser("finetune", help="fine-tune with Ray Train: camae finetune --config F [--set k=v ...]")
    sub.add_parser("sweep", help="Ray Tune sweep of fine-tunes beside probe baselines: camae sweep --config F")
    sub.add_parser("embed", help="embed plates into Parquet: camae embed --config F [--set k=v ...]")
    sub.add_parser("evaluate", help="probes, batch correction, biology metrics: camae evaluate --config F")
    p = sub.add_parser("info", help="describe and strictly check an OpenPhenom checkpoint directory")
    p.add_argument("path")
    p.set_defaults(func=info)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The jobs' own entry points, shared with `ray job submit ... -- python -m <module>`
    if argv[:1] == ["pretrain"]:
        from finetune.pretrain import main as pretrain_main

        return pretrain_main(argv[1:])
    if argv[:1] == ["finetune"]:
        from finetune.train import main as finetune_main

        return finetune_main(argv[1:])
    if argv[:1] == ["sweep"]:
        from finetune.tune import main as sweep_main

        return sweep_main(argv[1:])
    if argv[:1] in (["evaluate"], ["embed"]):
        from evaluation.evaluate import main as evaluate_main

        return evaluate_main(argv[1:], only_embed=argv[0] == "embed")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except (ValueError, TypeError) as err:  # CheckpointError, ConfigError, DataError: messages meant for users
        print(f"camae {args.command}: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
