"""Ray Tune sweeps of fine-tunes, in MLflow beside the frozen-embedding probe baselines.

    camae sweep --config configs/tune/quickstart.yaml [--set sweep.num_samples=8 ...] [--restart]
    python -m finetune.tune --config ...     # the same; for `ray job submit --working-dir . -- python -m ...`

`run_sweep` is the driver: it checks the search space against the fine-tuning config before any trial starts,
opens a parent MLflow run, runs (or reuses) the probe baseline on the same split (`python -m evaluation.evaluate`
in a subprocess: finetune never imports evaluation), then runs a `Tuner` whose function trainable `train_driver_fn`
builds each trial's `TorchTrainer` (at least one Ray Train worker, so `TuneReportCallback` carries every epoch's
metrics to Tune and ASHA). Each trial is a nested MLflow run. At the end: the comparison table (baseline probes and
trials, by the sweep metric), the best trial's official-format export, both printed and logged.

Rerunning the same command resumes an interrupted sweep (`Tuner.restore`): finished trials are not run again.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from camae import storage
from camae.config import (
    ConfigError,
    EvaluateConfig,
    FinetuneConfig,
    SweepConfig,
    apply_overrides,
    dotted_items,
    from_dict,
    job_config,
    job_parser,
    load_config,
    save_config,
    set_key,
    to_dict,
)
from camae.console import say

log = logging.getLogger("camae.sweep")

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")
SHOWN = ["run", "kind", "mode", "correction", "best_epoch", "best/val/accuracy", "test/accuracy",
         "test/accuracy_ci_low", "test/accuracy_ci_high", "test/chance_accuracy", "test/macro_f1",
         "test/balanced_accuracy", "test/chance_balanced_accuracy"]


# ----------------------------------------------------------------------------------------------------------------
# The search space: YAML -> Tune distributions, checked against FinetuneConfig first


def distribution(spec) -> tuple[str, object] | None:
    """(kind, arguments) of a search-space entry such as `{loguniform: [1e-4, 1e-2]}`; None for a fixed value."""
    if isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS:
        return next(iter(spec.items()))
    return None


def parse_space(space: dict) -> dict:
    """{dotted key: ray.tune distribution or fixed value}; errors name the key."""
    from ray import tune

    out = {}
    for key, spec in space.items():
        if distribution(spec) is None:
            if isinstance(spec, dict):
                raise ConfigError(f"sweep.search_space.{key}: give one of {list(DISTRIBUTIONS)} (e.g. "
                                  f"{{loguniform: [1e-4, 1e-2]}}), got {spec}")
            out[key] = spec
            continue
        kind, args = distribution(spec)
        if not isinstance(args, list) or not args or (kind not in ("choice", "grid") and len(args) != 2):
            raise ConfigError(f"sweep.search_space.{key}.{kind} needs a list"
                              f"{'' if kind in ('choice', 'grid') else ' [low, high]'}, got {args!r}")
        if kind in ("uniform", "loguniform"):
            args = [float(a) for a in args]
        out[key] = {"choice": tune.choice, "grid": tune.grid_search}[kind](args) if kind in ("choice", "grid") \
            else getattr(tune, kind)(*args)
    return out


def candidate_values(space: dict) -> dict[str, list]:
    """Values to validate each key with: every choice, or a range's ends."""
    out = {}
    for key, spec in space.items():
        if distribution(spec) is not None:
            kind, args = distribution(spec)
            out[key] = list(args) if kind in ("choice", "grid") else [args[0], args[-1] - (kind == "randint")]
        else:
            out[key] = [spec]
    return out


SHORT = {"train.lora.r": "r", "train.lr": "lr"}  # written without "=" in run names: "lora r8 lr1e-3"


