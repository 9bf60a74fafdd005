"""Images/s of camae's encoder against the official construction, as a ratio measured in one run.

The official construction (maes_microscopy `vit_small_patch16_256` + `MAEEncoder(channel_agnostic=True)`) is
timm's `VisionTransformer` with `ParallelScalingBlock`, qk-norm, no qkv bias, LayerScale, a per-channel loop over
one shared Conv2d(1 -> D) for the patch embedding and `_pos_embed` overridden to slice a 1 + 11*256-row sin-cos
table. Both run `forward_features` on the same normalized batch; ours and theirs alternate within every repeat,
so drift hits both. Before timing, the outputs are compared with `mlp_bias` zeroed (the one place where the
installed timm's bias routing differs from the trained one), to show that the same computation is timed.

    python benchmarks/model_forward.py                 # CUDA if present, else CPU; writes benchmarks/results/
    python benchmarks/model_forward.py --device cpu --repeats 3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import timm
import torch
from timm.models.vision_transformer import ParallelScalingBlock, VisionTransformer
from torch import nn

from camae import MAEModel
from camae.model import normalize_images, sincos_pos_table
from camae.model_config import EncoderConfig

SIZES = {  # name -> (encoder dims, batch on cuda, batch on cpu)
    "tiny": (EncoderConfig(embed_dim=32, depth=2, num_heads=2), 64, 8),
    "vit-s16": (EncoderConfig(), 32, 2),
}
CHANNELS, IMG = 6, 256


class OfficialPatchEmbed(nn.Module):
    """maes_microscopy ChannelAgnosticPatchEmbed.forward: one projection per channel, stacked."""

    def __init__(self, proj: nn.Conv2d):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        x = torch.stack([self.proj(x[:, i:i + 1]) for i in range(x.shape[1])], dim=2)  # [B, D, C, h, w]
        return x.flatten(2).transpose(1, 2)  # [B, C*h*w, D]


class OfficialChannelAgnosticViT(VisionTransformer):
    """The official class swap: `_pos_embed` prepends cls and adds the table sliced to the token count."""

    def _pos_embed(self, x):
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return self.pos_drop(x + self.pos_embed[:, :x.shape[1]])


def official_encoder(cfg: EncoderConfig) -> nn.Module:
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=cfg.img_size, in_chans=1,
                            num_classes=0, fc_norm=None, class_token=True, global_pool="avg",
                            drop_path_rate=cfg.drop_path_rate, init_values=cfg.init_values,
                            block_fn=ParallelScalingBlock, qkv_bias=False, qk_norm=True,
                            embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads)
    vit.__class__ = OfficialChannelAgnosticViT
    vit.patch_embed = OfficialPatchEmbed(vit.patch_embed.proj)
    vit.pos_embed = nn.Parameter(sincos_pos_table(cfg.embed_dim, cfg.grid_size, cfg.max_in_chans),
                                 requires_grad=False)
    return vit


def parity(ours: nn.Module, official: nn.Module, xn: torch.Tensor) -> float:
    """Max |difference| of forward_features with mlp_bias zeroed and the same weights in both."""
    for block in ours.blocks:
        nn.init.zeros_(block.mlp_bias)
    missing, unexpected = official.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and all("qkv_bias" in k for k in missing), (missing, unexpected)
    ours.eval(), official.eval()
    with torch.no_grad():
        return (ours.forward_features(xn[:2]) - official.forward_features(xn[:2])).abs().max().item()


def step_fn(model: nn.Module, xn: torch.Tensor, train: bool):
    if not train:
        def forward():
            with torch.no_grad():
                model.forward_features(xn)
        return forward

    def forward_backward():
        model.forward_features(xn)[:, 1:].mean().backward()
        model.zero_grad(set_to_none=True)
    return forward_backward


def time_it(fn, device: str, iters: int) -> float:
    """Seconds per call of fn, averaged over iters calls."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - start) / iters


def bench(size: str, device: str, precision: str, train: bool, repeats: int, iters: int) -> dict:
    cfg, cuda_batch, cpu_batch = SIZES[size]
    batch = cuda_batch if device == "cuda" else cpu_batch
    torch.manual_seed(0)
    ours = MAEModel.from_config({**_hub_config(cfg)}).encoder.vit_backbone.to(device)
    official = official_encoder(cfg).to(device)
    x = torch.randint(0, 256, (batch, CHANNELS, IMG, IMG), dtype=torch.uint8, device=device)
    xn = normalize_images(x)
    max_diff = parity(ours, official, xn)
    ours.train(train), official.train(train)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16-autocast")
    runs = {"ours": step_fn(ours, xn, train), "official": step_fn(official, xn, train)}
    times = {name: [] for name in runs}
    with autocast:
        for fn in runs.values():  # warm-up: kernels, allocator, autotuning
            time_it(fn, device, max(2, iters // 4))
        for _ in range(repeats):
            for name, fn in runs.items():
                times[name].append(time_it(fn, device, iters))
    ips = {name: batch / statistics.median(t) for name, t in times.items()}
    return {"size": size, "device": device, "precision": precision, "pass": "fwd+bwd" if train else "fwd",
            "batch": batch, "ours_img_s": round(ips["ours"], 2), "official_img_s": round(ips["official"], 2),
            "ratio": round(ips["ours"] / ips["official"], 3), "parity_max_abs_diff": max_diff}


def _hub_config(cfg: EncoderConfig) -> dict:
    from camae.model_config import MAEConfig

    return MAEConfig(encoder=cfg, decoder=_small_decoder()).to_json_dict()


def _small_decoder():
    from camae.model_config import DecoderConfig

    return DecoderConfig(embed_dim=32, depth=1, num_heads=2)  # the decoder is not timed


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iters", type=int, default=None, help="calls per repeat (default 20 cuda, 3 cpu)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--no-cudnn-benchmark", dest="cudnn_benchmark", action="store_false",
                        help="keep cuDNN's default conv algorithms (by default both sides autotune, as fixed-shape "
                             "training does)")
    args = parser.parse_args(argv)
    iters = args.iters or (20 if args.device == "cuda" else 3)
    precisions = ["fp32", "bf16-autocast"] if args.device == "cuda" else ["fp32"]
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
    rows = []
    for size in args.sizes:
        for precision in precisions:
            for train in (False, True):
                row = bench(size, args.device, precision, train, args.repeats, iters)
                print(json.dumps(row), flush=True)
                rows.append(row)
    write(rows, args)
    return rows


def write(rows: list[dict], args) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    meta = {"device_name": device_name, "torch": torch.__version__, "timm": timm.__version__,
            "threads": torch.get_num_threads(), "repeats": args.repeats, "channels": CHANNELS, "img": IMG,
            "cudnn_benchmark": args.device == "cuda" and args.cudnn_benchmark, "tf32": args.device == "cuda"}
    stem = args.out / f"model_forward_{args.device}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"# model_forward on {device_name} ({args.device}), torch {torch.__version__}, timm {timm.__version__}",
             "", f"{CHANNELS}x{IMG}x{IMG} images, median of {args.repeats} repeats; ratio = ours / official; "
             f"TF32 and cudnn.benchmark: {meta['tf32']}, {meta['cudnn_benchmark']}.", "",
             "| encoder | precision | pass | batch | ours img/s | official img/s | ratio | parity |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['size']} | {r['precision']} | {r['pass']} | {r['batch']} | {r['ours_img_s']} | "
              f"{r['official_img_s']} | **{r['ratio']}** | {r['parity_max_abs_diff']:.1e} |" for r in rows]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
