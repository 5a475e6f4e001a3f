"""A plain-text file as a byte-level language-modelling dataset (characters, for ASCII text).

Bytes as tokens give a fixed vocabulary of 256 with no tokenizer to train or ship. The file is split by position
(the last `val_fraction` for validation) and cut into non-overlapping blocks of `block_size` + 1 bytes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from orchestrator.data.splits import DataSplits


class TokenBlocks(Dataset):
    def __init__(self, tokens: Tensor, block_size: int) -> None:
        self.tokens, self.block_size = tokens, block_size

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.block_size)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        start = index * self.block_size
        window = self.tokens[start : start + self.block_size + 1]
        return window[:-1], window[1:]


def load_text_splits(
    path: str, block_size: int = 64, vocab_size: int = 256, val_fraction: float = 0.1, task: str = "lm"
) -> DataSplits:
    raw = Path(path).read_bytes()
    tokens = torch.from_numpy(np.frombuffer(raw, dtype=np.uint8).astype(np.int64))
    cut = int(len(tokens) * (1 - val_fraction))
    train, val = TokenBlocks(tokens[:cut], block_size), TokenBlocks(tokens[cut:], block_size)
    if len(train) == 0 or len(val) == 0:
        raise ValueError(
            f"data.path={path} holds {len(raw)} bytes: too short for data.block_size={block_size} with "
            f"data.val_fraction={val_fraction} (need at least one block of {block_size + 1} bytes in each split)"
        )
    return DataSplits(train, val, task="lm")
