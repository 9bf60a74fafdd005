"""Evaluate a frozen encoder on plates: embed, batch-correct, probe, measure the biology, log it all to MLflow.

    camae evaluate --config configs/evaluate/quickstart.yaml [--set embed.encoder.checkpoint=DIR ...]
    camae embed --config ...                   # only the embedding pass
    python -m evaluation.evaluate --config ...  # the same; for `ray job submit --working-dir . -- python -m ...`

One MLflow parent run (`camae.kind=evaluation`) holds the biology metrics, the per-block curve, channel
leave-one-out, plots and the metrics table; one child run per probe and correction (`camae.kind=probe`,
`camae.probe`, `camae.correction` tags) holds `val/...` and `test/...` metrics named as fine-tuning names them, so
the MLflow comparison view lines probes up with fine-tunes. The split is fine-tuning's (same data keys, same
plates); outputs go to run.output_dir/run.name.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pandas as pd

from camae import storage
from camae.cluster import connect
from camae.config import EvaluateConfig, job_config, job_parser, load_config, save_config, to_dict
from evaluation.batch_correction import fit_correction
from evaluation.biology import (
    consistency_map,
    plate_predictability,
    relationship_recall,
    replicate_map,
    well_profiles,
)
from evaluation.embed import embed_table, load_embedding_columns
from evaluation.probes import run_probe

log = logging.getLogger("camae.evaluate")


# ----------------------------------------------------------------------------------------------------------------
# Steps (plain functions of arrays and tables)


def embed(cfg: EvaluateConfig, table: pd.DataFrame, out: str | Path, channels: list[str] | None = None,
          blocks: bool | None = None):
    """Embed (or resume embedding) into `out`; returns (metadata with split, {column: array}, EmbedResult)."""
    ecfg = cfg.embed if blocks is None else replace(cfg.embed, blocks=blocks)
    result = embed_table(table, cfg.data, ecfg, out, channels)
    meta, arrays = load_embedding_columns(out)  # embedding [+ embedding_blocks, embedding_channelwise]
    split = dict(zip(table["sample_id"], table["split"], strict=True))
    meta["split"] = meta["sample_id"].map(split)
    return meta, arrays, result


def corrections(cfg: EvaluateConfig, meta: pd.DataFrame, X: np.ndarray, methods) -> dict[str, np.ndarray]:
    """{method: corrected embeddings}, fitted on the training plates' controls (correction.fit_on=train)."""
    c = cfg.correction
    batches = meta[c.by].astype(str).to_numpy()
    fit = (meta["split"] == "train").to_numpy() if c.fit_on == "train" else None
    return {m: fit_correction(m, X, batches, meta["is_control"].to_numpy(bool), fit, c.n_components,
                              c.coral).transform(X, batches) for m in methods}


def biology(cfg: EvaluateConfig, meta: pd.DataFrame, X: np.ndarray, pairs: pd.DataFrame | None):
    """Biology metrics of one embedding: ({name: value}, per-perturbation mAP table or None, {metric: why it
    was skipped}). A metric the design cannot support (no replicates, too few perturbations or plates) is
    skipped with its reason, not fatal."""
    b, metrics, table, skipped = cfg.biology, {}, None, {}
    wells, P = well_profiles(meta, X)
    steps = {"replicate_map": b.replicate_map, "relationship_recall": pairs is not None,
             "consistency": b.consistency and pairs is not None, "plate_predictability": b.batch_effect}
    for name in [n for n, wanted in steps.items() if wanted]:
        try:
            if name == "replicate_map":
                table, out = replicate_map(wells, P, b.null_size, b.fdr, cfg.data.seed)
            elif name == "relationship_recall":
                out = relationship_recall(wells, P, pairs, [tuple(t) for t in b.recall_thresholds])
            elif name == "consistency":
                out = consistency_map(wells, P, pairs, b.null_size, b.fdr, cfg.data.seed)[1]
            else:
                out = plate_predictability(meta, X, cfg.data.seed)
        except ValueError as err:
            skipped[name] = str(err)
            continue
        metrics |= {f"bio/{k}": v for k, v in out.items()}
    return metrics, table, skipped


