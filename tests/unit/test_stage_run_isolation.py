"""A stage's MLflow run is held by its own client: no process-global MLflow state is read or written, so two runs
open at once in one process (a notebook, a sweep trial's actor, a pipeline) write where each was told."""

from __future__ import annotations

import os

import mlflow
from mlflow import MlflowClient

from orchestrator.config import compose
from orchestrator.plan import build_plan, resolve_tracking
from orchestrator.track.mlflow_run import StageRun


def test_two_stage_runs_in_one_process_do_not_cross(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        plan = build_plan(compose([f"name=run-{name}"]), cwd=tmp_path / name)
        tracking = resolve_tracking({"uri": None, "experiment": f"exp-{name}", "artifact_location": None}, tmp_path / name)
        run = StageRun(tracking)
        run.start(plan.stages[0], resuming=False)
        runs.append((run, tracking))
    first, second = runs[0][0], runs[1][0]
    first.log_metrics({"score": 1.0})
    second.log_metrics({"score": 2.0})
    assert mlflow.active_run() is None and "MLFLOW_TRACKING_URI" not in os.environ
    first.finish("FINISHED")
    second.finish("FAILED")
    for (run, tracking), score, status in zip(runs, (1.0, 2.0), ("FINISHED", "FAILED")):
        stored = MlflowClient(tracking.uri).get_run(run.run_id)
        assert stored.data.metrics["score"] == score and stored.info.status == status
        assert stored.data.params["trainer.zero_stage"] == "0"
        other = runs[1][1] if tracking is runs[0][1] else runs[0][1]
        assert not MlflowClient(other.uri).search_runs(
            [e.experiment_id for e in MlflowClient(other.uri).search_experiments()],
            filter_string=f"attributes.run_id = '{run.run_id}'",
        )
