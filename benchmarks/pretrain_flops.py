"""FLOPs of one MAE pretraining step of OpenPhenom (CA-MAE-S/16 with its decoder) per site, counted by PyTorch's
FlopCounterMode on the real model, and the GPU time per epoch they imply: an ESTIMATE, not a measurement (no GPU
was at hand when it was written; run `benchmarks/train_step.py`-style timing on one to replace it).

    python benchmarks/pretrain_flops.py [--mask-ratio 0.75] [--sites 100000] [--mfu 0.35]

Backward is counted too (loss.backward under the counter), and attention is run as explicit matmuls so that it
is counted (the counter knows no formula for the CPU flash-attention kernel). The estimate divides the step's
FLOPs by a GPU's dense bf16 peak times an assumed model-FLOPs utilization (MFU).
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from camae import MAEModel
from camae.cli import synthetic_sites
from camae.model_config import HUB_CONFIG

PEAK_BF16_TFLOPS = {"H100 SXM": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0}  # dense, vendor data sheets
RESULTS = Path(__file__).resolve().parent / "results"


def step_flops(mask_ratio: float, batch: int = 2, config: dict | None = None) -> dict[str, float]:
    """FLOPs per site of the MAE forward and of forward + backward, on the published dims (or `config`)."""
    torch.manual_seed(0)
    model = MAEModel.from_config(json.loads(json.dumps(config or HUB_CONFIG)))
    model.mask_ratio = model.config.mask_ratio = mask_ratio
    x = synthetic_sites(batch, 6)
    # attention as explicit matmuls: FlopCounterMode has no formula for the CPU flash kernel and would skip it
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as forward, torch.no_grad():
        model.forward_loss(x)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as both:
        loss, _, _ = model.forward_loss(x)
        loss.backward()
    return {"forward": forward.get_total_flops() / batch, "train_step": both.get_total_flops() / batch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    parser.add_argument("--sites", type=int, default=100_000, help="sites per epoch for the time estimate")
    parser.add_argument("--mfu", type=float, default=0.35, help="assumed model-FLOPs utilization")
    args = parser.parse_args()
    flops = step_flops(args.mask_ratio)
    estimate = {gpu: args.sites * flops["train_step"] / (peak * 1e12 * args.mfu) for gpu, peak in
                PEAK_BF16_TFLOPS.items()}
    result = {"model": "OpenPhenom CA-MAE-S/16 + decoder (published dims)", "mask_ratio": args.mask_ratio,
              "gflops_per_site": {k: round(v / 1e9, 1) for k, v in flops.items()}, "sites_per_epoch": args.sites,
              "assumed_mfu": args.mfu, "estimated_seconds_per_epoch": {k: round(v, 1) for k, v in estimate.items()},
              "measured": False, "host": platform.processor() or platform.machine(), "torch": torch.__version__}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "pretrain_flops.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# MAE pretraining FLOPs (OpenPhenom dims, mask ratio {args.mask_ratio})", "",
             f"forward {result['gflops_per_site']['forward']} GFLOP/site; forward + backward "
             f"{result['gflops_per_site']['train_step']} GFLOP/site (FlopCounterMode).", "",
             f"ESTIMATED GPU time per epoch of {args.sites:,} sites at {args.mfu:.0%} MFU (bf16 dense peak):", "",
             "| GPU | peak TFLOP/s | s/epoch (estimate) |", "|---|---|---|"]
    lines += [f"| {gpu} | {peak:g} | {estimate[gpu]:.0f} |" for gpu, peak in PEAK_BF16_TFLOPS.items()]
    (RESULTS / "pretrain_flops.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
