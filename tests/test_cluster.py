"""Every job on a real two-node Ray cluster, launched as users launch it (`ray job submit --working-dir . -- python
-m ...`), with checkpoints, exports, sweep state and embeddings in an S3-compatible bucket and metrics on an MLflow
tracking server (tests/services.py starts all three on 127.0.0.1). Credentials and the endpoint reach the jobs
only through the runtime env, as on a real cluster.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from services import BUCKET, TrackingServer, free_port, start_object_store, start_two_node_cluster

pytestmark = pytest.mark.slow

EXPERIMENT = "camae-cluster"  # as in configs/cluster/*.yaml


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    store = start_object_store(root)
    server = TrackingServer(free_port(), root).start()
    cluster = start_two_node_cluster()
    try:
        yield {"cluster": cluster, "store": store, "server": server, "root": root}
    finally:
        cluster.stop()
        server.stop()
        store.stop()


def _sets(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def _places(s: dict, storage: str = "runs") -> list[str]:
    """What differs from configs/cluster/*.yaml here: the plates, this machine's bucket and server."""
    return [f"data.root={s['root'] / 'plates'}", f"run.output_dir={s['root'] / 'out'}",
            f"run.storage_path=s3://{BUCKET}/{storage}", f"tracking.tracking_uri={s['server'].uri}"]


def _finetune_args(s: dict, name: str, *extra: str) -> list[str]:
    """configs/cluster/finetune.yaml: two workers, one per node (STRICT_SPREAD)."""
    return ["python", "-m", "finetune.train", "--config", "configs/cluster/finetune.yaml",
            *_sets([*_places(s), f"run.name={name}", *extra])]


def _runtime_env(s: dict) -> dict:
    return {"env_vars": {**s["store"].env, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}}


def _run(s: dict, name: str):
    client = MlflowClient(s["server"].uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], f"attributes.run_name = '{name}'")
    assert len(runs) == 1, f"{len(runs)} MLflow runs named {name}"  # one run, also across restarts
    return client, runs[0]


def _printed_json(stdout: str) -> dict:
    """The JSON summary a job prints at its end (lines from `{` to `}`), among Ray's log lines."""
    start = stdout.rindex('{\n  "')
    return json.loads(stdout[start:stdout.index("\n}", start) + 2])


def _steps(client, run, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, key))


@pytest.mark.parametrize("mode", ["full", "lora", "linear"])
def test_finetune_job_on_two_nodes(services, mode):
    """Two DDP workers on two distinct nodes; checkpoints and the export in the bucket; one finished run on the
    tracking server with the per-epoch and test metrics and the workers' nodes."""
    s, name = services, f"ft-{mode}"
    start = time.perf_counter()
    job = s["cluster"].submit(_finetune_args(s, name, f"train.mode={mode}", "train.epochs=2"), _runtime_env(s))
    seconds = time.perf_counter() - start
    assert job.returncode == 0 and "succeeded" in job.stdout, (job.stdout + job.stderr)[-4000:]
    print(f"2-node fine-tune, mode={mode}: {seconds:.1f} s from `ray job submit` to its end")

    client, run = _run(s, name)
    assert run.info.status == "FINISHED"
    assert _steps(client, run, "train/loss") == [1, 2] and "test/accuracy" in run.data.metrics
    assert run.data.metrics["workers"] == 2
    nodes = {run.data.tags["camae.node.rank0"], run.data.tags["camae.node.rank1"]}
    assert len(nodes) == 2  # STRICT_SPREAD: one worker per node

    keys = s["store"].keys(f"runs/{name}/")
    assert any(re.search(r"checkpoint_[^/]+/state\.pt$", k) for k in keys), keys
    assert f"runs/{name}/export/config.json" in keys and f"runs/{name}/export/model.safetensors" in keys
    assert f"runs/{name}/summary.json" in keys
    summary = json.loads(s["store"].read_text(f"runs/{name}/summary.json"))
    assert summary["export_uri"] == f"s3://{BUCKET}/runs/{name}/export" and summary["run_id"] == run.info.run_id
    assert "Traceback" not in job.stdout and "(RayTrainWorker" not in job.stdout  # quiet: Ray's output in its logs
    assert "test plates: accuracy" in job.stdout and "then open http" in job.stdout
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "export", "confusion_test.png"} <= artifacts  # through the server's artifact proxy


@pytest.mark.parametrize("recovery", ["node-back", "elastic"])
def test_node_loss_resumes_from_the_bucket_without_repeating_epochs(services, recovery):
    """Kill every process of the second node once epoch 0 is committed. node-back: the node returns and the job
    resumes on two workers; elastic (run.min_workers=1): it goes on with one worker at once. Either way it resumes
    from the last checkpoint in the bucket and each epoch is logged once, in one MLflow run."""
    s, name = services, f"ft-node-loss-{recovery}"
    # Ray 2.60's elastic sizing counts resources, not the placement strategy: with STRICT_SPREAD it would keep
    # asking for two workers on the one node left. One `slot` per node pins one worker to each node instead.
    elastic = ["run.min_workers=1", "run.placement_strategy=PACK", "run.resources_per_worker={slot: 1}"] \
        if recovery == "elastic" else []
    args = _finetune_args(s, name, "train.mode=linear", "train.epochs=4", *elastic, "synth.wells_per_plate=40",
                          f"data.root={s['root'] / 'plates-40'}")  # longer epochs: the kill lands inside one
    proc = _submit_in_background(s, args)
    client = MlflowClient(s["server"].uri)
    try:
        _wait_for(lambda: _first_epoch_committed(client, name), 400, proc)
        s["cluster"].node2.stop()  # the node is lost mid-epoch 1
        killed = time.time()
        if not elastic:
            time.sleep(5)
            s["cluster"].node2.start()  # and comes back
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
        if elastic:
            s["cluster"].node2.start()  # back for the tests that follow
    assert proc.returncode == 0 and "succeeded" in out, out[-4000:]
    client, run = _run(s, name)
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]  # no epoch repeated, none missing (steps: epochs done)
    resumed = [k for k in run.data.tags if k.startswith("camae.workers.from_epoch") and not k.endswith("epoch1")]
    assert resumed, run.data.tags  # a second worker group started from a checkpoint
    workers = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "workers")}
    assert workers[1] == 2 and workers[4] == (1 if elastic else 2)
    first_after = min(m.timestamp for m in history if m.timestamp / 1000 > killed) / 1000
    print(f"node loss ({recovery}): {first_after - killed:.1f} s from the kill to the first resumed epoch's metrics "
          f"(resumed at {resumed})")


def _submit_in_background(s: dict, args: list[str]) -> subprocess.Popen:
    from services import base_env

    cluster = s["cluster"]
    repo = Path(__file__).resolve().parents[1]
    env_json = {"excludes": [".venv", "outputs", "data", ".git"], **_runtime_env(s)}
    cmd = ["ray", "job", "submit", f"--address={cluster.dashboard_url}", "--working-dir", str(repo),
           "--runtime-env-json", json.dumps(env_json), "--", *args]
    return subprocess.Popen(cmd, env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _first_epoch_committed(client, name: str):
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], f"attributes.run_name = '{name}'") if exp else []
    if runs and client.get_metric_history(runs[0].info.run_id, "train/loss"):
        return runs[0]  # logged after ray.train.report: epoch 0's checkpoint is in the bucket
    return None


def _wait_for(probe, seconds: float, proc: subprocess.Popen):
    deadline = time.time() + seconds
    while (found := probe()) is None:
        assert proc.poll() is None, proc.stdout.read()[-4000:]
        assert time.time() < deadline, f"gave up after {seconds} s"
        time.sleep(0.5)
    return found


def test_sweep_job_spreads_trials_over_both_nodes(services):
    """A two-trial sweep submitted as a job: one Train worker per trial, one per node (the `slot` resource), the
    baseline probes beside them, Tune's state and the trials' checkpoints in the bucket."""
    s = services
    finetune = [f"finetune.{item}" for item in [*_places(s, "sweeps"), "run.resources_per_worker={slot: 1}"]]
    args = ["python", "-m", "finetune.tune", "--config", "configs/cluster/sweep.yaml", *_sets(finetune)]
    job = s["cluster"].submit(args, _runtime_env(s))
    assert job.returncode == 0 and "succeeded" in job.stdout, (job.stdout + job.stderr)[-4000:]

    client = MlflowClient(s["server"].uri)
    exp = client.get_experiment_by_name(EXPERIMENT).experiment_id
    (parent,) = client.search_runs([exp], "tags.`camae.kind` = 'sweep' and attributes.run_name = 'cluster-sweep'")
    assert parent.info.status == "FINISHED"
    trials = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and "
                                       "tags.`camae.kind` = 'finetune'")
    assert len(trials) == 2 and all(t.info.status == "FINISHED" for t in trials)
    assert len({t.data.tags["camae.node.rank0"] for t in trials}) == 2  # the two trials ran on both nodes
    (evaluation,) = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and "
                                               "tags.`camae.kind` = 'evaluation'")
    probes = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{evaluation.info.run_id}'")
    assert len(probes) == 4  # logistic x (raw, pca_centerscale, tvn, harmony)
    keys = s["store"].keys("sweeps/cluster-sweep/")
    assert any(k.startswith("sweeps/cluster-sweep/tune/") for k in keys)
    assert sum(k.endswith("/summary.json") and "/trials/" in k for k in keys) == 2
    assert "best_export" in {a.path for a in client.list_artifacts(parent.info.run_id)}


def test_pretrain_job_on_two_nodes_exports_the_mae_into_the_bucket(services):
    """Continued MAE pretraining as users submit it: two DDP workers on two nodes, the held-out loss every epoch
    on the tracking server (and the untrained one at step 0), checkpoints and the official-format export with its
    decoder in the bucket."""
    s = services
    args = ["python", "-m", "finetune.pretrain", "--config", "configs/cluster/pretrain.yaml", *_sets([
        *_places(s), f"data.root={s['root'] / 'plates-pretrain'}"])]
    job = s["cluster"].submit(args, _runtime_env(s))
    assert job.returncode == 0 and "succeeded" in job.stdout, (job.stdout + job.stderr)[-4000:]
    assert "held-out reconstruction loss" in job.stdout and "Traceback" not in job.stdout

    client, run = _run(s, "cluster-pretrain")
    assert run.info.status == "FINISHED" and run.data.tags["camae.kind"] == "pretrain"
    assert _steps(client, run, "val/loss") == [1, 2] and _steps(client, run, "val/loss_untrained") == [0]
    assert run.data.metrics["workers"] == 2
    assert len({run.data.tags["camae.node.rank0"], run.data.tags["camae.node.rank1"]}) == 2
    keys = s["store"].keys("runs/cluster-pretrain/")
    assert {"runs/cluster-pretrain/export/config.json", "runs/cluster-pretrain/export/model.safetensors"} <= set(keys)
    summary = json.loads(s["store"].read_text("runs/cluster-pretrain/summary.json"))
    assert summary["export_uri"] == f"s3://{BUCKET}/runs/cluster-pretrain/export"
    assert summary["best/val/loss"] < summary["val/loss_untrained"]
    assert {"figures/reconstruction_epoch002.png", "figures/missing_golgi_epoch002.png"} <= {
        a.path for a in client.list_artifacts(run.info.run_id, "figures")}


def test_embedding_job_across_both_nodes_into_the_bucket(services, monkeypatch):
    s = services
    args = ["python", "-m", "camae", "embed", "--config", "configs/cluster/embed.yaml", *_sets([
        f"data.root={s['root'] / 'plates'}", f"run.output_dir={s['root'] / 'out'}",
        f"embed.output=s3://{BUCKET}/embeddings", f"tracking.tracking_uri={s['server'].uri}"])]
    job = s["cluster"].submit(args, _runtime_env(s))
    assert job.returncode == 0 and "succeeded" in job.stdout, (job.stdout + job.stderr)[-4000:]
    result = _printed_json(job.stdout)
    assert result["nodes"] == 2 and result["output"] == f"s3://{BUCKET}/embeddings"

    for key, value in s["store"].env.items():
        monkeypatch.setenv(key, value)
    from evaluation.embed import load_embeddings

    meta, X = load_embeddings(f"s3://{BUCKET}/embeddings")
    assert len(meta) == result["sites"] and X.shape == (result["sites"], 32)
    assert "embed.json" in {k.rsplit("/", 1)[-1] for k in s["store"].keys("embeddings/")}


def test_pack_into_the_bucket_then_finetune_from_it_on_two_nodes(services):
    """`camae pack` as a cluster job writes the shards into the bucket; two DDP workers on two nodes train from them
    (data.format packed, data.root s3://...): no node needs the images or a shared disk."""
    from camae.config import FinetuneConfig, load_config
    from camae.synth import ensure_dataset

    s = services
    plates, synth = s["root"] / "plates", load_config(FinetuneConfig, "configs/cluster/finetune.yaml").synth
    ensure_dataset(plates, synth)
    pack = s["cluster"].submit(["python", "-m", "camae", "pack", "--config", "configs/data/synthetic.yaml", "--out",
                                f"s3://{BUCKET}/packed", "--rows-per-group", "8",
                                *_sets([f"root={plates}", "channels=[nuclei, er, mito]"])], _runtime_env(s))
    assert pack.returncode == 0 and "succeeded" in pack.stdout, (pack.stdout + pack.stderr)[-4000:]
    packed = _printed_json(pack.stdout)
    sites = synth.experiments * synth.plates_per_experiment * synth.wells_per_plate * synth.sites_per_well
    assert (packed["sites"], packed["skipped"], packed["written"]) == (sites, 0, packed["shards"])
    keys = {k.removeprefix("packed/") for k in s["store"].keys("packed/")}
    assert {"manifest.json", "plan.json", "shards/shard-00000.parquet", "shards/shard-00000.json"} <= keys

    job = s["cluster"].submit(_finetune_args(s, "ft-packed", "data.format=packed", f"data.root=s3://{BUCKET}/packed",
                                             "train.mode=linear"), _runtime_env(s))
    assert job.returncode == 0 and "succeeded" in job.stdout, (job.stdout + job.stderr)[-4000:]
    client, run = _run(s, "ft-packed")
    assert run.info.status == "FINISHED" and run.data.params["data.format"] == "packed"
    assert run.data.tags["camae.node.rank0"] != run.data.tags["camae.node.rank1"]  # one worker per node
    assert _steps(client, run, "train/loss") == [1, 2] and "test/accuracy" in run.data.metrics


def test_tracking_outage_loses_no_metric(services):
    """A restart of the tracking server between two epochs: the metric that could not be sent is queued and
    arrives with the next."""
    from camae.tracking import MetricBuffer, start_run

    server = services["server"]
    run_id = start_run(server.uri, EXPERIMENT, "outage", {}, {"camae.kind": "test"})
    buffer = MetricBuffer(server.uri, run_id, patience_s=120)
    assert buffer.log({"train/loss": 1.0}, step=0)
    server.stop()
    assert not buffer.log({"train/loss": 0.5}, step=1)  # the server is down: queued, training goes on
    server.start()
    assert buffer.log({"train/loss": 0.25}, step=2)
    history = MlflowClient(server.uri).get_metric_history(run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 1.0), (1, 0.5), (2, 0.25)]


def test_unreachable_tracking_server_and_bucket_are_one_line_errors(services, capsys):
    """Refused before any worker starts, naming the key and the fix (the job's driver, as a subprocess)."""
    s = services
    dead = f"http://127.0.0.1:{free_port()}"
    job = s["cluster"].submit(_finetune_args(s, "ft-dead-server", f"tracking.tracking_uri={dead}"), _runtime_env(s))
    assert job.returncode != 0
    assert f"finetune: error: tracking.tracking_uri={dead}: the MLflow server does not answer" in job.stdout
    job = s["cluster"].submit(_finetune_args(s, "ft-no-bucket", "run.storage_path=s3://no-such-bucket/runs"),
                              _runtime_env(s))
    assert job.returncode != 0
    assert "finetune: error: run.storage_path=s3://no-such-bucket/runs: cannot write there from the driver" \
        in job.stdout
    assert "Traceback" not in job.stdout


def test_camae_finetune_joins_the_cluster_from_outside(services):
    """`camae finetune` where RAY_ADDRESS names the cluster: the driver runs here, its two workers on the nodes."""
    from services import base_env

    s, name = services, "ft-camae-cli"
    env = {**base_env(), "RAY_ADDRESS": s["cluster"].address, **s["store"].env}
    done = subprocess.run(["camae", "finetune", *_finetune_args(s, name)[3:]], env=env, cwd=Path(__file__).parents[1],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    client, run = _run(s, name)
    assert run.info.status == "FINISHED" and _steps(client, run, "train/loss") == [1, 2]
    assert run.data.tags["camae.node.rank0"] != run.data.tags["camae.node.rank1"]