def known_pairs(cfg: EvaluateConfig) -> pd.DataFrame | None:
    path = cfg.biology.relationships or storage.join(cfg.data.root, "relationships.csv")  # packs carry theirs
    if not storage.exists(path):
        if cfg.biology.relationships:
            raise FileNotFoundError(f"biology.relationships={path} does not exist")
        return None
    return pd.read_csv(io.StringIO(storage.read_text(path)))


def block_curve(cfg: EvaluateConfig, meta: pd.DataFrame, blocks: np.ndarray, y: np.ndarray, depth: int):
    """Logistic-probe metrics on each block's pooled output: {metric: [per block]}."""
    split = meta["split"].to_numpy()
    curve: dict[str, list[float]] = {}
    for i, Xb in enumerate(np.split(blocks, depth, axis=1)):
        Xc = corrections(cfg, meta, Xb, [cfg.probes.per_block_correction])[cfg.probes.per_block_correction]
        metrics, _ = run_probe("logistic", Xc, y, split, cfg.probes)
        for k, v in metrics.items():
            curve.setdefault(k, []).append(v)
        log.info("block %d: %s", i + 1, {k: round(v, 3) for k, v in metrics.items() if k.startswith("test/")})
    return curve


# ----------------------------------------------------------------------------------------------------------------
# The job


