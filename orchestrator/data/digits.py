"""scikit-learn's bundled handwritten digits: 1797 8x8 images, no download, identical on every worker.

Importing scikit-learn costs a process ~0.8 CPU-s (it pulls in scipy.stats): more than everything else a worker does
with this data, in every worker of every run and in the driver (the MLflow Model's input example). So the split is
made with scikit-learn once per machine and kept as plain arrays (`.npz`, read with `allow_pickle=False`: data,
never code) in the cache folder, and every later process reads those arrays. The file's name holds what the split
depends on (scikit-learn's version, val_fraction, split_seed, limit_train), so a split never reads another's; a
file that is missing, unreadable or not the expected arrays is made again. ORCH_CACHE_DIR sets the folder (default
$XDG_CACHE_HOME/orchestrator, else ~/.cache/orchestrator); a folder that cannot be written only means no cache.
"""

from __future__ import annotations

import os
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import TensorDataset

from orchestrator.data.splits import DataSplits

CACHE_ENV = "ORCH_CACHE_DIR"
ARRAYS = ("x_train", "y_train", "x_val", "y_val")
PIXELS = 64  # 8x8 images, values 0..16
FORMAT = 1  # bump when what the file holds changes


def load_digits_splits(
    input_shape: Sequence[int] = (1, 8, 8),
    num_classes: int = 10,
    val_fraction: float = 0.2,
    split_seed: int = 0,
    limit_train: Optional[int] = None,
    task: str = "classification",
) -> DataSplits:
    arrays = cached_split(val_fraction, split_seed, limit_train)

    def dataset(x: np.ndarray, y: np.ndarray) -> TensorDataset:
        inputs = torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, *input_shape)
        return TensorDataset(inputs, torch.tensor(y, dtype=torch.long))

    return DataSplits(dataset(arrays["x_train"], arrays["y_train"]), dataset(arrays["x_val"], arrays["y_val"]),
                      task="classification")


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "orchestrator"


def cached_split(val_fraction: float, split_seed: int, limit_train: Optional[int]) -> dict[str, np.ndarray]:
    """The split's pixel values (uint8, one row per image) and labels, from the cache or made (and cached) now."""
    key = f"digits-f{FORMAT}-sklearn{version('scikit-learn')}-val{val_fraction!r}-seed{split_seed}-limit{limit_train}"
    path = cache_dir() / f"{key}.npz"
    arrays = _read(path)
    if arrays is None:
        arrays = split_with_sklearn(val_fraction, split_seed, limit_train)
        _write(path, arrays)
    return arrays


def split_with_sklearn(val_fraction: float, split_seed: int, limit_train: Optional[int]) -> dict[str, np.ndarray]:
    """Stratified and seeded: every process derives the same split without sharing files (the cache only spares
    the import)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    images, labels = load_digits(return_X_y=True)
    pixels = images.astype(np.uint8)  # whole numbers 0..16 in float64: exact
    x_train, x_val, y_train, y_val = train_test_split(
        pixels, labels, test_size=val_fraction, random_state=split_seed, stratify=labels
    )
    if limit_train is not None and limit_train < len(y_train):
        x_train, _, y_train, _ = train_test_split(
            x_train, y_train, train_size=limit_train, random_state=split_seed, stratify=y_train
        )
    return {"x_train": x_train, "y_train": y_train, "x_val": x_val, "y_val": y_val}


def _read(path: Path) -> Optional[dict[str, np.ndarray]]:
    try:
        with np.load(path, allow_pickle=False) as stored:
            arrays = {name: stored[name] for name in ARRAYS}
    except Exception:  # noqa: BLE001 - missing, truncated, not an npz, object arrays (pickle refused): made again
        return None
    for x, y in ((arrays["x_train"], arrays["y_train"]), (arrays["x_val"], arrays["y_val"])):
        if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != PIXELS or y.ndim != 1 or len(y) != len(x) or not len(y):
            return None
        if y.dtype.kind not in "iu" or x.max() > 16 or y.min() < 0 or y.max() > 9:
            return None
    return arrays


def _write(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Atomically (a temporary file renamed into place): processes that start together never read half a file."""
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(descriptor, "wb") as handle:
            np.savez(handle, **arrays)
        os.replace(temporary, path)
    except OSError:
        if temporary is not None and os.path.exists(temporary):
            os.unlink(temporary)
