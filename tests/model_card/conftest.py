import shutil

import pytest
import torch
from openphenom_dir import MODEL_DIR

from camae import MAEModel
from camae.model_config import HUB_CONFIG


@pytest.fixture(scope="session", autouse=True)
def random_full_size_openphenom():
    """config.json as published + random weights in the official container, built with our own API."""
    torch.manual_seed(0)
    MAEModel.from_config(HUB_CONFIG).save_pretrained(MODEL_DIR)
    yield MODEL_DIR
    shutil.rmtree(MODEL_DIR, ignore_errors=True)
