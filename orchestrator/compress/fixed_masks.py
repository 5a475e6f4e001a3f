"""One-shot pruning and fine-tuning at fixed masks: a ``StepEndHook`` whose masks never change after construction.

Use::

    params = prunable_parameters(engine.module)
    hook = FixedMasks.one_shot(params, sparsity=0.9, scope="layer", optimizer=engine.optimizer)   # prune now
    hook = FixedMasks.from_zeros(params, optimizer=engine.optimizer)   # keep a pruned model's zeros (fine-tuning)
    ... engine.step(); hook.on_step_end(step)   # reports the sparsity once, then nothing: the masks hold by themselves
    engine.save_checkpoint(d, client_state={"pruning": hook.state_dict()})

Suggested settings: one-shot to 50-80% then fine-tune for ~20-30% of the original training; beyond that, gradual
pruning (``GradualPruning``) recovers far better. ``from_zeros`` is what fine-tuning a pruned model needs: without it
the first optimizer step would bring every pruned weight back.

DeepSpeed ZeRO and precision: as ``MaskEnforcer`` (ZeRO 0-2 in fp32/bf16/fp16; ZeRO-3 raises). Build the hook after
``deepspeed.initialize``; ``from_zeros`` reads the module's weights, so load the pruned model before wrapping it (an
exported fp32 model keeps its exact zeros; bf16 rounding never turns a non-zero into a zero, nor the reverse).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from orchestrator.compress.mask_enforcer import MaskEnforcer
from orchestrator.compress.pruning import Scope, magnitude_masks, realized_sparsity

__all__ = ["FixedMasks"]


class FixedMasks:
    """Hook enforcing one set of masks for the whole run."""

    def __init__(self, params: Mapping[str, nn.Parameter], masks: Mapping[str, Tensor], optimizer: Any | None = None) -> None:
        self.params = dict(params)
        self.enforcer = MaskEnforcer(self.params, optimizer=optimizer)
        self.enforcer.update(masks)
        self.sparsity = realized_sparsity(self.params)
        self._reported = False

    @classmethod
    def one_shot(
        cls, params: Mapping[str, nn.Parameter], sparsity: float, scope: Scope = "layer", optimizer: Any | None = None
    ) -> "FixedMasks":
        """Prune the smallest-magnitude weights to ``sparsity`` now, and keep them pruned."""
        return cls(params, magnitude_masks(params, sparsity, scope), optimizer)

    @classmethod
    def from_zeros(cls, params: Mapping[str, nn.Parameter], optimizer: Any | None = None) -> "FixedMasks":
        """Keep exactly the weights that are zero now at zero."""
        return cls(params, {name: p.detach() != 0 for name, p in params.items()}, optimizer)

    def on_step_end(self, step: int) -> float | None:
        if self._reported:
            return None
        self._reported = True
        return self.sparsity

    def state_dict(self) -> dict[str, Any]:
        return {"sparsity": self.sparsity, "masks": self.enforcer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sparsity = float(state["sparsity"])
        self.enforcer.load_state_dict(state["masks"])

    def remove(self) -> None:
        self.enforcer.remove()
