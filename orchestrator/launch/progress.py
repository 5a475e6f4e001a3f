"""Live progress on the driver: rank 0 posts (step, metrics) to a tiny actor; the driver polls it and draws a bar.

Workers' own stdout reaches the driver interleaved and prefixed by Ray; a board keeps the bar on the driver, where
the user is looking, and costs rank 0 one fire-and-forget actor call per log interval.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, Callable, Iterator

import ray
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def start_board() -> "ray.actor.ActorHandle":
    """A ProgressBoard on the driver's own node: a worker node that goes away (an elastic group losing a node) must
    not take the run's board with it, as Ray's default placement could (a 0-CPU actor lands on any node); the
    driver's node going away ends the run anyway."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    return ProgressBoard.options(scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)).remote()


@ray.remote(num_cpus=0)
class ProgressBoard:
    def __init__(self) -> None:
        self.step, self.metrics = 0, {}
        self.attempts = 0
        self.failure: dict | None = None
        self.warnings: list[str] = []  # orch's own warnings on rank 0, for the user's terminal

    def attempt_started(self) -> int:
        """Rank 0 calls this when a worker group starts: 1 for the first, +1 for each restart after a failure."""
        self.attempts += 1
        return self.attempts

    def update(self, step: int, metrics: dict[str, float]) -> None:
        self.step = step
        self.metrics.update(metrics)

    def fail(self, failure: dict) -> None:
        self.failure = failure

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def failure_reported(self) -> dict | None:
        return self.failure

    def latest(self, warnings_seen: int = 0) -> tuple[int, dict[str, float], list[str]]:
        return self.step, self.metrics, self.warnings[warnings_seen:]


def _describe(metrics: dict[str, float]) -> str:
    parts = []
    if "loss" in metrics:
        parts.append(f"loss {metrics['loss']:.4f}")
    for key in ("val_accuracy", "val_perplexity"):
        if key in metrics:
            parts.append(f"{key} {metrics[key]:.4f}")
    if "samples_per_s" in metrics:
        parts.append(f"{metrics['samples_per_s']:.0f} samples/s")
    return "  ".join(parts)


class _Poll:
    """The board's latest step and metrics; warnings not shown yet are printed on `console` as they arrive."""

    def __init__(self, board, console: Console) -> None:
        self.board, self.console, self.warnings_seen = board, console, 0

    def __call__(self) -> tuple[int, dict[str, float]] | None:
        try:
            step, metrics, warnings = ray.get(self.board.latest.remote(self.warnings_seen), timeout=5)
        except Exception:  # noqa: BLE001 - a slow poll must never stop training; try again next time
            return None
        for message in warnings:
            self.console.print(f"[yellow]warning[/yellow] (rank 0) {message}", highlight=False)
        self.warnings_seen += len(warnings)
        return step, metrics


def _print_lines(thread: threading.Thread, board, total_steps: int, label: str, console: Console) -> None:
    every = max(1, total_steps // 10)
    started, printed = time.monotonic(), 0
    console.print(f"{label}: starting workers…")
    for step, metrics in _board_while_running(thread, _Poll(board, console), every_s=1.0):
        if step >= printed + every or (step == total_steps and printed < step):
            printed = step
            elapsed = time.monotonic() - started
            console.print(f"{label}: step {step}/{total_steps}  {_describe(metrics)}  elapsed {elapsed:.0f}s")


def _board_while_running(thread: threading.Thread, poll: _Poll, every_s: float) -> Iterator[tuple[int, dict[str, float]]]:
    """Start `thread` and yield the board's (step, metrics) every `every_s` while it runs, and once more after it
    ended: the fit's last steps may have reached the board since the poll before."""
    thread.start()
    while True:
        thread.join(timeout=every_s)
        finished = not thread.is_alive()
        latest = poll()
        if latest is not None:
            yield latest
        if finished:
            return


def _is_terminal(stream) -> bool:
    return bool(getattr(stream, "isatty", lambda: False)())


def run_with_progress(fit: Callable[[], Any], board, total_steps: int, label: str, console: Console) -> Any:
    """Run `fit` in a thread while drawing the board's progress; re-raise whatever `fit` raised."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = fit()
        except BaseException as error:  # noqa: BLE001 - handed back to the caller's thread
            outcome["error"] = error

    thread = threading.Thread(target=target, name="orch-fit", daemon=True)
    if not console.is_terminal:  # job logs, CI, pipes: a bar cannot redraw there, so print a line now and then
        _print_lines(thread, board, total_steps, label, console)
        if "error" in outcome:
            raise outcome["error"]
        return outcome["result"]
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[metrics]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    # rich prints what the libraries print while the bar is live above it, when that output reaches a terminal; a
    # quiet run (orchestrator.launch.run_log) sends it to its log file, where it stays
    redirect = {"redirect_stdout": _is_terminal(sys.stdout), "redirect_stderr": _is_terminal(sys.stderr)}
    with Progress(*columns, console=console, transient=False, **redirect) as progress:
        task = progress.add_task(label, total=total_steps, metrics="starting workers…")
        poll = _Poll(board, progress.console)  # printed above the bar
        for step, metrics in _board_while_running(thread, poll, every_s=0.5):
            progress.update(task, completed=step, metrics=_describe(metrics))
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
