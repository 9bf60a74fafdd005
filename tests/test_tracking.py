"""MLflow glue: no job leaves a tracking URI behind for the next one in the same process."""

from __future__ import annotations

import os

import mlflow
from mlflow.tracking import MlflowClient

from camae.tracking import active_run, resolve_tracking_uri, start_run


def test_jobs_in_one_process_keep_their_own_stores(tmp_path, monkeypatch):
    from mlflow.tracking._tracking_service import utils

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(utils, "_tracking_uri", None)  # a fresh process: no URI set yet
    first = resolve_tracking_uri(None, tmp_path / "a")
    run = start_run(first, "exp", "one", {"p": 1}, {"camae.kind": "test"})
    (tmp_path / "note.txt").write_text("x")
    with active_run(first, run):
        mlflow.log_artifact(str(tmp_path / "note.txt"))
    assert "MLFLOW_TRACKING_URI" not in os.environ  # mlflow.set_tracking_uri exports it; active_run takes it back
    second = resolve_tracking_uri(None, tmp_path / "b")
    assert second != first and second.endswith("b/mlflow.db")
    assert [a.path for a in MlflowClient(first).list_artifacts(run)] == ["note.txt"]
    assert MlflowClient(first).get_run(run).data.params == {"p": "1"}
