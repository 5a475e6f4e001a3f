"""Synthetic classification from scikit-learn: any size, deterministic, for quick checks and benchmarks."""

from __future__ import annotations

from typing import Sequence

import torch
from sklearn.datasets import make_classification
from sklearn.model_selection import train_test_split
from torch.utils.data import TensorDataset

from orchestrator.data.splits import DataSplits


def make_classification_splits(
    num_samples: int = 2048,
    num_features: int = 32,
    num_classes: int = 4,
    val_fraction: float = 0.2,
    split_seed: int = 0,
    input_shape: Sequence[int] = (),
    task: str = "classification",
) -> DataSplits:
    features, labels = make_classification(
        n_samples=num_samples,
        n_features=num_features,
        n_informative=max(2, num_features // 2),
        n_classes=num_classes,
        n_clusters_per_class=1,
        random_state=split_seed,
    )
    inputs = torch.tensor(features, dtype=torch.float32)
    targets = torch.tensor(labels, dtype=torch.long)
    x_train, x_val, y_train, y_val = train_test_split(
        inputs, targets, test_size=val_fraction, random_state=split_seed, stratify=targets
    )
    return DataSplits(TensorDataset(x_train, y_train), TensorDataset(x_val, y_val), task="classification")
