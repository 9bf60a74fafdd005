"""The benchmark scripts still run (smoke runs on tiny inputs; their figures are not checked here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_model_forward_benchmark_runs(tmp_path):
    cmd = [sys.executable, "benchmarks/model_forward.py", "--device", "cpu", "--sizes", "tiny", "--repeats", "1",
           "--iters", "1", "--out", str(tmp_path)]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, timeout=600)
    rows = json.loads((tmp_path / "model_forward_cpu.json").read_text())["rows"]
    assert len(rows) == 2 and all(r["parity_max_abs_diff"] < 1e-4 for r in rows)


@pytest.mark.slow
def test_ingest_benchmark_runs(tmp_path):
    cmd = [sys.executable, "benchmarks/ingest.py", "--sites", "60", "--scales", "1", "--workers", "2",
           "--data", str(tmp_path / "data"), "--out", str(tmp_path)]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, timeout=600)
    rows = json.loads((tmp_path / "ingest.json").read_text())["rows"]
    assert {(r["format"], r["mode"]) for r in rows} == {(f, m) for f in ("png", "packed")
                                                        for m in ("ray", "dataloader", "single")}
    assert all(r["sites"] == 60 for r in rows)


@pytest.mark.slow
def test_decode_benchmark_runs(tmp_path):
    cmd = [sys.executable, "benchmarks/decode.py", "--sites", "8", "--repeats", "1", "--data", str(tmp_path / "data"),
           "--out", str(tmp_path)]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, timeout=600)
    rows = json.loads((tmp_path / "decode.json").read_text())["rows"]
    assert [r["format"] for r in rows] == ["png-256", "packed-256", "png-512", "packed-512", "jp2-pillow",
                                           "jp2-imagecodecs"]
    assert all(r["sites_per_s_per_core"] > 0 for r in rows)


@pytest.mark.slow
def test_train_throughput_benchmark_runs(tmp_path):
    cmd = [sys.executable, "benchmarks/train_throughput.py", "--device", "cpu", "--encoder", "tiny", "--batch", "8",
           "--steps", "2", "--epochs", "2", "--sites", "32", "--data", str(tmp_path / "data"), "--out", str(tmp_path)]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, timeout=600)
    result = json.loads((tmp_path / "train_throughput_cpu.json").read_text())
    assert [r["loop"] for r in result["rows"]] == ["model only, eager", "Ray Train on packed shards, end to end"]
    assert result["gflop_per_image"] > 0 and all(r["images_per_s"] > 0 for r in result["rows"])


@pytest.mark.slow
def test_train_step_benchmark_runs(tmp_path):
    cmd = [sys.executable, "benchmarks/train_step.py", "--images", "32", "--epochs", "2", "--out", str(tmp_path)]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, timeout=600)
    result = json.loads((tmp_path / "train_step.json").read_text())
    assert result["ratio"] > 0 and len(result["ray"]) == len(result["plain"]) == 2


@pytest.mark.slow
def test_embed_benchmark_runs(tmp_path):
    cmd = [sys.executable, "benchmarks/embed.py", "--sizes", "tiny", "--sites", "32", "--batch-size", "8",
           "--data", str(tmp_path / "data"), "--out", str(tmp_path)]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, timeout=600)
    (row,) = json.loads((tmp_path / "embed_cpu.json").read_text())["rows"]
    assert row["sites"] == 32 and row["ratio_warm"] > 0


def test_pretrain_flops_count_forward_and_backward():
    """The pretraining FLOP estimate's counter, on a tiny MAE: backward costs about twice the forward, and masking
    more tokens costs the encoder less."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from pretrain_flops import step_flops

    from camae.cli import TINY_DIMS
    from camae.model_config import HUB_CONFIG

    config = json.loads(json.dumps(HUB_CONFIG))
    config["encoder"]["vit_backbone"]["vit_backbone"].update(TINY_DIMS)
    config["decoder"].update(embed_dim=32, depth=1, num_heads=2)
    flops = step_flops(0.75, config=config)
    assert 2.5 < flops["train_step"] / flops["forward"] < 3.5
    assert step_flops(0.9, config=config)["forward"] < flops["forward"]