def trial_name(params: dict, trial_id: str = "", numbered: bool = False) -> str:
    """The one name of a trial (Tune's trial table, the MLflow run, the comparison table): what differs between
    trials, mode first, e.g. `lora r8 lr1e-3`, `full lr3e-3`; `#n` (the trial's number) when sampled values
    could repeat a name."""
    mode = params.get("train.mode")
    parts = [str(mode)] if mode else []
    for key in sorted(params, key=lambda k: (k not in SHORT, list(SHORT).index(k) if k in SHORT else 0, k)):
        if key == "train.mode" or (key.startswith("train.lora.") and mode not in (None, "lora")):
            continue
        value = _compact(params[key])
        parts.append(f"{SHORT[key]}{value}" if key in SHORT else f"{key.rsplit('.', 1)[-1]}={value}")
    name = " ".join(parts) or "trial"
    return f"{name} #{int(trial_id.rsplit('_', 1)[-1]) + 1}" if numbered and trial_id else name


def _compact(value) -> str:
    """1e-3 rather than 0.001; plain numbers between 0.01 and 1000."""
    if isinstance(value, float) and value and not 1e-2 <= abs(value) < 1e3:
        mantissa, exponent = f"{value:.2e}".split("e")
        return f"{float(mantissa):g}e{int(exponent)}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def numbered(space: dict, num_samples: int) -> bool:
    """Whether trial names need their number: several samples, or a sampled (not grid) dimension."""
    searched = [distribution(spec) for spec in space.values()]
    return num_samples > 1 or any(d is not None and d[0] != "grid" for d in searched)


def planned_trials(space: dict, num_samples: int) -> int:
    """Trials the sweep runs: num_samples times each grid combination."""
    grids = [len(d[1]) for d in map(distribution, space.values()) if d is not None and d[0] == "grid"]
    return num_samples * int(np.prod(grids, dtype=int))


def trial_config(base: dict, params: dict) -> FinetuneConfig:
    """The FinetuneConfig of one trial: base + sampled {dotted key: value}."""
    tree = copy.deepcopy(base)
    for key, value in params.items():
        set_key(tree, key, value)
    return from_dict(FinetuneConfig, tree)


def validate_space(base: dict, space: dict) -> None:
    """Every searched key must exist and accept its values; a typo fails here, before any trial starts."""
    parse_space(space)  # the distributions themselves
    for key, values in candidate_values(space).items():
        for value in values:
            try:
                trial_config(base, {key: value})
            except ConfigError as err:
                raise ConfigError(f"sweep.search_space.{key} = {value!r}: {err}") from err


# ----------------------------------------------------------------------------------------------------------------
# The driver


def resolve(sweep: SweepConfig) -> tuple[dict, FinetuneConfig]:
    """The base finetune config as a dict (file + sweep.finetune overrides), checked."""
    base_path = Path(sweep.base)
    if not base_path.is_file():
        raise ConfigError(f"base: {base_path} does not exist (a finetune YAML, relative to {Path.cwd()})")
    tree = yaml.safe_load(base_path.read_text()) or {}
    for key, value in dotted_items(sweep.finetune).items():
        set_key(tree, key, value)
    try:
        cfg = from_dict(FinetuneConfig, tree)
    except ConfigError as err:
        raise ConfigError(f"finetune (the base {base_path} with the sweep's overrides): {err}") from err
    return to_dict(cfg), cfg


