"""Multi-layer perceptron over the flattened input: the default model on digits."""

from __future__ import annotations

import math
from typing import Sequence

from torch import Tensor, nn


class MLP(nn.Module):
    def __init__(
        self, input_shape: Sequence[int], num_classes: int, hidden_sizes: Sequence[int] = (128, 128), dropout: float = 0.0
    ) -> None:
        super().__init__()
        widths = [math.prod(input_shape), *hidden_sizes]
        layers: list[nn.Module] = [nn.Flatten()]
        for fan_in, fan_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))
