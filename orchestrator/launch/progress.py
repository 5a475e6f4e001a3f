"""Live progress on the driver: rank 0 posts (step, metrics) to a tiny actor; the driver polls it and draws a bar.

Workers' own stdout reaches the driver interleaved and prefixed by Ray; a board keeps the bar on the driver, where
the user is looking, and costs rank 0 one fire-and-forget actor call per log interval.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import ray
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


@ray.remote(num_cpus=0)
class ProgressBoard:
    def __init__(self) -> None:
        self.step, self.metrics = 0, {}

    def update(self, step: int, metrics: dict[str, float]) -> None:
        self.step = step
        self.metrics.update(metrics)

    def latest(self) -> tuple[int, dict[str, float]]:
        return self.step, self.metrics


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


def run_with_progress(fit: Callable[[], Any], board, total_steps: int, label: str, console: Console) -> Any:
    """Run `fit` in a thread while drawing the board's progress; re-raise whatever `fit` raised."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = fit()
        except BaseException as error:  # noqa: BLE001 - handed back to the caller's thread
            outcome["error"] = error

    thread = threading.Thread(target=target, name="orch-fit", daemon=True)
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[metrics]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(label, total=total_steps, metrics="starting workers…")
        thread.start()
        while thread.is_alive():
            thread.join(timeout=0.5)
            try:
                step, metrics = ray.get(board.latest.remote(), timeout=5)
            except Exception:  # noqa: BLE001 - a slow poll must never stop training; draw again next time
                continue
            progress.update(task, completed=step, metrics=_describe(metrics))
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
