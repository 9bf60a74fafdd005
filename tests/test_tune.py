"""Sweeps: the search space is checked before any trial; a two-trial sweep on a tiny model, interrupted and
resumed, lands in MLflow as nested runs beside its probe baseline."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from camae.config import ConfigError, SweepConfig, load_config
from finetune.tune import candidate_values, parse_space, resolve, validate_space

REPO = Path(__file__).resolve().parents[1]
TUNE = REPO / "configs" / "tune"


@pytest.mark.parametrize("path", sorted(TUNE.glob("*.yaml")), ids=lambda p: p.name)
def test_sweep_configs_resolve_and_validate(path, monkeypatch):
    monkeypatch.chdir(REPO)  # base: paths are relative to the working directory, as with `ray job submit`
    sweep = load_config(SweepConfig, path)
    base, _ = resolve(sweep)
    validate_space(base, sweep.sweep.search_space)
    assert parse_space(sweep.sweep.search_space)


@pytest.mark.parametrize("space, message", [
    ({"train.lrr": {"loguniform": [1e-4, 1e-2]}}, "sweep.search_space.train.lrr .*unknown config key 'train.lrr'; "
                                                  "did you mean 'train.lr'"),
    ({"train.mode": {"choice": ["lora", "ful"]}}, "train.mode = 'ful'.*choose one of"),
    ({"train.lr": {"logunif": [1e-4, 1e-2]}}, "give one of \\['choice', 'grid'"),
    ({"train.lr": {"uniform": [1e-4]}}, "needs a list \\[low, high\\]"),
])
def test_search_space_errors_name_the_key(space, message, monkeypatch):
    monkeypatch.chdir(REPO)
    base, _ = resolve(load_config(SweepConfig, TUNE / "quickstart.yaml"))
    with pytest.raises(ConfigError, match=message):
        validate_space(base, space)
        parse_space(space)


def test_candidate_values_cover_choices_and_range_ends():
    space = {"a": {"choice": [1, 2]}, "b": {"loguniform": [1e-4, 1e-2]}, "c": {"randint": [2, 5]}, "d": 7}
    assert candidate_values(space) == {"a": [1, 2], "b": [1e-4, 1e-2], "c": [2, 4], "d": [7]}


SMALL = ["synth.experiments=1", "synth.plates_per_experiment=4", "synth.wells_per_plate=12", "synth.classes=2",
         "synth.controls_per_plate=4", "synth.sites_per_well=1", "synth.effect_size=4", "train.epochs=2",
         "data.channels=[nuclei, er, mito]"]


def sweep_args(tmp: Path) -> list[str]:
    sets = [f"finetune.{s}" for s in [*SMALL, f"data.root={tmp / 'plates'}", f"run.output_dir={tmp}"]]
    sets += [f"base={REPO / 'configs/finetune/quickstart.yaml'}", "sweep.scheduler.kind=none", "name=test-sweep",
             "sweep.search_space={train.mode: {grid: [lora, full]}}", "sweep.max_concurrent_trials=1",
             'baseline.set=["biology.null_size=200", "probes.kinds=[logistic]", "probes.per_block=false"]']
    return [a for s in sets for a in ("--set", s)]


def _release_placement_groups_of_the_stopped_driver(ray, seconds: float = 30) -> None:
    """The interrupted sweep ran as its own driver on this test's cluster. Ray frees a dead driver's placement
    groups through that driver's PlacementGroupCleaner actor, which at times outlives it without freeing them (seen
    in CI: the cleaner of the stopped job still alive minutes later, its trial's bundle still reserved, and the
    resumed trial's Ray Data then without a CPU, waiting forever). Wait for Ray to free them, else free them here."""
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    deadline = time.time() + seconds
    while time.time() < deadline:
        left = [pg for pg, info in placement_group_table().items() if info["state"] == "CREATED"]
        if not left:
            return
        time.sleep(1)
    for pg in left:
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg))))


