"""Sweeps: the search space is checked before any trial; a two-trial sweep on a tiny model, interrupted and
resumed, lands in MLflow as nested runs beside its probe baseline."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
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


@pytest.mark.parametrize("params, numbered, trial_id, name", [
    ({"train.mode": "lora", "train.lr": 1e-3, "train.lora.r": 8}, False, "ab_00000", "lora r8 lr1e-3"),
    ({"train.mode": "full", "train.lr": 3e-3, "train.lora.r": 8}, False, "ab_00001", "full lr3e-3"),
    ({"train.mode": "lora", "train.lr": 0.00271, "train.weight_decay": 0.05}, True, "ab_00002",
     "lora lr2.71e-3 weight_decay=0.05 #3"),
    ({"train.mode": "linear"}, False, "", "linear"),
])
def test_trial_names_say_what_differs(params, numbered, trial_id, name):
    from finetune.tune import trial_name

    assert trial_name(params, trial_id, numbered) == name


def test_trial_names_are_numbered_when_values_are_sampled():
    from finetune.tune import numbered

    assert not numbered({"train.mode": {"grid": ["lora", "full"]}, "train.lora.r": 8}, 1)
    assert numbered({"train.lr": {"loguniform": [1e-4, 1e-2]}}, 1) and numbered({"train.mode": {"grid": ["a"]}}, 2)


def test_planned_trials_multiply_grids_by_samples():
    from finetune.tune import planned_trials

    space = {"train.mode": {"grid": ["lora", "full"]}, "train.lr": {"grid": [1e-3, 3e-3]}, "train.lora.r": 8,
             "train.weight_decay": {"uniform": [0, 0.1]}}
    assert planned_trials(space, 1) == 4 and planned_trials(space, 3) == 12 and planned_trials({}, 5) == 5


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


@dataclass
class FinishedSweep:
    """The module's sweep: interrupted with Ctrl+C, then resumed to the end."""

    out: Path
    summary: dict
    first_trial: str
    terminal: str
    """What the interrupted run printed."""
    rerun: int
    """The exit code of the same command a third time (nothing left to run)."""


@pytest.fixture(scope="module")
def finished_sweep(ray_session, tmp_path_factory) -> FinishedSweep:
    from finetune.tune import main

    tmp = tmp_path_factory.mktemp("sweep")
    args = ["--config", str(TUNE / "quickstart.yaml"), *sweep_args(tmp)]
    out = tmp / "test-sweep"
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
    terminal = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, terminal[-3000:]
    _release_placement_groups_of_the_stopped_driver(ray_session)
    assert main(args) == 0  # the same command again: resumes
    summary = json.loads((out / "summary.json").read_text())
    return FinishedSweep(out, summary, first, terminal, main(args))


@pytest.mark.slow
def test_sweep_interrupted_resumes_and_nests_runs_beside_the_baseline(finished_sweep):
    from mlflow.tracking import MlflowClient

    from camae import MAEModel

    out, summary = finished_sweep.out, finished_sweep.summary
    assert "rerun the same command to resume" in finished_sweep.terminal
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
    assert sorted(r.info.run_name for r in finished) == ["full", "lora"]  # what differs between the trials
    assert sum(r.data.tags["camae.trial"] == finished_sweep.first_trial for r in finetunes) == 1  # not run again
    assert all("test/accuracy" in r.data.metrics for r in finished)
    (evaluation,) = [r for r in children if r.data.tags.get("camae.kind") == "evaluation"]
    probes = client.search_runs([exp], f"tags.`camae.kind` = 'probe' and tags.`mlflow.parentRunId` = "
                                       f"'{evaluation.info.run_id}'")
    assert sorted(r.data.tags["camae.correction"] for r in probes) == ["harmony", "pca_centerscale", "raw", "tvn"]
    assert {r.info.run_name for r in probes} == {f"probe logistic {m}" for m in ("harmony", "pca_centerscale",
                                                                                  "raw", "tvn")}
    assert {r.data.tags["camae.split"] for r in probes + finished} == {parent.data.tags["camae.split"]}

    table = pd.read_csv(out / "comparison.csv")
    assert sorted(table["kind"]) == ["finetune"] * 2 + ["probe"] * 4
    assert table["best/val/accuracy"].is_monotonic_decreasing
    assert set(table["run"]) == {r.info.run_name for r in probes + finished}  # one name per run, everywhere
    assert "gap/val/accuracy" in summary and "baseline/val/accuracy" in parent.data.metrics
    MAEModel.from_pretrained(summary["best_export"])  # the best trial, in the official format
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"comparison.md", "comparison.csv", "comparison.json", "comparison.png", "best_export"} <= artifacts
    assert finished_sweep.rerun == 0  # once more: nothing left to run, the baseline is reused
    assert len(client.search_runs([exp], "tags.`camae.kind` = 'probe'")) == 4


