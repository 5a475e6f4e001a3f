"""Calibration passes: forward the stage's first batches through a model whose hooks measure something."""

from __future__ import annotations

from typing import Iterable, Sequence

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle


def calibrate(model: nn.Module, batches: Iterable[Tensor], handles: Sequence[RemovableHandle]) -> None:
    """Run `batches` through `model` in eval mode (no dropout: the measurement is of the model, not of the noise),
    then remove the measuring hooks and restore the model's mode, whatever happened in between."""
    training = model.training
    model.eval()
    try:
        for batch in batches:
            model(batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(training)
