"""Rank 0's MLflow writer (orchestrator.train.worker_metrics) in the test process, against a real sqlite store."""

from __future__ import annotations

import mlflow
from mlflow import MlflowClient


def test_rank0_writes_only_to_the_runs_store_and_opens_no_database_where_it_runs(tmp_path, monkeypatch):
    """A worker is not given MLFLOW_TRACKING_URI and runs in Ray Train's working directory: nothing of MLflow's
    (its fluent API's default store, ./mlflow.db) may be created there."""
    from orchestrator.train.worker_metrics import WorkerMetrics

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    workdir = tmp_path / "ray-train-working-dir"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("worker")).info.run_id
    try:
        metrics = WorkerMetrics({"tracking": {"uri": uri, "run_id": run_id, "system_metrics": False}}, rank=0,
                                resumed_at=None)
        metrics.log({"loss": 0.5}, 1)
        metrics.close()
    finally:
        mlflow.set_tracking_uri(None)  # the test process's default again
    assert [m.value for m in client.get_metric_history(run_id, "loss")] == [0.5]
    assert list(workdir.iterdir()) == []
