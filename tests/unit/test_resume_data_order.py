"""The data position is a global sample position: resumed on another world size (same global batch), the rest of
the epoch is exactly the samples the first layout had not yet seen."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils.data import TensorDataset

from orchestrator.train.data_order import ShardedBatches


def seen(world_size: int, micro_batch_size: int, grad_accum: int, from_step: int, to_step: int) -> list[int]:
    """Sample ids every rank takes from optimizer step `from_step` up to `to_step`, all ranks together."""
    dataset = TensorDataset(torch.arange(100), torch.arange(100))
    samples: list[int] = []
    for rank in range(world_size):
        batches = ShardedBatches(dataset, micro_batch_size, rank, world_size, seed=7, grad_accum=grad_accum)
        stream = batches.iterate_from(from_step * grad_accum)
        for inputs, _ in itertools.islice(stream, (to_step - from_step) * grad_accum):
            samples.extend(inputs.tolist())
    return samples


@pytest.mark.parametrize(
    "before, after",
    [((1, 4, 4), (2, 4, 2)), ((2, 4, 2), (1, 8, 2)), ((4, 2, 2), (2, 4, 2)), ((2, 8, 1), (4, 2, 2))],
    ids=["1->2", "2->1", "4->2", "2->4"],
)
def test_a_resumed_epoch_on_another_world_size_sees_every_sample_once(before, after):
    # global batch 16: 6 optimizer steps per epoch of 100 samples; the resize comes after step 2 of epoch 1
    resumed_at, epoch_end = 8, 12
    first = seen(*before, from_step=6, to_step=resumed_at)
    rest = seen(*after, from_step=resumed_at, to_step=epoch_end)
    uninterrupted = seen(*before, from_step=6, to_step=epoch_end)
    assert len(first) + len(rest) == 6 * 16
    assert not set(first) & set(rest), "a sample was seen twice"
    assert sorted(first + rest) == sorted(uninterrupted), "a sample was skipped"
    assert len(set(uninterrupted)) == len(uninterrupted)
