"""The `recipe.pruning` config mapped onto a pruning hook: shared by every training recipe (train, prune, distill).

The hook itself is a technique from `orchestrator.compress`; this module only translates the config's fractions of
`trainer.max_steps` into steps, picks the criterion (magnitude | wanda) and pattern (unstructured | N:M), and picks
the hook for the schedule.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

from torch import Tensor, nn

from orchestrator.compress import (
    FixedMasks,
    GradualPruning,
    StepEndHook,
    masks_from_scores,
    prunable_parameters,
)
from orchestrator.compress.n_m_sparsity import n_m_masks, parse_pattern
from orchestrator.compress.wanda import wanda_scores, weight_input_dims
from orchestrator.config.validate import pruning_window


def selected_parameters(module: nn.Module, pruning: Mapping[str, Any]) -> dict[str, nn.Parameter]:
    """The weights recipe.pruning selects (include/exclude), or ValueError naming the keys when none is."""
    params = prunable_parameters(module, include=pruning["include"], exclude=list(pruning["exclude"]))
    if not params:
        raise ValueError(
            f"recipe.pruning selects no parameters (include={pruning['include']}, exclude={pruning['exclude']})"
        )
    return params


def pruning_hook(
    module: nn.Module,
    pruning: Mapping[str, Any],
    max_steps: int,
    optimizer: Any,
    input_norms: Optional[Mapping[str, Tensor]] = None,
) -> Optional[StepEndHook]:
    """None for schedule=none. Build after `deepspeed.initialize`: `optimizer` is the engine's (ZeRO master copies).
    method=wanda needs `input_norms` (`orchestrator.compress.wanda.input_feature_norms` on calibration batches)."""
    schedule = pruning["schedule"]
    if schedule == "none":
        return None
    params = selected_parameters(module, pruning)
    if schedule == "hold":
        return FixedMasks.from_zeros(params, optimizer=optimizer)
    n_m = parse_pattern(str(pruning["pattern"]))
    input_dims = weight_input_dims(module, params) if n_m or pruning["method"] == "wanda" else {}
    score = _score_function(pruning["method"], input_norms, input_dims)
    # N:M fixes the sparsity: M - N of every M weights
    final = (n_m[1] - n_m[0]) / n_m[1] if n_m else pruning["sparsity"]
    if schedule == "one_shot":
        scores = {name: score(name, param) for name, param in params.items()}
        masks = n_m_masks(scores, *n_m, input_dims) if n_m else masks_from_scores(scores, final, pruning["scope"])
        return FixedMasks(params, masks, optimizer=optimizer)
    start, end = pruning_window(pruning, max_steps)
    return GradualPruning(
        params,
        final_sparsity=final,
        start_step=start,
        end_step=end,
        frequency=max(1, (end - start) // pruning["updates"]),
        initial_sparsity=min(pruning["initial_sparsity"], final),
        scope=pruning["scope"],
        optimizer=optimizer,
        scores=score,
        n_m=n_m,
        input_dims=input_dims,
    )


def _score_function(
    method: str, input_norms: Optional[Mapping[str, Tensor]], input_dims: Mapping[str, int]
) -> Callable[[str, Tensor], Tensor]:
    if method == "magnitude":
        return lambda name, weight: weight.detach().abs().float()
    if method == "wanda":
        if input_norms is None:
            raise ValueError("recipe.pruning.method=wanda needs calibration input norms (recipe=prune measures them)")
        return lambda name, weight: wanda_scores({name: weight}, input_norms, input_dims)[name]
    raise ValueError(f"recipe.pruning.method={method!r}: expected 'magnitude' or 'wanda'")
