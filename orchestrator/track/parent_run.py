"""A run that holds other runs: a pipeline's or a sweep's parent, written by the driver through its own client.

What both parents share lives here (the experiment, creating the run with orch's tags, reopening it by name,
artifacts, metrics, closing it); what each records about its children lives with it (`orchestrator.pipeline.lineage`,
`orchestrator.sweep.tracking`).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from orchestrator.plan import TrackingPlan
from orchestrator.track.mlflow_run import experiment_id, find_run, new_run_tags


class ParentRun:
    def __init__(self, tracking: TrackingPlan) -> None:
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking.uri)
        self.experiment_id = experiment_id(self.client, tracking)
        self.experiment = tracking.experiment
        self.run_id: Optional[str] = None

    def create(self, run_name: str, storage_path: str, tags: Mapping[str, str]) -> str:
        run = self.client.create_run(
            self.experiment_id, run_name=run_name, tags=new_run_tags(run_name, storage_path, **tags)
        )
        self.run_id = run.info.run_id
        return self.run_id

    def find_by_name(self, run_name: str, storage_path: str) -> Any:
        """The newest run of the experiment with this orch run name and storage, or None (see `find_run`)."""
        return find_run(self.client, self.experiment, self.experiment_id, run_name, storage_path)

    def reopen(self, run_name: str, storage_path: str, what: str) -> str:
        run = self.find_by_name(run_name, storage_path)
        if run is None:
            raise LookupError(f"resume={run_name}: no {what} run with that name in MLflow")
        self.run_id = run.info.run_id
        self.client.update_run(self.run_id, status="RUNNING")
        return self.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        for key, value in params.items():
            self.client.log_param(self.run_id, key, value)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_artifacts(self, directory: str, artifact_path: Optional[str] = None) -> None:
        self.client.log_artifacts(self.run_id, directory, artifact_path)

    def log_artifact(self, path: str, artifact_path: Optional[str] = None) -> None:
        self.client.log_artifact(self.run_id, path, artifact_path)

    def log_metrics(self, metrics: Mapping[str, Any]) -> None:
        for key, value in metrics.items():
            self.client.log_metric(self.run_id, key, float(value))

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def finish(self, status: str) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status)
