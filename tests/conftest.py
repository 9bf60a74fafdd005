"""Shared test fixtures: the official tiny checkpoint in ../shared and models built from it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CAMAE_SHARED", REPO.parent / "shared"))
TINY = SHARED / "fixtures" / "openphenom-tiny"
FULL_KEYS = SHARED / "reference" / "openphenom-full-keys.json"


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent: the shared reference material lives beside the repo (../shared) in CI; "
                    "set CAMAE_SHARED to its location to run these tests")
    return path


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    """The official tiny checkpoint (torch-zip container, as the official save_pretrained writes)."""
    return _require(TINY)


@pytest.fixture(scope="session")
def golden():
    from safetensors.torch import load_file

    return load_file(_require(TINY / "golden.safetensors"))


@pytest.fixture(scope="session")
def golden_modern():
    from safetensors.torch import load_file

    return load_file(_require(TINY / "golden_timm_modern.safetensors"))


@pytest.fixture(scope="session")
def full_reference() -> dict:
    return json.loads(_require(FULL_KEYS).read_text())


@pytest.fixture
def tiny_model(tiny_dir):
    from camae import MAEModel

    return MAEModel.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def ray_session():
    """A fresh local 2-CPU Ray cluster per test module (address="local": never a stale one from /tmp/ray)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture
def images():
    def make(b=2, c=6, size=256, seed=0):
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, 256, (b, c, size, size), dtype=torch.uint8, generator=g)

    return make


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is present")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
