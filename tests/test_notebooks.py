"""The notebooks run top to bottom (on a small synthetic dataset) in a fresh kernel."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
SMALL = ["synth.experiments=1", "synth.plates_per_experiment=4", "synth.wells_per_plate=12", "synth.classes=2",
         "synth.controls_per_plate=4", "synth.sites_per_well=1", "synth.effect_size=4",
         "data.channels=[nuclei,er,mito]"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["quickstart", "finetune"])
def test_notebook_runs(name, tmp_path, monkeypatch):
    monkeypatch.setenv("CAMAE_NOTEBOOK_OUT", str(tmp_path))
    monkeypatch.setenv("CAMAE_NOTEBOOK_SET", " ".join([f"data.root={tmp_path / 'plates'}", *SMALL]))
    monkeypatch.setenv("RAY_ADDRESS", "local")  # a fresh local cluster, whatever /tmp/ray says
    notebook = nbformat.read(REPO / "notebooks" / f"{name}.ipynb", as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any(o.output_type == "execute_result" for o in outputs)
