"""Where the model-card test finds its OpenPhenom directory: a full-size OpenPhenom-config checkpoint with
random weights, written by conftest.py (the real weights cannot be downloaded here)."""

import os
import tempfile
from pathlib import Path

MODEL_DIR = str(Path(tempfile.gettempdir()) / f"camae-openphenom-random-{os.getpid()}")