def concurrency(sweep: SweepConfig, base: FinetuneConfig) -> int:
    """Trials at once: the cluster's CPUs (less one for Ray Data) and GPUs over what one trial's workers take."""
    import ray

    if sweep.sweep.max_concurrent_trials:
        return sweep.sweep.max_concurrent_trials
    res = ray.cluster_resources()
    workers = max(1, base.run.num_workers)
    n = int((res.get("CPU", 1) - 1) // (workers * base.run.cpus_per_worker))
    if base.run.use_gpu:
        n = min(n, int(res.get("GPU", 0) // workers))
    if n < 1:
        raise ConfigError(f"one trial needs {workers} worker(s) x {base.run.cpus_per_worker} CPUs"
                          f"{' and a GPU each' if base.run.use_gpu else ''} plus a CPU for Ray Data, more than the "
                          f"cluster's {res}; lower run.num_workers / run.cpus_per_worker")
    return n


def baseline_config(sweep: SweepConfig, base: FinetuneConfig, out: Path, uri: str, experiment: str):
    """The evaluate config of the probe baseline: the sweep's data, split and (random or pretrained) encoder."""
    cfg = load_config(EvaluateConfig, sweep.baseline.config) if sweep.baseline.config else EvaluateConfig()
    if not sweep.baseline.config:
        cfg.biology.channel_leave_one_out = False
    cfg.data, cfg.synth = copy.deepcopy(base.data), copy.deepcopy(base.synth)
    cfg.embed.encoder = copy.deepcopy(base.model.encoder)  # the very encoder the fine-tunes start from
    cfg.embed.use_gpu = "auto" if base.run.use_gpu else "no"
    cfg.run.output_dir, cfg.run.name = str(out), "baseline"
    cfg.tracking.tracking_uri, cfg.tracking.experiment = uri, experiment
    cfg.tracking.run_name = "probe baselines"
    if sweep.baseline.set:
        cfg = from_dict(EvaluateConfig, apply_overrides(to_dict(cfg), sweep.baseline.set))
    return cfg


def run_baseline(sweep: SweepConfig, base: FinetuneConfig, out: Path, uri: str, experiment: str, split: str,
                 parent: str) -> list[dict]:
    """Reuse finished baseline probe runs with the same key, or run `python -m evaluation.evaluate`."""
    from camae.tracking import baseline_key, find_runs

    cfg = baseline_config(sweep, base, out, uri, experiment)
    key = baseline_key(cfg, split)
    expected = len(cfg.probes.kinds) * len(cfg.correction.methods)
    runs = find_runs(uri, experiment, {"camae.kind": "probe", "camae.baseline_key": key})
    if not (sweep.baseline.reuse and len(runs) >= expected):
        path = save_config(cfg, out / "baseline.yaml")
        env = dict(os.environ, CAMAE_PARENT_RUN_ID=parent)
        import ray

        if ray.is_initialized():  # the subprocess joins this Ray cluster instead of starting another
            env.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
        say(f"baseline: frozen-encoder probes ({', '.join(cfg.probes.kinds)} x {', '.join(cfg.correction.methods)})"
            f" on the same split; log in {out / 'baseline.log'}")
        _evaluate_subprocess(path, env, out / "baseline.log")
        runs = find_runs(uri, experiment, {"camae.kind": "probe", "camae.baseline_key": key})
    else:
        say(f"baseline: reusing {len(runs)} finished probe runs with the same split and encoder")
    seen, rows = set(), []
    for run in sorted(runs, key=lambda r: -r.info.start_time):  # newest of each probe x correction
        kind = (run.data.tags["camae.probe"], run.data.tags["camae.correction"])
        if kind not in seen:
            seen.add(kind)
            rows.append({"run": run.info.run_name, "kind": "probe", "mode": f"probe {kind[0]}",
                         "correction": kind[1], "run_id": run.info.run_id, **run.data.metrics})
    return rows


def _evaluate_subprocess(config: Path, env: dict, log_file: Path) -> None:
    """`python -m evaluation.evaluate` with its output in log_file; a failure raises with the log's last lines."""
    with open(log_file, "w") as f:
        done = subprocess.run([sys.executable, "-m", "evaluation.evaluate", "--config", str(config)], env=env,
                              stdout=f, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[1])
    if done.returncode:
        tail = "".join(log_file.read_text().splitlines(keepends=True)[-15:])
        raise RuntimeError(f"the baseline evaluation failed (exit {done.returncode}); the end of {log_file}:\n{tail}")


def trial_rows(trials_storage: str, results, sweep: SweepConfig) -> list[dict]:
    """One row per trial, named as its MLflow run: its sampled parameters and the best epoch's validation and
    test metrics (finished trials, from the summary each trial left in the sweep's storage, whichever node ran it),
    or its best reported epoch (stopped early by the scheduler: no test)."""
    rows, numbered_names = [], numbered(sweep.sweep.search_space, sweep.sweep.num_samples)
    for result in results:
        metrics, params = result.metrics or {}, (result.config or {}).get("params", {})
        trial = f"trial_{metrics.get('trial_id', 'unreported')}"
        summary_file = storage.join(trials_storage, trial, "summary.json")
        row = {"run": trial_name(params, metrics.get("trial_id", ""), numbered_names), "trial": trial,
               "kind": "finetune", "correction": "", "mode": params.get("train.mode", ""),
               **{f"param/{k}": v for k, v in params.items()}}
        if storage.exists(summary_file):
            summary = json.loads(storage.read_text(summary_file))
            row |= {k: v for k, v in summary.items() if "/" in k}
            row |= {"run_id": summary["run_id"], "export": summary.get("export_uri", summary["export"]),
                    "best_epoch": summary["best_epoch"], "model_uri": summary.get("model_uri"), "finished": True}
        else:
            row |= best_reported(result.metrics_dataframe, sweep.sweep.metric, sweep.sweep.mode) | {"finished": False}
        rows.append(row)
    return rows


def best_reported(history: pd.DataFrame | None, metric: str, mode: str) -> dict:
    """`best/val/...` and best_epoch of a trial's reported epochs (as a finished trial's summary names them)."""
    if history is None or metric not in history or history[metric].isna().all():
        return {}
    best = history.loc[history[metric].idxmax() if mode == "max" else history[metric].idxmin()]
    return {f"best/{k}": float(best[k]) for k in history if k.startswith("val/")} | {"best_epoch": int(best["epoch"])}


def run_sweep(sweep: SweepConfig, restart: bool = False) -> dict:
    """The whole sweep; returns a summary with the comparison table, the best trial and the baseline."""
    from ray import tune

    from camae.classifier import warn_random
    from camae.cluster import check_cpus, check_outputs, connect
    from camae.console import ray_logs
    from camae.data import prepare_dataset
    from camae.identity import split_identity
    from camae.tracking import end_run, flatten, log_metrics, resolve_tracking_uri, start_run

    base_dict, base = resolve(sweep)
    validate_space(base_dict, sweep.sweep.search_space)
    out = (Path(base.run.output_dir) / sweep.name).resolve()
    if restart and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    state_file = out / "sweep.json"
    resolved = {"sweep": to_dict(sweep), "base": base_dict}
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    uri = resolve_tracking_uri(base.tracking.tracking_uri, Path(base.run.output_dir).resolve())
    if state:
        check_saved_store(state, uri, state_file)
    if state and state["resolved"] != resolved:
        raise ConfigError(f"{out} holds a sweep with another config; rerun with --restart to start over, or set "
                          "name to a new sweep")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")  # reports block this long (local clusters)
    connect()
    check_cpus(max(1, base.run.num_workers), base.run.cpus_per_worker)
    warn_random(base.model.encoder)
    say(f"Ray's own logs: {ray_logs()} (--verbose shows them here)")
    stored = sweep_storage(sweep, base, out)
    check_outputs(stored, uri)
    table, _ = prepare_dataset(base.data, base.synth, out)
    split = split_identity(table)
    experiment = sweep.experiment or base.tracking.experiment
    if "parent_run_id" not in state:
        state = {"resolved": resolved, "tracking_uri": uri, "parent_run_id": start_run(
            uri, experiment, sweep.name, flatten({"sweep": to_dict(sweep.sweep), "base": base_dict}),
            {"camae.kind": "sweep", "camae.split": split, "camae.sweep": sweep.name})}
        state_file.write_text(json.dumps(state, indent=2) + "\n")
    parent = state["parent_run_id"]
    try:
        rows = run_baseline(sweep, base, out, uri, experiment, split, parent) if sweep.baseline.enabled else []
        grid = _tune(sweep, base, base_dict, stored, {"tracking_uri": uri, "experiment": experiment,
                                                      "parent_run_id": parent, "trials_dir": str(out / "trials")})
        if _interrupted(storage.join(stored, "tune"), tune):
            print(f"[camae] sweep interrupted; rerun the same command to resume it ({out})", flush=True)
            return {"interrupted": True, "output": str(out)}
        rows += trial_rows(storage.join(stored, "trials"), grid, sweep)
        summary = summarize(sweep, rows, out, uri, parent)
    except BaseException as err:
        if not isinstance(err, KeyboardInterrupt):
            end_run(uri, parent, "FAILED")
        raise
    _close_stopped_runs(uri, parent)
    log_metrics(uri, parent, {k: v for k, v in summary.items() if isinstance(v, float)}, step=0)
    end_run(uri, parent)
    return summary


def check_saved_store(state: dict, uri: str, state_file: Path) -> None:
    """A sweep's saved state belongs to one MLflow store: its parent and trial runs live there. Resuming against
    another store (a new MLFLOW_TRACKING_URI, a deleted mlflow.db) is refused with the way out, not a traceback."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    saved = state.get("tracking_uri")
    if saved != uri:
        raise ConfigError(f"{state_file} belongs to the MLflow store {saved}, not {uri}; rerun with --restart to start "
                          "this sweep over in the current store, or point tracking back at the old one")
    try:
        MlflowClient(uri).get_run(state["parent_run_id"])
    except MlflowException as err:
        raise ConfigError(f"the sweep's parent run {state['parent_run_id']} is not in {uri} (was the store deleted?); "
                          "rerun with --restart to start this sweep over") from err


def sweep_storage(sweep: SweepConfig, base: FinetuneConfig, out: Path) -> str:
    """Where the sweep's state (Tune's experiment) and its trials' checkpoints, summaries and exports go: the base
    config's run.storage_path/<sweep name> (a URI or a path every node reads, on a cluster), else the sweep's
    output directory."""
    return storage.join(base.run.storage_path, sweep.name) if base.run.storage_path else str(out)


def _tune(sweep: SweepConfig, base: FinetuneConfig, base_dict: dict, stored: str, tracking: dict):
    """Run the Tuner, or restore and finish an earlier one; returns its ResultGrid."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from camae.console import verbose
    from finetune.trial import SweepProgress

    s = sweep.sweep
    names = numbered(s.search_space, s.num_samples)
    trainable = _trainable(tune, {"base": base_dict, "trials_storage": storage.join(stored, "trials"),
                                  "sweep": sweep.name, "numbered": names, **tracking})
    path = storage.join(stored, "tune")
    progress = SweepProgress(base.train.epochs, planned_trials(s.search_space, s.num_samples), names,
                             storage.join(stored, "trials"))
    if not verbose():  # Tune's new output prints its experiment box whatever the verbosity; the legacy one obeys
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    if tune.Tuner.can_restore(path):
        say(f"resuming the sweep in {path}: finished trials are kept")  # with its saved RunConfig and progress
        return tune.Tuner.restore(path, trainable=trainable, resume_errored=True).fit()
    # max_t one past the last epoch: at max_t ASHA stops a trial, which would kill it before it tests and exports
    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=base.train.epochs + 1,
                               grace_period=sweep.sweep.scheduler.grace_period,
                               reduction_factor=sweep.sweep.scheduler.reduction_factor)
                 if s.scheduler.kind == "asha" else FIFOScheduler())
    tune_path, tune_fs = storage.ray_storage(stored)
    tuner = tune.Tuner(
        trainable,
        param_space={"params": parse_space(s.search_space)},
        # max_concurrent_trials goes to the (seeded) search algorithm: Tune ignores TuneConfig's when given one
        tune_config=tune.TuneConfig(metric=s.metric, mode=s.mode, num_samples=s.num_samples, scheduler=scheduler,
                                    search_alg=BasicVariantGenerator(max_concurrent=concurrency(sweep, base),
                                                                     random_state=s.seed),
                                    trial_name_creator=lambda trial: trial_name(trial.config["params"],
                                                                                trial.trial_id, names)),
        run_config=tune.RunConfig(name="tune", storage_path=tune_path, storage_filesystem=tune_fs,
                                  verbose=1 if verbose() else 0, callbacks=[progress]),
    )
    return tuner.fit()


