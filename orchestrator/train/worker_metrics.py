"""Rank 0's metric stream: MLflow (buffered, asynchronous batches) and the driver's progress board (throttled).

Metrics are buffered and sent to MLflow at most every FLUSH_EVERY_S seconds (and at every checkpoint, on
divergence and at the end): one MLflow call costs ~15 ms of the training process's time even with
synchronous=False (measured on 2 busy cores, sqlite store), which at log_every=10 was ~15 % of a small model's step
time; buffered, it is well under 1 % (benchmarks/tracking_checkpoint.py). The progress board gets the latest values
at most once a second (and at every flush).

Only rank 0 writes, into the run the driver created, so a run never has N copies of its metrics. The client is
used directly rather than `mlflow.start_run`: ending an active run would mark it FINISHED, and the run's status
belongs to the driver, which alone knows whether the whole stage succeeded.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Optional

FLUSH_EVERY_S = 5.0
# The driver's progress board is refreshed from the latest values at most this often: one Ray actor call costs ~2 ms
# of the training process (measured on rank 0 at log_every=10, 2 workers, 2 busy cores), about a quarter of a
# small model's step, and a board cannot show more than a few updates a second anyway.
BOARD_EVERY_S = 1.0
MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch call


def connect_in_background(tracking_uri: str) -> None:
    """Rank 0 imports MLflow and opens its tracking store on a thread while the main thread builds the data, the
    model and the DeepSpeed engine, so that its first step does not wait for them: ~1.6 s measured on a busy worker,
    of which ~1 s is opening a SQL store (MLflow checks its schema). MLflow keeps one store per URI, so the
    `MlflowClient` that `WorkerMetrics` creates later reuses this one. An error here is left to that later client,
    which raises it where it is used."""

    def connect() -> None:
        try:
            from mlflow import MlflowClient
            from mlflow.system_metrics.system_metrics_monitor import (
                SystemMetricsMonitor,  # noqa: F401
            )

            MlflowClient(tracking_uri=tracking_uri)
        except Exception:  # noqa: BLE001 - raised again by WorkerMetrics
            pass

    threading.Thread(target=connect, name="orch-mlflow-connect", daemon=True).start()


class WarningsToDriver(logging.Handler):
    """orch's own warnings on rank 0 (a checkpoint skipped on resume, system metrics lost) posted to the driver's
    progress board, which shows them on the user's terminal: the workers' output itself goes to the run's log file."""

    def __init__(self, board) -> None:
        super().__init__(logging.WARNING)
        self.board = board

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.board.warn.remote(self.format(record))
        except Exception:  # noqa: BLE001 - logging never raises into the training loop
            self.handleError(record)


def send_warnings_to_driver(board) -> None:
    """Rank 0: orch's warnings also reach the driver's terminal through `board` (once per process)."""
    logger = logging.getLogger("orchestrator")
    for handler in [h for h in logger.handlers if isinstance(h, WarningsToDriver)]:
        logger.removeHandler(handler)
    logger.addHandler(WarningsToDriver(board))


class WorkerMetrics:
    def __init__(self, loop_config: dict[str, Any], rank: int, resumed_at: Optional[int]) -> None:
        self.enabled = rank == 0
        self.pending: list[Any] = []
        self.in_flight: list[Any] = []  # RunOperations of batches sent asynchronously, not yet known to be stored
        self.last_flush = time.monotonic()
        self.progress = loop_config.get("progress")
        self.board_step: Optional[int] = None  # the latest step and metrics not yet sent to the progress board
        self.board_metrics: dict[str, float] = {}
        self.last_board_update = 0.0
        self.run_id = loop_config["tracking"]["run_id"]
        self.client = None
        self.system_monitor = None
        if not self.enabled:
            return
        from mlflow import MlflowClient

        from orchestrator.config.secrets import load_secret_files

        load_secret_files()  # the tracking credentials come as a file path, never as a runtime_env value
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
            from mlflow.system_metrics.system_metrics_monitor import (
                SystemMetricsMonitor,
            )

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
        self.pending.extend(Metric(key, float(value), now, step) for key, value in metrics.items())
        if time.monotonic() - self.last_flush >= FLUSH_EVERY_S:
            self.flush()
        if self.progress is not None:
            self.board_step, self.board_metrics = step, {**self.board_metrics, **metrics}
            if time.monotonic() - self.last_board_update >= BOARD_EVERY_S:
                self._update_board()

    def _update_board(self) -> None:
        if self.progress is not None and self.board_step is not None:
            self.progress.update.remote(self.board_step, self.board_metrics)
            self.board_step, self.board_metrics, self.last_board_update = None, {}, time.monotonic()

    def set_tag(self, key: str, value: str) -> None:
        if self.enabled:
            self.client.set_tag(self.run_id, key, value)  # type: ignore[union-attr]

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.enabled:
            self.client.log_text(self.run_id, text, artifact_file)  # type: ignore[union-attr]

    def flush(self, wait: bool = False) -> None:
        """Send the buffered metrics; `wait=True` returns once they are stored (before a checkpoint: a restart
        resumes there and must find them logged). Waits on the batches' own handles: `mlflow.flush_async_logging()`
        flushes the default store's queue, which need not be this client's."""
        self._update_board()
        if self.enabled and self.pending:
            for start in range(0, len(self.pending), MAX_BATCH):
                chunk = self.pending[start : start + MAX_BATCH]
                self.in_flight.append(self.client.log_batch(self.run_id, metrics=chunk, synchronous=False))  # type: ignore[union-attr]
            self.pending, self.last_flush = [], time.monotonic()
        if wait:
            for operation in self.in_flight:
                operation.wait()
            self.in_flight = []

    def diverged(self, step: int) -> None:
        """Tell the driver, which fails the stage with a typed error (the workers end without saving)."""
        self.flush(wait=True)
        if self.enabled and self.progress is not None:
            import ray

            ray.get(self.progress.fail.remote({"kind": "diverged", "step": step}))

    def close(self) -> None:
        if not self.enabled:
            return
        self.flush(wait=True)
        if self.system_monitor is not None:
            self._finish_system_metrics(self.system_monitor)
        import mlflow

        mlflow.flush_async_logging()  # metrics must be stored before the driver reads them back

    @staticmethod
    def _finish_system_metrics(monitor) -> None:
        """Stop MLflow's sampler, then publish the window it was collecting: the sampler publishes only after each
        full sampling interval and drops the last partial one, so a run shorter than one interval (5 s) would have
        no system metrics at all. A fresh sample is taken first so the window is never empty."""
        monitor.finish()  # joins the sampling thread: nothing else touches the monitor from here on
        try:
            monitor.collect_metrics()
            monitor.publish_metrics(monitor.aggregate_metrics())
            monitor.mlflow_logger.flush()
        except Exception as error:  # system metrics must never fail a run that trained
            import logging

            logging.getLogger(__name__).warning("could not log the final system-metrics sample: %s", error)
