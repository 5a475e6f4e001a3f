"""Interfaces the training loop programs against, so it never imports a concrete technique.

A compression technique is a pure function (``magnitude_masks``, ``kd_loss`` ...) plus a thin hook object that the
loop calls at fixed points. The loop only needs to know these shapes; which technique sits behind them is chosen by
the recipe.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class StepEndHook(Protocol):
    """Called once after every optimizer step; survives checkpoint/restore through its state dict.

    ``on_step_end`` returns a number worth logging (e.g. the new sparsity) when it changed something, else ``None``,
    so the loop can log only on change without knowing what the hook does.
    """

    def on_step_end(self, step: int) -> float | None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
