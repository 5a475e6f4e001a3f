"""scikit-learn's bundled handwritten digits: 1797 8x8 images, no download, identical on every worker."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import TensorDataset

from orchestrator.data.splits import DataSplits


def load_digits_splits(
    input_shape: Sequence[int] = (1, 8, 8),
    num_classes: int = 10,
    val_fraction: float = 0.2,
    split_seed: int = 0,
    limit_train: Optional[int] = None,
    task: str = "classification",
) -> DataSplits:
    images, labels = load_digits(return_X_y=True)
    inputs = torch.tensor(images / 16.0, dtype=torch.float32).reshape(-1, *input_shape)
    targets = torch.tensor(labels, dtype=torch.long)
    # Stratified and seeded: every worker derives the same split without sharing files.
    x_train, x_val, y_train, y_val = train_test_split(
        inputs, targets, test_size=val_fraction, random_state=split_seed, stratify=targets
    )
    if limit_train is not None and limit_train < len(y_train):
        x_train, _, y_train, _ = train_test_split(
            x_train, y_train, train_size=limit_train, random_state=split_seed, stratify=y_train
        )
    return DataSplits(TensorDataset(x_train, y_train), TensorDataset(x_val, y_val), task="classification")
