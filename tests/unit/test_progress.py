"""The driver's progress loop (orchestrator/launch/progress.py) reads the board once more after the fit returned."""

from __future__ import annotations

import threading

from orchestrator.launch.progress import _board_while_running


def test_a_last_step_posted_while_the_board_was_being_read_is_still_shown():
    """The fit posts its last step and returns while a poll is under way (the poll still sees the earlier step):
    that last step must be yielded, from a poll made after the fit ended."""
    board = {"latest": (3, {"loss": 1.0})}
    polling = threading.Event()

    def fit() -> None:
        polling.wait(timeout=30)
        board["latest"] = (5, {"loss": 0.5})

    thread = threading.Thread(target=fit)

    def poll():
        seen = board["latest"]
        if not polling.is_set():
            polling.set()
            thread.join(timeout=30)  # the fit ends during this poll, after the poll read the board
        return seen

    seen = list(_board_while_running(thread, poll, every_s=0.01))
    assert seen[-1] == (5, {"loss": 0.5}) and not thread.is_alive()
    assert seen[0] == (3, {"loss": 1.0})
