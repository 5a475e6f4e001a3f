"""A line on the console as each trial starts and ends, so a sweep is not silent between its first and last line.

Why a Tune callback: Tune's own status tables go to the sweep's log file (the quiet terminal), and Tune already
knows when a trial starts, completes, is stopped by the scheduler or fails; `ray.tune.Callback` runs on the driver,
where the console is. The lines say what a user waits for: which values a trial tries, how it ended, the best so far.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

from rich.console import Console

from orchestrator.sweep.space import Dimension, decode
from orchestrator.track.tables import format_cell


def started_line(trial_id: str, params: Mapping[str, Any], started: int, total: int) -> str:
    values = " ".join(f"{key}={format_cell(value)}" for key, value in params.items())
    return f"trial {trial_id} started ({started}/{total}): {values}"


def ended_line(
    trial_id: str, result: Mapping[str, Any], metric: str, max_steps: int, best: Optional[tuple[str, float]],
    ended: int, total: int,
) -> str:
    step = result.get("step")
    how = "completed" if step is not None and step >= max_steps else f"stopped early at step {step}"
    value = result.get(metric)
    score = f"{metric} {format_cell(value)}" if value is not None else f"no {metric} reported"
    leader = f" · best so far {format_cell(best[1])} ({best[0]})" if best is not None else ""
    return f"trial {trial_id} {how}: {score}{leader} · {ended}/{total} ended"


def failed_line(trial_id: str, traceback_text: str, ended: int, total: int) -> str:
    """`traceback_text`: Tune's error file for the trial; its last line is the exception and its message."""
    lines = [line.strip() for line in traceback_text.splitlines() if line.strip()]
    return f"trial {trial_id} failed: {(lines[-1] if lines else 'no error text')[:200]} · {ended}/{total} ended"


def _silent_callback() -> Any:
    import ray.tune

    return ray.tune.Callback()


def trial_progress(console: Console, dimensions: list[Dimension], metric: str, mode: str, max_steps: int, total: int):
    """The callback for `RunConfig(callbacks=[...])`: built here so that importing this module needs no Ray."""
    import ray.tune

    class TrialProgress(ray.tune.Callback):
        def __init__(self) -> None:
            self.started = self.ended = 0
            self.best: Optional[tuple[str, float]] = None

        def __reduce__(self):
            # Tune pickles its RunConfig (callbacks included) into the sweep folder; the console holds locks and a
            # terminal, which do not pickle, and a sweep is never restored from that pickle (README, Security)
            return (_silent_callback, ())

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.started += 1
            console.print(started_line(trial.trial_id, decode(dimensions, trial.config), self.started, total),
                          highlight=False)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.ended += 1
            result = trial.last_result or {}
            steps = int(decode(dimensions, trial.config).get("trainer.max_steps", max_steps))
            value = result.get(metric)
            if result.get("step") is not None and result["step"] >= steps and value is not None and (
                self.best is None or (value > self.best[1] if mode == "max" else value < self.best[1])
            ):
                self.best = (trial.trial_id, float(value))
            console.print(ended_line(trial.trial_id, result, metric, steps, self.best, self.ended, total),
                          highlight=False)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.ended += 1
            error_file = trial.error_file
            text = Path(error_file).read_text(errors="replace") if error_file and Path(error_file).is_file() else ""
            console.print(failed_line(trial.trial_id, text, self.ended, total), highlight=False)

    return TrialProgress()
