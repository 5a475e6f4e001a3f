"""The `recipe.pruning` config mapped onto a pruning hook: shared by every training recipe (train, prune, distill).

The hook itself is a technique from `orchestrator.compress`; this module only translates the config's fractions of
`trainer.max_steps` into steps and picks the hook for the schedule.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from torch import nn

from orchestrator.compress import (
    FixedMasks,
    GradualPruning,
    StepEndHook,
    prunable_parameters,
)
from orchestrator.config.validate import pruning_window


def pruning_hook(module: nn.Module, pruning: Mapping[str, Any], max_steps: int, optimizer: Any) -> Optional[StepEndHook]:
    """None for schedule=none. Build after `deepspeed.initialize`: `optimizer` is the engine's (ZeRO master copies)."""
    schedule = pruning["schedule"]
    if schedule == "none":
        return None
    params = prunable_parameters(module, include=pruning["include"], exclude=list(pruning["exclude"]))
    if not params:
        raise ValueError(
            f"recipe.pruning selects no parameters (include={pruning['include']}, exclude={pruning['exclude']})"
        )
    if schedule == "hold":
        return FixedMasks.from_zeros(params, optimizer=optimizer)
    if schedule == "one_shot":
        return FixedMasks.one_shot(params, pruning["sparsity"], pruning["scope"], optimizer=optimizer)
    start, end = pruning_window(pruning, max_steps)
    return GradualPruning(
        params,
        final_sparsity=pruning["sparsity"],
        start_step=start,
        end_step=end,
        frequency=max(1, (end - start) // pruning["updates"]),
        initial_sparsity=pruning["initial_sparsity"],
        scope=pruning["scope"],
        optimizer=optimizer,
    )
