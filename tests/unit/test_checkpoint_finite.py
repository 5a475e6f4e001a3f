"""No checkpoint of non-finite weights: the check save_and_report makes before writing anything."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from orchestrator.train.engine import weights_finite


def test_a_single_non_finite_weight_fails_the_check():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    assert weights_finite(SimpleNamespace(module=model))
    with torch.no_grad():
        model[1].weight[0, 3] = float("inf")
    assert not weights_finite(SimpleNamespace(module=model))


def test_under_zero3_the_local_partition_is_what_is_checked():
    model = nn.Linear(4, 4)
    with torch.no_grad():
        model.weight.zero_()  # ZeRO-3 leaves an empty placeholder here; the rank's values live in ds_tensor
    model.weight.ds_tensor = torch.tensor([1.0, float("nan")])
    assert not weights_finite(SimpleNamespace(module=model))
