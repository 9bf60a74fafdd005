"""The `camae` entry point end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from camae.cli import main


def test_demo_end_to_end_with_random_weights(tmp_path, capsys):
    assert main(["demo", "--tiny", "--images", "6", "--batch-size", "4", "--out", str(tmp_path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["random_weights"] and summary["embedding_dim"] == 32 and summary["channelwise_dim"] == 6 * 32
    assert np.load(tmp_path / "embeddings.npy").shape == (6, 32)
    assert summary["missing_stain_reconstruction"] == [1, 1, 256, 256]
    assert (tmp_path / "random-checkpoint" / "config.json").is_file()


def test_demo_on_a_given_checkpoint(tiny_dir, tmp_path, capsys):
    assert main(["demo", "--checkpoint", str(tiny_dir), "--images", "2", "--channels", "3",
                 "--out", str(tmp_path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert not summary["random_weights"] and summary["channelwise_dim"] == 3 * 32


def test_info(tiny_dir, capsys):
    assert main(["info", str(tiny_dir / "alt_genuine_safetensors")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["container"] == "safetensors" and out["tensors"] == 131
    assert "bias_routing=legacy" in out["encoder"]


@pytest.mark.parametrize("path", ["recursionpharma/OpenPhenom", "/nonexistent/openphenom"])
def test_bad_checkpoint_is_a_clean_error(path, capsys):
    assert main(["info", path]) == 2
    err = capsys.readouterr().err
    assert err.startswith("camae info: error:") and "Traceback" not in err


@pytest.mark.slow
def test_console_script_runs_as_a_module(tmp_path):
    result = subprocess.run([sys.executable, "-m", "camae", "demo", "--tiny", "--images", "2", "--out",
                             str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "RANDOM weights" in result.stderr


@pytest.mark.parametrize("command, config, typo, message", [
    ("evaluate", "configs/evaluate/quickstart.yaml", "probes.kindz=[knn]", "did you mean 'probes.kinds'"),
    ("embed", "configs/evaluate/quickstart.yaml", "embed.batchsize=8", "did you mean 'embed.batch_size'"),
    ("sweep", "configs/tune/quickstart.yaml", "sweep.metrc=x", "did you mean 'sweep.metric'"),
    ("sweep", "configs/tune/quickstart.yaml", "sweep.search_space={train.lrr: {choice: [1]}}", "train.lrr"),
])
def test_job_commands_refuse_config_typos_before_starting(command, config, typo, message, capsys, monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    assert main([command, "--config", config, "--set", typo]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