@pytest.mark.slow
def test_sweep_runs_read_at_a_glance_in_mlflow(finished_sweep):
    """What the MLflow UI's columns show: every probe and fine-tune has best/val/accuracy, test/accuracy and chance
    (same names, same split); datasets; each fine-tune a LoggedModel with a signature; the winner @champion;
    system metrics on training runs; the experiment opens in the model-training view."""
    from mlflow.tracking import MlflowClient

    summary = finished_sweep.summary
    client = MlflowClient(summary["tracking_uri"])
    exp = client.get_experiment(client.get_run(summary["run_id"]).info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "mlflow.sharedViewState.camae-comparison" in exp.tags
    runs = [r for r in client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'")
            if r.data.tags.get("camae.kind") in ("probe", "finetune")]
    assert len(runs) == 6
    for run in runs:
        m = run.data.metrics
        assert {"best/val/accuracy", "test/accuracy", "test/chance_accuracy"} <= set(m), run.info.run_name
        assert 0 <= m["test/accuracy"] <= 1 and 0 < m["test/chance_accuracy"] < 1
        contexts = {t.value for d in run.inputs.dataset_inputs for t in d.tags if t.key == "mlflow.data.context"}
        assert contexts == {"train", "val", "test"}, run.info.run_name
    chance = {r.data.metrics["test/chance_accuracy"] for r in runs}
    assert len(chance) == 1  # the same test plates for every run
    finetunes = [r for r in runs if r.data.tags["camae.kind"] == "finetune"]
    for run in finetunes:
        assert any(k.startswith("system/cpu_utilization") for k in run.data.metrics)
        assert 1 <= run.data.metrics["best_epoch"] <= 2
        (model,) = client.search_logged_models([exp.experiment_id],
                                               filter_string=f"source_run_id = '{run.info.run_id}'")
        from mlflow.models import get_model_info

        from camae.tracking import using_tracking_uri

        with using_tracking_uri(summary["tracking_uri"]):
            signature = get_model_info(model.model_uri).signature
        assert list(signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 3, 256, 256]
    champion = client.get_model_version_by_alias("test-sweep", "champion")
    best = next(r for r in finetunes if r.info.run_name == summary["best_run"])
    assert champion.run_id == best.info.run_id and summary["registered"] == "models:/test-sweep@champion"
    assert len(client.search_model_versions("name = 'test-sweep'")) == 1  # the rerun registered nothing new


@pytest.mark.slow
def test_sweep_terminal_is_quiet(finished_sweep):
    """Ray's own output stays in its log files: no worker lines, Ray Data plans, Tune tables or tracebacks; each
    trial's line once."""
    text = finished_sweep.terminal
    assert "Traceback" not in text and "(RayTrainWorker" not in text and "Execution plan" not in text
    assert "Trial status" not in text and "Configuration for experiment" not in text
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) < 30, text
    (trial_line,) = [line for line in lines if ": best epoch " in line]  # the first trial finished before Ctrl+C
    assert "test/accuracy" in trial_line


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


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def render(url: str, shot: Path) -> str:
    """The page's DOM after its scripts ran (headless Chromium), and a screenshot of it."""
    flags = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--window-size=2000,1100", "--virtual-time-budget=30000"]
    subprocess.run([*flags, f"--screenshot={shot}", url], capture_output=True, timeout=180, check=True)
    return subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=180,
                          check=True).stdout


@pytest.mark.slow
@pytest.mark.skipif(chromium() is None, reason="needs Debian's chromium (`apt-get install chromium`; .ci/run does)")
def test_mlflow_ui_shows_probes_and_finetunes_in_chromium(finished_sweep, tmp_path):
    """`mlflow server` over the finished sweep's store, looked at in headless Chromium through the link the job
    prints: the runs table lists every probe and fine-tune with its test accuracy, and the best trial's page shows
    its confusion matrix. Screenshots: outputs/test-artifacts/browser/ (kept, not committed)."""
    import html
    import re

    from mlflow.tracking import MlflowClient

    from camae.cluster import _free_port
    from camae.tracking import experiment_url

    summary = finished_sweep.summary
    client = MlflowClient(summary["tracking_uri"])
    exp_id = client.get_run(summary["run_id"]).info.experiment_id
    shots = REPO / "outputs" / "test-artifacts" / "browser"
    shots.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
                               summary["tracking_uri"], "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_for(base + "/health")
        page = render(experiment_url(base, exp_id), shots / "experiment.png")
        text = html.unescape(re.sub(r"<[^>]+>", " ", re.sub(r"<(script|style).*?</\1>", "", page, flags=re.S)))
        runs = [r for r in client.search_runs([exp_id], "attributes.status = 'FINISHED'")
                if r.data.tags.get("camae.kind") in ("probe", "finetune")]
        assert len(runs) == 6
        for run in runs:
            assert run.info.run_name in text, run.info.run_name
            assert repr(run.data.metrics["test/accuracy"]) in text, (run.info.run_name, shots)
        assert "Model training" in text and "test/accuracy" in text and "Traces 0" not in text
        best = next(r for r in runs if r.info.run_name == summary["best_run"])
        page = render(f"{base}/#/experiments/{exp_id}/runs/{best.info.run_id}/artifacts/confusion_test.png",
                      shots / "best-run-confusion.png")
        assert re.search(r'<img[^>]+alt="confusion_test.png"[^>]+src="blob:', page)
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert not list(tmp_path.iterdir())  # the server wrote nothing where it ran (no mlruns/, no mlartifacts/)


def _wait_for(url: str, seconds: float = 60) -> None:
    import requests

    deadline = time.time() + seconds
    while True:
        try:
            if requests.get(url, timeout=2).ok:
                return
        except requests.RequestException:
            pass
        assert time.time() < deadline, f"{url} did not answer in {seconds:.0f} s"
        time.sleep(0.5)
