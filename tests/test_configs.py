"""Every YAML in configs/ loads and validates against its config class."""

from __future__ import annotations

from pathlib import Path

import pytest

from camae.config import (
    ConfigError,
    DataConfig,
    EvaluateConfig,
    FinetuneConfig,
    PretrainConfig,
    SweepConfig,
    load_config,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
KINDS = {"data": DataConfig, "finetune": FinetuneConfig, "evaluate": EvaluateConfig, "tune": SweepConfig,
         "pretrain": PretrainConfig,
         # configs/cluster/ holds one of each job, by file name
         "cluster/finetune.yaml": FinetuneConfig, "cluster/sweep.yaml": SweepConfig,
         "cluster/embed.yaml": EvaluateConfig, "cluster/pretrain.yaml": PretrainConfig}


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_loads(path):
    relative = path.relative_to(CONFIGS)
    kind = str(relative) if str(relative) in KINDS else relative.parts[0]
    assert kind in KINDS, f"{path}: no config class registered for configs/{kind}"
    load_config(KINDS[kind], path)


def test_typo_in_a_config_file_is_named(tmp_path):
    (tmp_path / "bad.yaml").write_text("format: rxrx1\nchanels: [nuclei]\n")
    with pytest.raises(ConfigError, match="unknown config key 'chanels'; did you mean 'channels'"):
        load_config(DataConfig, tmp_path / "bad.yaml")


def test_overrides_apply_and_parse_yaml():
    cfg = load_config(DataConfig, CONFIGS / "data" / "synthetic.yaml", ["channels=[nuclei, mito]", "seed=3"])
    assert cfg.channels == ["nuclei", "mito"] and cfg.seed == 3


@pytest.mark.parametrize("kind", ["finetune", "tune", "evaluate", "pretrain"])
def test_jobs_without_config_run_their_quickstart_and_say_so(kind, monkeypatch, tmp_path, capsys):
    """`camae finetune` with no --config is the quickstart (said aloud), never the full-size defaults; outside the
    repository it is one clear error."""
    from camae.config import job_config, job_parser

    monkeypatch.chdir(CONFIGS.parent)
    args = job_parser("camae", None, kind).parse_args([])
    assert job_config(args) == f"configs/{kind}/quickstart.yaml"
    assert f"no --config: running the quickstart, configs/{kind}/quickstart.yaml" in capsys.readouterr().out
    assert job_config(job_parser("camae", None, kind).parse_args(["--config", "x.yaml"])) == "x.yaml"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="run from the repository root, or pass --config FILE"):
        job_config(args)
