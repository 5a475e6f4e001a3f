"""Rank 0's MLflow writer (orchestrator.train.worker_metrics) in the test process, against a real sqlite store."""

from __future__ import annotations

from typing import Iterator

import mlflow
import pytest
from mlflow import MlflowClient

from orchestrator.train import worker_metrics


@pytest.fixture
def run_store(tmp_path, monkeypatch) -> Iterator[tuple[str, str, MlflowClient]]:
    """(uri, run id, client) of a run in a store of its own. A worker is not given MLFLOW_TRACKING_URI; rank 0 sets
    the run's URI for its process, which here is the test process: MLflow's default is put back afterwards."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "store").mkdir()
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("worker")).info.run_id
    try:
        yield uri, run_id, client
    finally:
        mlflow.set_tracking_uri(None)


def rank0(uri: str, run_id: str) -> worker_metrics.WorkerMetrics:
    return worker_metrics.WorkerMetrics({"tracking": {"uri": uri, "run_id": run_id, "system_metrics": False}}, rank=0,
                                        resumed_at=None)


def test_rank0_writes_only_to_the_runs_store_and_opens_no_database_where_it_runs(run_store, tmp_path, monkeypatch):
    """Ray Train runs the worker in a working directory of its own: nothing of MLflow's (its fluent API's default
    store, ./mlflow.db) may be created there."""
    uri, run_id, client = run_store
    workdir = tmp_path / "ray-train-working-dir"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    metrics = rank0(uri, run_id)
    metrics.log({"loss": 0.5}, 1)
    metrics.close()
    assert [m.value for m in client.get_metric_history(run_id, "loss")] == [0.5]
    assert list(workdir.iterdir()) == []


def test_metrics_are_buffered_until_flushed(run_store, monkeypatch):
    uri, run_id, client = run_store
    monkeypatch.setattr(worker_metrics, "FLUSH_EVERY_S", 3600.0)
    metrics = rank0(uri, run_id)
    for step in range(1, 4):
        metrics.log({"loss": 1.0 / step}, step)
    mlflow.flush_async_logging()
    assert client.get_metric_history(run_id, "loss") == []  # buffered: nothing sent yet
    metrics.close()
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3]
