"""One identity for every derived result (camae.identity): probe baselines and embeddings are keyed by everything
they depend on, and by nothing else."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from camae.cli import random_checkpoint
from camae.config import EvaluateConfig, load_config
from camae.tracking import baseline_key

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "evaluate" / "quickstart.yaml"


def key(*overrides: str, split: str = "s1") -> str:
    """The baseline key of the quickstart evaluation on random weights (whose seed counts), with overrides."""
    return baseline_key(load_config(EvaluateConfig, QUICKSTART, ["embed.encoder.checkpoint=null", *overrides]), split)


def test_baseline_key_was_shared_by_two_datasets():
    """The bug: configs that differed only in data.root (or format, routing, percentiles) got the same key, so a
    sweep reused a probe baseline computed on another dataset in the same MLflow experiment."""
    reference = key()
    for override in ["data.root=/data/other-plates", "data.format=jump", "embed.encoder.bias_routing=modern",
                     "data.percentiles=[1.0, 99.0]", "data.uint16_mapping=minmax", "embed.encoder.seed=1",
                     "data.crop_size=128", "data.channels=[nuclei, er]", "correction.by=batch"]:
        assert key(override) != reference, override
    assert key(split="s2") != reference
    assert key() == reference and key(f"data.root={(REPO / 'data' / 'synthetic').resolve()}") == reference
    assert key("embed.batch_size=64", "run.name=other", "embed.output=/elsewhere") == reference  # no effect


def test_weights_are_identified_by_content(tmp_path):
    a = random_checkpoint(tmp_path / "a", tiny=True, seed=0)
    b = shutil.copytree(a, tmp_path / "b")
    assert key(f"embed.encoder.checkpoint={a}") == key(f"embed.encoder.checkpoint={b}")  # same weights, moved
    random_checkpoint(tmp_path / "b", tiny=True, seed=1)
    assert key(f"embed.encoder.checkpoint={a}") != key(f"embed.encoder.checkpoint={b}")  # new weights, same path


@pytest.mark.parametrize("section", ["model", "embed"])
def test_one_encoder_section(section):
    """Fine-tuning and embedding declare their encoder with the same EncoderSpec (no hand copy in the sweep)."""
    from camae.config import EncoderSpec, FinetuneConfig

    cls = FinetuneConfig if section == "model" else EvaluateConfig
    assert isinstance(getattr(cls(), section).encoder, EncoderSpec)
