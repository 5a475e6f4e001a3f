"""Rank 0's metric stream: MLflow (asynchronous batches) and the driver's progress board.

Only rank 0 writes, into the run the driver created, so a run never has N copies of its metrics. The client is
used directly rather than `mlflow.start_run`: ending an active run would mark it FINISHED, and the run's status
belongs to the driver, which alone knows whether the whole stage succeeded.
"""

from __future__ import annotations

import time
from typing import Any, Optional


class WorkerMetrics:
    def __init__(self, loop_config: dict[str, Any], rank: int, resumed_at: Optional[int]) -> None:
        self.enabled = rank == 0
        self.progress = loop_config.get("progress")
        self.run_id = loop_config["tracking"]["run_id"]
        self.client = None
        self.system_monitor = None
        if not self.enabled:
            return
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=loop_config["tracking"]["uri"])
        if resumed_at is not None:
            self.client.set_tag(self.run_id, "orch.resumed_at_step", str(resumed_at))
        if self.progress is not None:
            import ray

            restarts = ray.get(self.progress.attempt_started.remote()) - 1
            if restarts:  # Ray Train restarted the worker group after a failure: on record, at the resumed step
                self.client.set_tag(self.run_id, "orch.restarts", str(restarts))
                self.client.log_metric(self.run_id, "restarts", restarts, step=resumed_at or 0)
        if loop_config["tracking"]["system_metrics"]:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.system_monitor = SystemMetricsMonitor(
                self.run_id,
                sampling_interval=5,
                resume_logging=resumed_at is not None,
                node_id="rank0",
                tracking_uri=loop_config["tracking"]["uri"],
            )
            self.system_monitor.start()

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch, synchronous=False)  # type: ignore[union-attr]
        if self.progress is not None:
            self.progress.update.remote(step, metrics)

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.enabled:
            self.client.log_text(self.run_id, text, artifact_file)  # type: ignore[union-attr]

    def diverged(self, step: int) -> None:
        """Tell the driver, which fails the stage with a typed error (the workers end without saving)."""
        if self.enabled and self.progress is not None:
            import ray

            ray.get(self.progress.fail.remote({"kind": "diverged", "step": step}))

    def close(self) -> None:
        if not self.enabled:
            return
        if self.system_monitor is not None:
            self.system_monitor.finish()
        import mlflow

        mlflow.flush_async_logging()  # metrics must be stored before the driver reads them back
