"""The fine-tuning job end to end on a tiny random-weight encoder and synthetic plates."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from services import free_port

from camae import MAEModel
from camae.classifier import MAEClassifier
from camae.config import FinetuneConfig, load_config
from camae.data import TRAIN_COLUMNS, LabelMap, build_dataset, read_table

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "finetune" / "quickstart.yaml"
TINY = ["model.encoder.checkpoint=null", "model.encoder.embed_dim=32", "model.encoder.depth=2",
        "model.encoder.num_heads=2", "data.channels=[nuclei, er, mito]", "synth.effect_size=4", "synth.classes=2",
        "train.lr=3e-3", "tracking.log_model=false"]


def config(tmp: Path, data: Path, *overrides: str) -> FinetuneConfig:
    return load_config(FinetuneConfig, QUICKSTART, [*TINY, f"data.root={data}", f"run.output_dir={tmp}", *overrides])


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("ft") / "plates"  # written by the first run (quickstart.yaml's synth)


def _history(summary: dict, key: str) -> list[float]:
    client = MlflowClient(summary["tracking_uri"])
    return [m.value for m in sorted(client.get_metric_history(summary["run_id"], key), key=lambda m: m.step)]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "lora", "linear"])
def test_mode_learns_tracks_and_exports(ray_session, tmp_path, data_root, mode):
    from finetune.train import run_finetune
    from finetune.worker import build_model

    log_model = mode == "full"  # tracing the MLflow model costs time: once is enough
    cfg = config(tmp_path, data_root, f"train.mode={mode}", "train.epochs=6", f"run.name={mode}",
                 f"tracking.log_model={str(log_model).lower()}")
    summary = run_finetune(cfg)
    losses = _history(summary, "train/loss")
    assert len(losses) == 6 and losses[-1] < 0.95 * losses[0]  # learning happens
    if mode != "linear":  # a frozen random encoder has little to offer; trained ones beat chance on new plates
        assert summary["test/balanced_accuracy"] > 0.5  # chance 1/3 (measured here: lora 0.69, full 0.86)
    run = MlflowClient(summary["tracking_uri"]).get_run(summary["run_id"])
    assert run.data.tags["camae.kind"] == "finetune" and run.data.tags["camae.mode"] == mode
    assert run.data.params["train.mode"] == mode and run.info.status == "FINISHED"
    artifacts = {a.path for a in MlflowClient(summary["tracking_uri"]).list_artifacts(summary["run_id"])}
    assert {"config.yaml", "labels.json", "splits.csv", "confusion_test.png", "per_class_test.csv",
            "export"} <= artifacts
    assert ("adapter" in artifacts) == (mode == "lora")

    # in-process runs keep the best run.keep_checkpoints (2) and the latest
    run_dir = tmp_path / mode
    kept = sorted(d.name for d in (run_dir / "checkpoints").iterdir())
    assert f"epoch_{summary['best_epoch'] - 1:04d}" in kept and "epoch_0005" in kept and len(kept) <= 3  # 1-based

    # the export reloads to the best checkpoint's predictions, and MAEModel reads its encoder
    labels = LabelMap.load(run_dir / "labels.json")
    best = run_dir / "checkpoints" / f"epoch_{summary['best_epoch'] - 1:04d}"
    model, _ = build_model(cfg, len(labels))
    model.load_state_dict(torch.load(best / "state.pt", weights_only=True)["model"])
    table = read_table(cfg.data)
    batch = next(iter(build_dataset(table.iloc[:8], cfg.data, False, labels, columns=TRAIN_COLUMNS)
                      .iter_torch_batches(batch_size=8)))
    loaded, names = MAEClassifier.load(summary["export"])
    assert names == list(labels.names)
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch["image"]), model.eval()(batch["image"]), atol=1e-4, rtol=1e-4)
    if log_model:  # the MLflow model predicts like the export
        import mlflow

        from camae.tracking import using_tracking_uri

        with using_tracking_uri(summary["tracking_uri"]):  # no global tracking URI left behind for later tests
            logged = mlflow.pytorch.load_model(summary["model_uri"])
        with torch.no_grad():
            torch.testing.assert_close(logged(batch["image"]), loaded(batch["image"]), atol=1e-4, rtol=1e-4)
    encoder = MAEModel.from_pretrained(summary["export"]).encoder.vit_backbone
    assert torch.equal(encoder.blocks[0].mlp_out_proj.weight, loaded.encoder.blocks[0].mlp_out_proj.weight)


@pytest.mark.slow
def test_killed_worker_resumes_without_repeating_epochs(ray_session, tmp_path, data_root):
    from finetune.train import run_finetune

    cfg = config(tmp_path, data_root, "train.epochs=3", "run.num_workers=1", "run.max_failures=1",
                 "run.fault_injection_epoch=1", "run.name=resume", "train.mode=linear")
    summary = run_finetune(cfg)
    assert (tmp_path / "ray" / "resume" / "fault_injected").is_file()  # the worker really was killed after epoch 1
    client = MlflowClient(summary["tracking_uri"])
    epochs = sorted(m.step for m in client.get_metric_history(summary["run_id"], "train/loss"))
    assert epochs == [1, 2, 3]  # epoch 3 ran once, after the restart; 1 and 2 were not repeated
    assert summary["best_epoch"] in (1, 2, 3) and "test/accuracy" in summary


def test_too_many_cpus_for_training_is_refused_in_one_line(ray_session, tmp_path, data_root, capsys):
    from camae.cli import main

    assert main(["finetune", "--config", str(QUICKSTART), "--set", f"run.output_dir={tmp_path}", "--set",
                 f"data.root={data_root}", "--set", "run.num_workers=2", "--set", "run.cpus_per_worker=1"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # (earlier lines: Ray's start-up logging)
    assert last.startswith("finetune: error: run.num_workers x run.cpus_per_worker = 2 CPUs, but the Ray cluster "
                           "has 2") and last.endswith("`ray start --num-cpus N`)")


def test_cli_reports_config_errors(capsys):
    from camae.cli import main

    assert main(["finetune", "--config", str(QUICKSTART), "--set", "train.mod=lora"]) == 2
    assert "unknown config key 'train.mod'; did you mean 'train.mode'" in capsys.readouterr().err


def _stop_cluster(temp_dir: str, port: int) -> None:
    """Stop only the cluster started with --temp-dir=temp_dir (`ray stop` would also kill this process's Ray)."""
    from services import kill_tree

    kill_tree(lambda cmd: temp_dir in cmd or f":{port} " in cmd)
    current = Path("/tmp/ray/ray_current_cluster")  # `ray start` points later ray.init() calls at its head
    if current.is_file() and str(port) in current.read_text():
        current.unlink()


@pytest.mark.slow
def test_ray_job_submit_against_a_local_head(tmp_path):
    """Exactly the README's cluster command: `ray start --head`, then `ray job submit --working-dir .`."""
    import tempfile

    bin_dir = Path(sys.executable).parent
    # Ray 2.60's `ray start` turns token auth on (token in ~/.ray/auth_token); the job client must be told so
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    temp_dir = tempfile.mkdtemp(prefix="rayjob", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    port, dash, agent, client = free_port(), free_port(), free_port(), free_port()
    try:
        subprocess.run(["ray", "start", "--head", "--num-cpus=2", f"--port={port}", f"--dashboard-port={dash}",
                        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--temp-dir={temp_dir}",
                        f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}"],
                       env=env, check=True, capture_output=True, timeout=180)
        overrides = [*TINY, f"data.root={tmp_path / 'plates'}", f"run.output_dir={tmp_path / 'out'}",
                     "train.epochs=1", "run.name=job", "train.mode=linear"]
        cmd = ["ray", "job", "submit", f"--address=http://127.0.0.1:{dash}", "--working-dir", str(REPO),
               "--runtime-env-json", json.dumps({"excludes": [".venv", "outputs", "data", ".shared", ".scratch"]}),
               "--", "python", "-m", "finetune.train", "--config", "configs/finetune/quickstart.yaml"]
        for item in overrides:
            cmd += ["--set", item]
        for _ in range(12):  # right after `ray start` the head may refuse with "No available agent": not a job run
            job = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
            if "No available agent" not in job.stdout + job.stderr:
                break
            time.sleep(5)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in job.stdout and (tmp_path / "out" / "job" / "export" / "config.json").is_file()
    finally:
        _stop_cluster(temp_dir, port)


def test_export_of_lora_merges_adapters(tmp_path):
    """A LoRA model merged and exported predicts like the adapted model (no training needed)."""
    from finetune.worker import build_model

    cfg = config(tmp_path, tmp_path / "none", "train.mode=lora")
    torch.manual_seed(0)
    model, base = build_model(cfg, 3)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    x = torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8)
    model.eval()
    with torch.no_grad():
        adapted = model(x)
        merged = model.merge_and_unload()
        merged.export(base, tmp_path / "export", ["a", "b", "c"])
        loaded, _ = MAEClassifier.load(tmp_path / "export")
        torch.testing.assert_close(loaded(x), adapted, atol=1e-4, rtol=1e-4)
    assert np.isfinite(adapted.numpy()).all()


def test_full_mode_decays_the_learning_rate_by_layer(tmp_path):
    """timm's layer decay through the classifier's group_matcher: head 1, block i scale**(depth - i), stem last."""
    from finetune.worker import build_model, build_optimizer

    cfg = config(tmp_path, tmp_path / "none", "train.mode=full", "train.layer_decay=0.5", "model.encoder.depth=3")
    model, _ = build_model(cfg, 3)
    optimizer, _ = build_optimizer(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    scale = {names[id(p)]: g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    assert scale["head.weight"] == 1.0
    assert scale["encoder.blocks.2.in_proj.weight"] == 0.5 and scale["encoder.blocks.0.in_proj.weight"] == 0.125
    assert scale["encoder.patch_embed.proj.weight"] == 0.0625 and scale["encoder.cls_token"] == 0.0625
    assert "encoder.pos_embed" not in scale  # fixed sin-cos table: not optimized


def test_lora_mode_trains_only_adapters_and_head(tmp_path):
    from finetune.worker import build_model

    cfg = config(tmp_path, tmp_path / "none", "train.mode=lora", "train.lora.targets=[in_proj, patch_embed]")
    model, _ = build_model(cfg, 3)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("patch_embed.proj.lora_A" in n for n in trainable) and any("in_proj.lora_B" in n for n in trainable)
    assert not any("attn_out_proj.lora" in n for n in trainable)
    assert all("lora_" in n or "head" in n for n in trainable)


def test_schedule_follows_epochs_not_steps(tmp_path):
    """An elastic restart on fewer workers takes more steps per epoch: the learning rate at the end of an epoch
    is the same whether one worker saw all of it or each of two workers saw half."""
    from finetune.worker import build_model, build_optimizer, run_epoch

    cfg = config(tmp_path, tmp_path / "none", "train.mode=linear", "train.epochs=3", "train.warmup_epochs=0.5",
                 "train.grad_clip=null")
    x = torch.randint(0, 256, (8, 3, 256, 256), dtype=torch.uint8)
    batches = lambda n: ({"image": x[i:i + 2], "label_index": torch.zeros(2, dtype=torch.long)}  # noqa: E731
                         for i in range(0, n, 2))
    lrs = []
    for world, seen in ((1, 8), (2, 4)):
        model, _ = build_model(cfg, 2)
        optimizer, scheduler = build_optimizer(model, cfg)
        _, images, _, steps = run_epoch(model, batches(seen), optimizer, scheduler, cfg, torch.device("cpu"), 0,
                                        epoch=1, epoch_images=8, world=world)
        assert (images, steps) == (seen, seen // 2)
        lrs.append(optimizer.param_groups[-1]["lr"])
    assert lrs[0] == pytest.approx(lrs[1], rel=1e-9) and lrs[0] < cfg.train.lr  # two of three epochs into the cosine
