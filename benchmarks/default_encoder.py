"""What the committed default encoder (models/quickstart-mae, pretrained with `camae pretrain`) buys the main job:
the frozen probes of `configs/evaluate/quickstart.yaml` on the main job's plates and split, on that encoder and on
the random encoder of the same dims that the main job used before. The held-out plates are the main job's test
plates; the pretraining plates were drawn with another seed.

    python benchmarks/default_encoder.py     # writes benchmarks/results/default_encoder.{json,md}

The figure the issue asks for is the gap between the best probe (any kind, any correction) on each encoder.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"
DEFAULT = "models/quickstart-mae"


def probe_table(checkpoint: str | None, out: Path, overrides: list[str]) -> list[dict]:
    """The quickstart evaluation's probe rows (kind, correction, val/test accuracy) on one encoder."""
    from camae.config import EvaluateConfig, load_config
    from evaluation.evaluate import run_evaluate

    name = "pretrained" if checkpoint else "random"
    cfg = load_config(EvaluateConfig, REPO / "configs" / "evaluate" / "quickstart.yaml", [
        f"embed.encoder.checkpoint={checkpoint or 'null'}", f"run.output_dir={out}", f"run.name={name}",
        "biology.channel_leave_one_out=false", "probes.per_block=false", "run.plots=false", *overrides])
    rows = run_evaluate(cfg)["probes"]
    return [{"encoder": name, "probe": r["probe"], "correction": r["correction"],
             "val/accuracy": r.get("val/accuracy"), "test/accuracy": r["test/accuracy"],
             "test/chance_accuracy": r.get("test/chance_accuracy")} for r in rows]


def compare(out: Path, overrides: list[str] = ()) -> dict:
    """Both encoders' probe rows and the gap between their best test accuracies."""
    rows = probe_table(None, out, list(overrides)) + probe_table(str(REPO / DEFAULT), out, list(overrides))
    best = {e: max(r["test/accuracy"] for r in rows if r["encoder"] == e) for e in ("random", "pretrained")}
    return {"rows": rows, "best_test_accuracy": best, "gap": best["pretrained"] - best["random"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "outputs" / "bench-default-encoder"))
    args = parser.parse_args()
    result = compare(Path(args.out))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "default_encoder.json").write_text(json.dumps(result, indent=2) + "\n")
    best = result["best_test_accuracy"]
    lines = ["# Frozen probes: the pretrained default encoder against the random one (main job's test plates)", "",
             f"best probe test accuracy: pretrained {best['pretrained']:.3f}, random {best['random']:.3f}, "
             f"gap {result['gap']:+.3f} (chance {result['rows'][0]['test/chance_accuracy']:.3f})", "",
             "| encoder | probe | correction | val accuracy | test accuracy |", "|---|---|---|---|---|"]
    lines += [f"| {r['encoder']} | {r['probe']} | {r['correction']} | {r['val/accuracy']:.3f} | "
              f"{r['test/accuracy']:.3f} |" for r in result["rows"]]
    (RESULTS / "default_encoder.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
