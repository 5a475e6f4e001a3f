"""The digits split is made with scikit-learn once and read from the cache after: the same tensors, without the
import, and a cache file is data only (never unpickled, remade when it is not the expected arrays)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from orchestrator.data import digits
from orchestrator.data.digits import cached_split, load_digits_splits, split_with_sklearn


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(digits.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def sklearn_tensors(limit_train=None) -> list[torch.Tensor]:
    """What scikit-learn gives for the default config, as load_digits_splits returns it."""
    arrays = split_with_sklearn(0.2, 0, limit_train)
    return [torch.tensor(arrays["x_train"] / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8),
            torch.tensor(arrays["y_train"], dtype=torch.long),
            torch.tensor(arrays["x_val"] / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8),
            torch.tensor(arrays["y_val"], dtype=torch.long)]


def tensors(limit_train=None) -> list[torch.Tensor]:
    splits = load_digits_splits(limit_train=limit_train)
    return [*splits.train.tensors, *splits.val.tensors]


@pytest.mark.parametrize("limit_train", [None, 300])
def test_the_cached_split_is_scikit_learns_split(cache, limit_train):
    made, read = tensors(limit_train), tensors(limit_train)  # the first call writes the file, the second reads it
    assert len(list(cache.glob("*.npz"))) == 1
    for expected, first, second in zip(sklearn_tensors(limit_train), made, read):
        assert torch.equal(first, expected) and torch.equal(second, expected) and second.dtype == expected.dtype
    assert len(made[1]) == (300 if limit_train else 1437) and len(made[3]) == 360
    assert torch.bincount(made[3]).min() >= 35  # stratified: every class in validation


def test_a_process_that_finds_the_cache_does_not_import_scikit_learn(cache):
    tensors()  # made here
    probe = "import sys; from orchestrator.data.digits import load_digits_splits; s = load_digits_splits(); " \
            "print(len(s.train), 'sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         env={**os.environ, digits.CACHE_ENV: str(cache)})
    assert out.stdout.split() == ["1437", "False"]


def test_each_split_has_its_own_file(cache):
    cached_split(0.2, 0, None)
    cached_split(0.2, 1, None)
    cached_split(0.3, 0, 200)
    assert len(list(cache.glob("*.npz"))) == 3
    assert not np.array_equal(cached_split(0.2, 0, None)["y_val"], cached_split(0.2, 1, None)["y_val"])


class BoobyTrap:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.mark.parametrize("content", ["garbage", "truncated", "pickle", "wrong_shape", "bad_label"])
def test_a_bad_cache_file_is_made_again_and_never_unpickled(cache, tmp_path, content):
    expected = tensors()
    [path] = cache.glob("*.npz")
    marker = tmp_path / "unpickled"
    if content == "garbage":
        path.write_bytes(b"not an npz")
    elif content == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    elif content == "pickle":
        trap = np.empty(1, dtype=object)
        trap[0] = BoobyTrap(marker)
        with open(path, "wb") as handle:
            np.savez(handle, x_train=trap, y_train=trap, x_val=trap, y_val=trap)
    elif content == "wrong_shape":
        good = dict(np.load(path))
        with open(path, "wb") as handle:
            np.savez(handle, **{**good, "x_train": good["x_train"][:, :10]})
    else:  # a label no digit has: the loss would fail in every worker
        good = dict(np.load(path))
        good["y_val"][0] = 99
        with open(path, "wb") as handle:
            np.savez(handle, **good)
    for observed, wanted in zip(tensors(), expected):
        assert torch.equal(observed, wanted)
    assert not marker.exists()
    assert np.load(path, allow_pickle=False)["x_train"].shape[1] == 64  # the file was made again


def test_a_cache_folder_that_cannot_be_written_only_means_no_cache(tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("a file where the folder would be")
    monkeypatch.setenv(digits.CACHE_ENV, str(blocked / "cache"))
    for observed, wanted in zip(tensors(), sklearn_tensors()):
        assert torch.equal(observed, wanted)