def _trainable(tune, context: dict):
    """The trial function with the sweep's fixed context (kept out of the search space, so Tune's trial table
    shows only searched keys). The trial driver only waits on its Train workers: it takes no CPU (Tune refuses an
    empty request, so it asks for 100 MB of memory instead), leaving the CPUs to the workers and Ray Data."""
    from finetune.trial import train_driver_fn

    return tune.with_resources(tune.with_parameters(train_driver_fn, context=context),
                               {"CPU": 0, "memory": 100 * 2**20})


def _interrupted(path: str, tune) -> bool:
    """Whether Ctrl+C cut the sweep short. The ResultGrid cannot tell (Tune's teardown marks the trials it stops
    TERMINATED); the saved experiment state, written before that teardown, can."""
    saved = tune.Tuner.restore(path, trainable=_trainable(tune, {})).get_results()
    return saved.num_terminated + saved.num_errors < len(saved)


def _close_stopped_runs(uri: str, parent: str) -> None:
    """Trials ASHA stopped die with their MLflow runs open: mark them KILLED, tagged camae.stopped_early."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_run(parent).info.experiment_id
    for run in client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}' and attributes.status = 'RUNNING'"):
        client.set_tag(run.info.run_id, "camae.stopped_early", "true")
        client.set_terminated(run.info.run_id, "KILLED")


def summarize(sweep: SweepConfig, rows: list[dict], out: Path, uri: str, parent: str) -> dict:
    """The comparison (printed, written, logged as an MLflow table and a plot), the best trial (registered as
    @champion), and its gap to the best baseline probe; both picked by the sweep metric at their best epoch."""
    from camae.metrics import markdown_table

    metric, sign = f"best/{sweep.sweep.metric}", 1 if sweep.sweep.mode == "max" else -1
    frame = pd.DataFrame(rows)
    if metric not in frame:
        raise RuntimeError(f"no trial or baseline reported {sweep.sweep.metric!r} (sweep.metric); see {out}")
    # ties broken by name, so a rerun picks the same best
    frame = frame.sort_values([metric, "run"], ascending=[sign < 0, True], na_position="last", ignore_index=True)
    frame.to_csv(out / "comparison.csv", index=False)
    (out / "comparison.md").write_text(markdown_table(frame[[c for c in SHOWN if c in frame]]))
    trials = frame[(frame["kind"] == "finetune") & frame.get("finished", False).fillna(False).astype(bool)]
    probes = frame[frame["kind"] == "probe"]
    summary: dict = {"output": str(out), "tracking_uri": uri, "run_id": parent,
                     "trials": int((frame["kind"] == "finetune").sum()), "trials_finished": len(trials)}
    if len(trials):
        best = trials.iloc[0]
        # on the sweep's own run under names no trial or probe uses, so its row stays out of their columns
        summary |= {"best_run": best["run"], "best_export": best["export"],
                    f"champion/{sweep.sweep.metric}": float(best[metric]),
                    "best_params": {k.removeprefix("param/"): v for k, v in best.items()
                                    if k.startswith("param/") and not pd.isna(v)}}
        if not pd.isna(best.get("test/accuracy")):
            summary |= {"champion/test/accuracy": float(best["test/accuracy"]),
                        "chance/test/accuracy": float(best["test/chance_accuracy"])}
        if sweep.register and isinstance(best.get("model_uri"), str):
            summary["registered"] = register_champion(uri, best["model_uri"], best["run_id"], sweep.name)
    if len(probes):
        top = probes.iloc[0]
        summary |= {"baseline_run": top["run"], f"baseline/{sweep.sweep.metric}": float(top[metric]),
                    "baseline/test/accuracy": float(top["test/accuracy"])}
        if len(trials):
            summary[f"gap/{sweep.sweep.metric}"] = sign * (float(best[metric]) - float(top[metric]))
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    log_comparison(frame, out, uri, parent, summary)
    print("\n" + terminal_table(frame, metric), flush=True)
    return summary


def terminal_table(frame: pd.DataFrame, metric: str) -> str:
    """The comparison as the terminal shows it: the best of each kind starred (by the sweep metric, never by
    test), test accuracy with its 95% interval, and chance."""
    best = {frame.index[frame["kind"] == kind][0] for kind in frame["kind"].unique()}
    ci = [f"{lo:.3f}-{hi:.3f}" if not pd.isna(lo) else "" for lo, hi in
          zip(frame.get("test/accuracy_ci_low", pd.Series(index=frame.index, dtype=float)),
              frame.get("test/accuracy_ci_high", pd.Series(index=frame.index, dtype=float)), strict=True)]
    shown = pd.DataFrame({"": ["*" if i in best else "" for i in frame.index], "run": frame["run"],
                          "kind": frame["kind"], "best_epoch": frame.get("best_epoch", ""),
                          metric: frame[metric], "test/accuracy": frame.get("test/accuracy"), "95% CI": ci,
                          "chance": frame.get("test/chance_accuracy")})
    shown["best_epoch"] = [str(int(e)) if isinstance(e, int | float) and not pd.isna(e) else "" for e in
                           shown["best_epoch"]]
    shown = shown.astype(object).where(shown.notna(), "")
    note = f"* the best of each kind by {metric}; test: held-out plates (stopped trials have none)"
    return shown.to_string(index=False, float_format=lambda v: f"{v:.3f}") + "\n" + note


def log_comparison(frame: pd.DataFrame, out: Path, uri: str, parent: str, summary: dict) -> None:
    """On the sweep's run: the comparison as an MLflow table (the Evaluation/Artifacts views show it) and as a
    plot, the files, and the best trial's export."""
    import mlflow

    from camae.plots import plot_comparison
    from camae.tracking import active_run

    plot_comparison(frame, out / "comparison.png")
    with active_run(uri, parent):
        mlflow.log_table(frame[[c for c in SHOWN if c in frame]], artifact_file="comparison.json")
        for name in ("comparison.png", "comparison.csv", "comparison.md", "summary.json", "splits.csv",
                     "labels.json"):
            if (out / name).is_file():
                mlflow.log_artifact(str(out / name))
        if "best_export" in summary:
            export = summary["best_export"]
            if storage.is_uri(export):
                export = str(storage.download(export, out / "best_export"))
            mlflow.log_artifacts(export, "best_export")


