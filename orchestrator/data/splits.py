"""The one shape every built-in dataset factory returns, so the worker loop needs no per-dataset code."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch.utils.data import Dataset


@dataclass
class DataSplits:
    train: Dataset
    val: Dataset
    # "classification": batches are (inputs, class ids), scored by accuracy;
    # "lm": batches are (tokens, next tokens), scored by loss and perplexity.
    task: Literal["classification", "lm"]