def run_evaluate(cfg: EvaluateConfig, parent_run_id: str | None = None) -> dict:
    """The whole evaluation; returns a summary with the metrics table and the MLflow run ids."""
    import mlflow

    from camae.data import prepare_dataset
    from camae.identity import split_identity
    from camae.tracking import active_run, baseline_key, end_run, flatten, log_metrics, log_split, start_run

    out = (Path(cfg.run.output_dir) / cfg.run.name).resolve()
    table, labels = prepare_dataset(cfg.data, cfg.synth, out)
    save_config(cfg, out / "config.yaml")
    output, uri = join_cluster(cfg, out)
    meta, arrays, embedded = embed(cfg, table, output)
    y = labels.encode(meta["label"])
    split_id = split_identity(table)
    tags = {"camae.split": split_id, "camae.baseline_key": baseline_key(cfg, split_id),
            "camae.encoder": cfg.embed.encoder.checkpoint or "random", "camae.dataset": Path(cfg.data.root).name,
            "camae.channels": ",".join(cfg.data.channels)}
    params = flatten(to_dict(cfg))
    parent = start_run(uri, cfg.tracking.experiment, cfg.tracking.run_name or cfg.run.name, params,
                       tags | {"camae.kind": "evaluation"}, parent_run_id=parent_run_id)
    log_split(uri, parent, table, tags["camae.dataset"], str(cfg.data.root))
    log_metrics(uri, parent, {"embed/sites": embedded.sites, "embed/skipped_sites": embedded.skipped,
                              "embed/nodes": embedded.nodes}, step=0)
    if embedded.skipped:
        log.warning("%d sites were skipped (data.on_error=skip); see %s/skipped", embedded.skipped, embedded.output)
    try:
        summary = _evaluate(cfg, out, table, meta, arrays, y, labels, uri, parent, params, tags)
    except BaseException:
        end_run(uri, parent, "FAILED")
        raise
    summary |= {"run_id": parent, "tracking_uri": uri, "split": split_id, "embedding": asdict(embedded)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    with active_run(uri, parent):
        for f in sorted(out.glob("*.png")) + sorted(out.glob("*.csv")) + [out / "metrics.md", out / "config.yaml",
                                                                           out / "summary.json"]:
            mlflow.log_artifact(str(f))
    end_run(uri, parent)
    return summary


def _evaluate(cfg, out, table, meta, arrays, y, labels, uri, parent, params, tags) -> dict:
    from camae.metrics import confusion, markdown_table
    from camae.plots import plot_confusion
    from camae.tracking import end_run, log_metrics, log_split, start_run
    from evaluation.report import plot_curve, plot_projections

    X, split = arrays["embedding"], meta["split"].to_numpy()
    corrected = corrections(cfg, meta, X, cfg.correction.methods)
    pairs = known_pairs(cfg)
    rows, probe_runs, bio_tables, summary_skipped = [], [], [], {}
    for method, Xc in corrected.items():
        bio, per_pert, skipped = biology(cfg, meta, Xc, pairs)
        for name, why in skipped.items():
            log.warning("%s: %s skipped: %s", method, name, why)
        summary_skipped |= skipped
        log_metrics(uri, parent, {f"{method}/{k}": v for k, v in bio.items()}, step=0)
        if per_pert is not None:
            bio_tables.append(per_pert.assign(correction=method))
        for kind in cfg.probes.kinds:
            metrics, predictions = run_probe(kind, Xc, y, split, cfg.probes)
            name = f"probe {kind} {method}"
            run = start_run(uri, cfg.tracking.experiment, name, params,
                            tags | {"camae.kind": "probe", "camae.probe": kind, "camae.correction": method},
                            parent_run_id=parent)
            log_split(uri, run, table, tags["camae.dataset"], str(cfg.data.root))
            log_metrics(uri, run, metrics | bio, step=0)
            end_run(uri, run)
            probe_runs.append(run)
            rows.append({"run": name, "kind": "probe", "probe": kind, "correction": method, **metrics, **bio})
            if cfg.run.plots and kind == "logistic" and method == cfg.correction.methods[-1] and "test" in predictions:
                t, p = predictions["test"]
                plot_confusion(confusion(t, p, len(labels)), list(labels.names), out / "confusion_test.png",
                               f"logistic probe, {method}, test plates")
        log.info("%s: %s", method, {k: round(v, 3) for k, v in bio.items()})
    frame = pd.DataFrame(rows)
    frame.to_csv(out / "metrics.csv", index=False)
    if bio_tables:
        pd.concat(bio_tables).to_csv(out / "replicate_map.csv", index=False)
    summary = {"probes": rows, "probe_runs": probe_runs, "skipped_metrics": summary_skipped}
    if cfg.probes.per_block and "embedding_blocks" in arrays:
        curve = block_curve(cfg, meta, arrays["embedding_blocks"], y, len(arrays["embedding_blocks"][0]) // X.shape[1])
        depth = len(next(iter(curve.values())))
        for i in range(depth):
            log_metrics(uri, parent, {f"block/{k}": v[i] for k, v in curve.items()}, step=i + 1)
        pd.DataFrame(curve, index=pd.RangeIndex(1, depth + 1, name="block")).to_csv(out / "per_block.csv")
        if cfg.run.plots:
            keys = [k for k in ("val/accuracy", "test/accuracy") if k in curve]
            plot_curve(range(1, len(curve[keys[0]]) + 1), {k: curve[k] for k in keys}, "encoder block",
                       "logistic probe accuracy", out / "per_block.png")
        summary["per_block"] = curve
    if cfg.biology.channel_leave_one_out and len(cfg.data.channels) > 1:
        method = cfg.biology.loo_correction
        reference = corrected[method] if method in corrected else corrections(cfg, meta, X, [method])[method]
        summary["channel_leave_one_out"] = leave_one_out(cfg, out, table, meta, reference, y, uri, parent)
    if cfg.run.plots:
        shown = {m: corrected[m] for m in ("raw", cfg.correction.methods[-1]) if m in corrected}
        plot_projections(meta, shown, out / "projection.png")
    (out / "metrics.md").write_text(markdown_table(frame[[c for c in frame.columns if c in METRICS_SHOWN]]))
    return summary


METRICS_SHOWN = ("run", "correction", "val/accuracy", "test/accuracy", "test/chance_accuracy", "test/macro_f1",
                 "test/balanced_accuracy", "test/chance_balanced_accuracy",
                 "bio/map", "bio/fraction_retrieved", "bio/consistency_map", "bio/recall_0.05_0.95",
                 "bio/recall_0.1_0.9", "bio/plate_predictability")


def leave_one_out(cfg: EvaluateConfig, out: Path, table: pd.DataFrame, meta: pd.DataFrame, full: np.ndarray,
                  y: np.ndarray, uri: str, parent: str) -> dict:
    """Re-embed without each channel in turn; logistic probe and mAP on biology.loo_correction (`full`: the
    all-channel embeddings with that correction, the reference)."""
    from camae.tracking import log_metrics
    from evaluation.report import plot_bars

    method, results = cfg.biology.loo_correction, {}
    reference = run_probe("logistic", full, y, meta["split"].to_numpy(), cfg.probes)[0].get("test/accuracy", np.nan)
    for channel in cfg.data.channels:
        kept = [c for c in cfg.data.channels if c != channel]
        m, arrays, _ = embed(cfg, table, out / "embeddings_without" / channel, kept, blocks=False)
        order = m["sample_id"].map({s: i for i, s in enumerate(meta["sample_id"])}).to_numpy()
        Xc = corrections(cfg, m, arrays["embedding"], [method])[method]
        metrics, _ = run_probe("logistic", Xc, y[order], m["split"].to_numpy(), cfg.probes)
        if cfg.biology.replicate_map:
            wells, P = well_profiles(m, Xc)
            b = cfg.biology
            metrics["bio/map"] = replicate_map(wells, P, b.null_size, b.fdr, cfg.data.seed)[1]["map"]
        results[channel] = metrics
        log_metrics(uri, parent, {f"loo/{channel}/{k}": v for k, v in metrics.items()}, step=0)
        log.info("without %s: %s", channel, {k: round(v, 3) for k, v in metrics.items() if k.startswith("test/")})
    pd.DataFrame(results).T.rename_axis("left_out").to_csv(out / "channel_leave_one_out.csv")
    if cfg.run.plots and "test/accuracy" in next(iter(results.values())):
        plot_bars({c: r["test/accuracy"] for c, r in results.items()}, reference, "logistic probe test accuracy",
                  out / "channel_leave_one_out.png")
    return results


# ----------------------------------------------------------------------------------------------------------------
# Entry points


def join_cluster(cfg: EvaluateConfig, out: Path) -> tuple[str, str]:
    """Join the Ray cluster and check, before any actor starts, that every node can reach the embedding output
    (decode tasks on any node write skip logs there) and that the MLflow store answers; returns both."""
    from camae import storage
    from camae.cluster import check_outputs
    from camae.tracking import resolve_tracking_uri

    connect()
    output = storage.resolve(cfg.embed.output or out / "embeddings")
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri, Path(cfg.run.output_dir).resolve())
    check_outputs(output, uri, "embed.output")
    return output, uri


def run_embed(cfg: EvaluateConfig) -> dict:
    """Only the embedding pass (`camae embed`)."""
    from camae.data import prepare_dataset

    out = (Path(cfg.run.output_dir) / cfg.run.name).resolve()
    table, _ = prepare_dataset(cfg.data, cfg.synth, out)
    output, _ = join_cluster(cfg, out)
    return asdict(embed_table(table, cfg.data, cfg.embed, output))


def main(argv: list[str] | None = None, only_embed: bool = False) -> int:
    from camae.console import setup
    from camae.tracking import ui_command

    parser = job_parser("camae embed" if only_embed else "evaluation.evaluate", __doc__, "evaluate")
    args = parser.parse_args(argv)
    setup(args.verbose)
    try:
        cfg = load_config(EvaluateConfig, job_config(args), args.set)
        if only_embed:
            print(json.dumps(run_embed(cfg), indent=2))
            return 0
        summary = run_evaluate(cfg, parent_run_id=os.environ.get("CAMAE_PARENT_RUN_ID"))
    except ValueError as err:  # the config, or what the data, cluster, storage or tracking server refused up front
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    print((Path(cfg.run.output_dir) / cfg.run.name / "metrics.md").read_text())
    print(f"outputs: {Path(cfg.run.output_dir).resolve() / cfg.run.name}")
    print(ui_command(summary["tracking_uri"], cfg.tracking.experiment))
    return 0


if __name__ == "__main__":
    sys.exit(main())