def register_champion(uri: str, model_uri: str, run_id: str, name: str) -> str:
    """Register the model in MLflow's Model Registry as a new version of `name` and point @champion at it (kept
    as is when @champion already is this run's model: a rerun adds no version); returns `models:/name@champion`."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from camae.tracking import using_tracking_uri

    client = MlflowClient(uri)
    try:
        if client.get_model_version_by_alias(name, "champion").run_id == run_id:
            return f"models:/{name}@champion"
    except MlflowException:  # no such model or alias yet
        pass
    with using_tracking_uri(uri), contextlib.redirect_stderr(io.StringIO()):  # its two lines say what we say
        version = mlflow.register_model(model_uri, name)
    client.set_registered_model_alias(name, "champion", version.version)
    return f"models:/{name}@champion"


def main(argv: list[str] | None = None) -> int:
    from camae.console import setup
    from camae.tracking import ui_command

    parser = job_parser("finetune.tune", __doc__, "tune")
    parser.add_argument("--restart", action="store_true", help="discard an earlier run of this sweep; start over")
    args = parser.parse_args(argv)
    setup(args.verbose)
    try:
        sweep = load_config(SweepConfig, job_config(args), args.set)
        base_dict, base = resolve(sweep)
        validate_space(base_dict, sweep.sweep.search_space)
        summary = run_sweep(sweep, restart=args.restart)
    except ValueError as err:  # the config, or what the data, cluster, storage or tracking server refused up front
        print(f"sweep: error: {err}", file=sys.stderr)
        return 2
    if summary.get("interrupted"):
        return 130
    for line in result_lines(summary, sweep.sweep.metric):
        print(line)
    print(ui_command(summary["tracking_uri"], sweep.experiment or base.tracking.experiment))
    return 0


def result_lines(summary: dict, metric: str) -> list[str]:
    """What the sweep found, in a few lines under its table."""
    lines = []
    if f"gap/{metric}" in summary:
        gap = summary[f"gap/{metric}"]
        lines.append(f"best fine-tune '{summary['best_run']}' vs best probe '{summary['baseline_run']}': "
                     f"{gap:+.3f} {metric} at their best epochs; on the test plates "
                     f"{summary.get('champion/test/accuracy', float('nan')):.3f} vs "
                     f"{summary['baseline/test/accuracy']:.3f} accuracy "
                     f"(chance {summary.get('chance/test/accuracy', float('nan')):.3f})")
    if "registered" in summary:
        lines.append(f"registered: {summary['registered']} (the best fine-tune's MLflow model)")
    lines.append(f"outputs: {summary['output']} (comparison.md, comparison.png, summary.json, trials/)")
    return lines


if __name__ == "__main__":
    sys.exit(main())
