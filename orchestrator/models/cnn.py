"""Small convolutional classifier for image-shaped inputs (C, H, W)."""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn


class CNN(nn.Module):
    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[int] = (16, 32),
        hidden_size: int = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"CNN needs image-shaped input (C, H, W); got input_shape={list(input_shape)}")
        in_channels = input_shape[0]
        layers: list[nn.Module] = []
        for out_channels in channels:
            layers += [nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1), nn.ReLU()]
            in_channels = out_channels
        # Pooling to a fixed 2x2 grid keeps the head's size independent of the image size.
        layers += [nn.AdaptiveAvgPool2d(2), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.body = nn.Sequential(nn.Linear(in_channels * 4, hidden_size), nn.ReLU(), nn.Dropout(dropout))
        self.head = nn.Linear(hidden_size, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(self.features(x)))