@pytest.mark.slow
def test_sweep_interrupted_resumes_and_nests_runs_beside_the_baseline(ray_session, tmp_path):
    from mlflow.tracking import MlflowClient

    from camae import MAEModel
    from finetune.tune import main

    args = ["--config", str(TUNE / "quickstart.yaml"), *sweep_args(tmp_path)]
    out = tmp_path / "test-sweep"
    env = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "finetune.tune", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while len(list(out.glob("trials/trial_*/config.yaml"))) < 2:  # the second trial starts once the first is done
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline, "the first trial did not finish in 5 minutes"
        time.sleep(1)
    first = next(out.glob("trials/trial_*/summary.json")).parent.name.removeprefix("trial_")
    proc.send_signal(signal.SIGINT)  # Ctrl+C: Tune saves its state and stops
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, log[-3000:]
    assert "rerun the same command to resume" in log
    _release_placement_groups_of_the_stopped_driver(ray_session)

    assert main(args) == 0  # the same command again: resumes
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trials"] == 2 and summary["trials_finished"] == 2

    client = MlflowClient(summary["tracking_uri"])
    state = json.loads((out / "sweep.json").read_text())
    parent = client.get_run(state["parent_run_id"])
    assert parent.data.tags["camae.kind"] == "sweep" and parent.info.status == "FINISHED"
    exp = parent.info.experiment_id
    children = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    finetunes = [r for r in children if r.data.tags.get("camae.kind") == "finetune"]
    finished = [r for r in finetunes if r.info.status == "FINISHED"]
    assert sorted(r.data.tags["camae.param.train.mode"] for r in finished) == ['"full"', '"lora"']
    assert sum(r.data.tags["camae.trial"] == first for r in finetunes) == 1  # the finished trial did not run again
    assert all("test/accuracy" in r.data.metrics for r in finished)
    (evaluation,) = [r for r in children if r.data.tags.get("camae.kind") == "evaluation"]
    probes = client.search_runs([exp], f"tags.`camae.kind` = 'probe' and tags.`mlflow.parentRunId` = "
                                       f"'{evaluation.info.run_id}'")
    assert sorted(r.data.tags["camae.correction"] for r in probes) == ["harmony", "pca_centerscale", "raw", "tvn"]
    assert {r.data.tags["camae.split"] for r in probes + finished} == {parent.data.tags["camae.split"]}

    table = pd.read_csv(out / "comparison.csv")
    assert sorted(table["kind"]) == ["finetune"] * 2 + ["probe"] * 4
    assert table["val/accuracy"].is_monotonic_decreasing
    assert "gap/val/accuracy" in summary and "baseline/val/accuracy" in parent.data.metrics
    MAEModel.from_pretrained(summary["best_export"])  # the best trial, in the official format
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"comparison.md", "comparison.csv", "best_export"} <= artifacts

    assert main(args) == 0  # once more: nothing left to run, the baseline is reused
    assert len(client.search_runs([exp], "tags.`camae.kind` = 'probe'")) == 4


@pytest.mark.parametrize("store", ["another", "deleted"])
def test_saved_sweep_against_another_mlflow_store_is_one_line(tmp_path, monkeypatch, capsys, store):
    """sweep.json names its store: rerunning against another one (or after mlflow.db was deleted) is refused with
    the --restart advice, not a raw `Run with id=... not found`."""
    from camae.tracking import resolve_tracking_uri, start_run
    from finetune.tune import main

    monkeypatch.chdir(REPO)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first = resolve_tracking_uri(None, tmp_path)  # the sweep's default store: <output_dir>/mlflow.db
    other = resolve_tracking_uri(None, tmp_path / "other")
    saved = other if store == "another" else first
    run = start_run(saved, "camae-quickstart", "old-sweep", {}, {"camae.kind": "sweep"})
    if store == "deleted":
        run = "0123456789abcdef0123456789abcdef"
    out = tmp_path / "test-sweep"
    out.mkdir()
    (out / "sweep.json").write_text(json.dumps({"resolved": {}, "tracking_uri": saved, "parent_run_id": run}))
    assert main(["--config", str(TUNE / "quickstart.yaml"), *sweep_args(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("sweep: error:") and "rerun with --restart" in err
    assert (f"belongs to the MLflow store {saved}, not {first}" in err) == (store == "another")
    assert ("is not in" in err) == (store == "deleted")
