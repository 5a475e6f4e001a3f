"""The lines a sweep prints as its trials start and end (orchestrator/sweep/progress.py)."""

from __future__ import annotations

import io

import ray.cloudpickle
from rich.console import Console

from orchestrator.sweep.progress import ended_line, failed_line, started_line, trial_progress


def test_a_started_trial_names_its_values_and_its_place_in_the_sweep():
    line = started_line("a1", {"trainer.optimizer.lr": 0.003, "model.hidden_sizes": [32, 16]}, 2, 8)
    assert line == "trial a1 started (2/8): trainer.optimizer.lr=0.003 model.hidden_sizes=32x16"


def test_an_ended_trial_says_how_it_ended_its_score_and_the_best_so_far():
    stopped = ended_line("a1", {"step": 40, "val_accuracy": 0.5}, "val_accuracy", 100, ("b2", 0.93), 2, 4)
    assert stopped == "trial a1 stopped early at step 40: val_accuracy 0.5 · best so far 0.93 (b2) · 2/4 ended"
    done = ended_line("c3", {"step": 100, "val_loss": 0.123456}, "val_loss", 100, None, 1, 4)
    assert done == "trial c3 completed: val_loss 0.1235 · 1/4 ended"
    assert "no val_f1 reported" in ended_line("d4", {"step": 100}, "val_f1", 100, None, 3, 4)


def test_a_failed_trial_shows_the_exception_line_of_its_traceback():
    traceback = 'Traceback (most recent call last):\n  File "x.py", line 1\nValueError: trainer.lr must be > 0\n\n'
    assert failed_line("e5", traceback, 4, 4) == "trial e5 failed: ValueError: trainer.lr must be > 0 · 4/4 ended"
    assert failed_line("e5", "", 1, 4) == "trial e5 failed: no error text · 1/4 ended"


def test_the_callback_pickles_without_its_console():
    """Tune pickles its RunConfig, callbacks included; a console (locks, a terminal) would not pickle."""
    callback = trial_progress(Console(file=io.StringIO()), [], "val_accuracy", "max", 100, 4)
    assert type(ray.cloudpickle.loads(ray.cloudpickle.dumps(callback))).__name__ == "Callback"
