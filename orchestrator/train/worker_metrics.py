"""Rank 0's metric stream: MLflow (buffered, asynchronous batches) and the driver's progress board (throttled).

Metrics are buffered and sent to MLflow at most every FLUSH_EVERY_S seconds (and at every checkpoint, on
divergence and at the end): one MLflow call costs ~15 ms of the training process's time even with
synchronous=False (measured on 2 busy cores, sqlite store), which at log_every=10 was ~15 % of a small model's step
time; buffered, it is well under 1 % (benchmarks/tracking_checkpoint.py). The progress board gets the latest values
at most once a second (and at every flush).

Only rank 0 writes, into the run the driver created, so a run never has N copies of its metrics. The client is
used directly rather than `mlflow.start_run`: ending an active run would mark it FINISHED, and the run's status
belongs to the driver, which alone knows whether the whole stage succeeded.

A tracking outage never stops training: every write (metric batches, tags, texts) goes through one sender thread
(`_Sender`) that keeps what it could not send, in order, and retries with backoff until the server answers again;
at most MAX_BUFFERED metric points are kept (the oldest are dropped beyond, with a warning). A checkpoint waits for
the buffer to be stored only while MLflow answers; through an outage it goes on at once. At the end rank 0 waits
up to CLOSE_TIMEOUT_S for the buffer to be stored, so a run whose server comes back is complete.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any, Callable, Optional

FLUSH_EVERY_S = 5.0
# The driver's progress board is refreshed from the latest values at most this often: one Ray actor call costs ~2 ms
# of the training process (measured on rank 0 at log_every=10, 2 workers, 2 busy cores), about a quarter of a
# small model's step, and a board cannot show more than a few updates a second anyway.
BOARD_EVERY_S = 1.0
MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch call
MAX_BUFFERED = 200_000  # metric points kept through a tracking outage (~50 MB); the oldest go first beyond
CLOSE_TIMEOUT_S = 600.0  # how long the end of training waits for a tracking server to come back
RETRY_MAX_S = 15.0  # the longest pause between two attempts of the sender during an outage

logger = logging.getLogger(__name__)


class _Sender:
    """Rank 0's writes to MLflow, in order, on one thread. A write that fails (the server is down, restarting,
    overloaded) stays at the head of the queue and is retried with backoff; training never waits for it."""

    def __init__(self) -> None:
        self._items: deque[tuple[Callable[[], Any], int]] = deque()  # (write, metric points it carries)
        self._points = 0
        self.failing = False  # the latest attempt failed and none has succeeded since
        self.dropped = 0
        self._closed = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="orch-mlflow-sender", daemon=True)
        self._thread.start()

    def put(self, write: Callable[[], Any], points: int = 0) -> None:
        with self._changed:
            self._items.append((write, points))
            self._points += points
            while self._points > MAX_BUFFERED and len(self._items) > 1:
                _, lost = self._items.popleft()
                self._points -= lost
                self.dropped += lost
            self._changed.notify_all()

    def _run(self) -> None:
        pause = 0.5
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._items or self._closed)
                if not self._items:
                    return
                item = self._items[0]
            try:
                item[0]()
            except Exception as error:  # noqa: BLE001 - kept and retried: an outage must not fail training
                with self._changed:
                    if not self.failing:
                        logger.warning("MLflow does not answer (%s); buffering metrics until it does", error)
                    self.failing = True
                    self._changed.notify_all()
                time.sleep(pause)
                pause = min(pause * 2, RETRY_MAX_S)
                continue
            pause = 0.5
            with self._changed:
                if self.failing:
                    logger.warning("MLflow answers again; sending the buffered metrics")
                self.failing = False
                if self._items and self._items[0] is item:  # not dropped by `put` meanwhile
                    self._items.popleft()
                    self._points -= item[1]
                self._changed.notify_all()

    def drain(self, timeout_s: float, unless_failing: bool = False) -> bool:
        """Wait until everything queued is stored (True), the timeout passes or, with `unless_failing`, MLflow does
        not answer (False)."""
        with self._changed:
            self._changed.wait_for(lambda: not self._items or (unless_failing and self.failing), timeout_s)
            return not self._items

    def close(self, timeout_s: float) -> int:
        """Send what is left within `timeout_s`; returns the metric points that could not be stored."""
        self.drain(timeout_s)
        with self._changed:
            self._closed = True
            lost = self._points + self.dropped
            self._items.clear()
            self._changed.notify_all()
        return lost


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
        self.sender: Optional[_Sender] = None
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
        # rank 0's process is this run's alone: MLflow's fluent calls in it (`close`'s flush, and any library's) go
        # to the run's store. Left unset, they opened a store at MLflow's default, a new ./mlflow.db in Ray Train's
        # working directory: a stray database in Ray's session folder at every fit, and ~1 CPU-s of schema
        # migrations (tests/unit/test_worker_metrics.py)
        import mlflow

        mlflow.set_tracking_uri(loop_config["tracking"]["uri"])
        self.sender = _Sender()
        if resumed_at is not None:
            self.set_tag("orch.resumed_at_step", str(resumed_at))
        if self.progress is not None:
            import ray

            restarts = ray.get(self.progress.attempt_started.remote()) - 1
            if restarts:  # Ray Train restarted the worker group after a failure: on record, at the resumed step
                self.set_tag("orch.restarts", str(restarts))
                self.sender.put(lambda: self.client.log_metric(self.run_id, "restarts", restarts, step=resumed_at or 0), 1)
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
            self.sender.put(lambda: self.client.set_tag(self.run_id, key, value))  # type: ignore[union-attr]

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.enabled:
            self.sender.put(lambda: self.client.log_text(self.run_id, text, artifact_file))  # type: ignore[union-attr]

    def flush(self, wait: bool = False) -> None:
        """Hand the buffered metrics to the sender; `wait=True` (before a checkpoint: a restart resumes there and
        should find them logged) returns once they are stored, or at once while MLflow does not answer: a
        checkpoint never waits on a tracking outage."""
        self._update_board()
        if not self.enabled:
            return
        for start in range(0, len(self.pending), MAX_BATCH):
            chunk = self.pending[start : start + MAX_BATCH]
            self.sender.put(  # type: ignore[union-attr]
                lambda chunk=chunk: self.client.log_batch(self.run_id, metrics=chunk, synchronous=True), len(chunk)
            )
        self.pending, self.last_flush = [], time.monotonic()
        if wait:
            self.sender.drain(CLOSE_TIMEOUT_S, unless_failing=True)  # type: ignore[union-attr]

    def log_memory(self, config: dict[str, Any], precision: str, device: str, step: int) -> None:
        """The plan's per-worker memory figure beside this process's measured peak, so that every run checks the
        estimate `orch plan` printed (memory/*; benchmarks/memory_plan.py compares them across configurations)."""
        if not self.enabled:
            return
        from orchestrator.memory import plan_memory

        predicted = plan_memory(config, precision, budget_check=False)
        measured = measured_peak_bytes(device)
        self.log(
            {
                "memory/predicted_bytes": predicted.total,
                "memory/predicted_model_states_bytes": predicted.model_states,
                "memory/predicted_activations_bytes": predicted.activations,
                "memory/measured_peak_bytes": measured,
                "memory/measured_over_predicted": measured / predicted.total,
            },
            step,
        )

    def diverged(self, step: int) -> None:
        """Tell the driver, which fails the stage with a typed error (the workers end without saving)."""
        self.flush(wait=True)
        if self.enabled and self.progress is not None:
            import ray

            ray.get(self.progress.fail.remote({"kind": "diverged", "step": step}))

    def close(self) -> None:
        if not self.enabled:
            return
        self.flush()
        lost = self.sender.close(CLOSE_TIMEOUT_S)  # type: ignore[union-attr]
        if lost:
            logger.warning("%d metric points could not be sent to MLflow (it did not answer within %.0f s)",
                           lost, CLOSE_TIMEOUT_S)
        if self.system_monitor is not None:
            self._finish_system_metrics(self.system_monitor)
        import mlflow

        mlflow.flush_async_logging()  # the run's store (set in __init__): stored before the driver reads them back

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


def measured_peak_bytes(device: str) -> int:
    """This process's peak memory so far: what the allocator handed out on a GPU (the figure the plan predicts: no
    CUDA context, no cache), the resident set's high-water mark (ru_maxrss, KiB on Linux) on a CPU."""
    if device == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated())
    from orchestrator.timeline import peak_rss_bytes

    return peak_rss_bytes()
