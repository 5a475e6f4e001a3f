"""Which examples each worker sees at each micro-step: disjoint shards, reshuffled every epoch, resumable.

Neither Ray Train nor DeepSpeed saves a data loader's position. Because the order here is a pure function of
(seed, epoch, rank, world size), a restored run recomputes its position from the step count in the checkpoint and
continues with exactly the batch the interrupted run would have taken next.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class ShardedBatches:
    def __init__(self, dataset: Dataset, batch_size: int, rank: int, world_size: int, seed: int) -> None:
        # drop_last: every rank gets the same number of batches, so collectives never wait on a rank that ran dry.
        self.sampler = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.dataset, self.batch_size = dataset, batch_size
        self.batches_per_epoch = len(self.sampler) // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"the training split has {len(dataset)} examples: too few for trainer.micro_batch_size={batch_size} "  # type: ignore[arg-type]
                f"on each of {world_size} workers; lower trainer.micro_batch_size or trainer.num_workers"
            )

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        self.sampler.set_epoch(epoch)
        indices = list(self.sampler)
        return [indices[i * self.batch_size : (i + 1) * self.batch_size] for i in range(self.batches_per_epoch)]

    def iterate_from(self, micro_step: int) -> Iterator[tuple[torch.Tensor, ...]]:
        """Batches from global micro-step `micro_step` onwards, across epoch boundaries, forever."""
        epoch, offset = divmod(micro_step, self.batches_per_epoch)
        while True:
            loader = DataLoader(self.dataset, batch_sampler=self.epoch_batches(epoch)[offset:])
            yield from loader
            epoch, offset = epoch + 1, 0


def shard_for_eval(dataset: Dataset, rank: int, world_size: int) -> list[int]:
    """Strided, non-padded shard: every example evaluated exactly once across ranks (DistributedSampler pads)."""
    return list(range(rank, len(dataset), world_size))  # type: ignore[arg-type]


def example_inputs(dataset: Dataset, count: int = 2) -> torch.Tensor:
    """The inputs of the first `count` examples as one batch: identical on every rank (tracing, shape probes)."""
    return torch.stack([dataset[index][0] for index in range(count)])


def calibration_batches(dataset: Dataset, batches: int, batch_size: int) -> list[torch.Tensor]:
    """The inputs of the first `batches` batches in dataset order (map-style or streamed), unshuffled: the same on
    every rank, so calibration-based choices (wanda scores, depth pruning) agree without communication."""
    from torch.utils.data import DataLoader

    out = []
    for inputs, _ in DataLoader(dataset, batch_size=batch_size):
        if len(out) == batches:
            break
        out.append(inputs)
    return out


class StreamBatches:
    """Batches of a streamed (iterable) training set: this worker's shard, reshuffled every epoch, resumable.

    Each rank reads its own shard (`split_dataset_by_node`: whole files when their number divides the world size,
    else every rank reads all and keeps every world_size-th example). A stream has no length, so ranks may reach an
    epoch's end at different steps; each just starts its next epoch, and no rank ever runs dry. Resuming at a
    micro-step replays the stream from the start and discards that many batches: the position is exact (the order
    is a pure function of seed, epoch and rank) but costs a re-read of what was already trained on.
    """

    def __init__(self, dataset, batch_size: int, rank: int, world_size: int, seed: int) -> None:
        from datasets.distributed import split_dataset_by_node

        self.shard = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
        self.batch_size, self.seed = batch_size, seed

    def _epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.shard.set_epoch(self.seed + epoch)
        blocks: list[torch.Tensor] = []
        for example in self.shard:
            blocks.append(torch.as_tensor(example["block"]))
            if len(blocks) == self.batch_size:
                batch = torch.stack(blocks)
                yield batch[:, :-1], batch[:, 1:]
                blocks = []

    def iterate_from(self, micro_step: int) -> Iterator[tuple[torch.Tensor, ...]]:
        epoch, produced = 0, 0
        while True:
            empty = True
            for batch in self._epoch(epoch):
                empty = False
                if produced >= micro_step:
                    yield batch
                produced += 1
            if empty:
                raise ValueError(
                    f"this worker's shard of the stream holds fewer than trainer.micro_batch_size={self.batch_size} "
                    "blocks; lower the batch size or the number of workers"
                )
            epoch += 1


def training_batches(dataset, batch_size: int, rank: int, world_size: int, seed: int):
    """ShardedBatches for a map-style dataset, StreamBatches for a streamed one (`datasets.IterableDataset`)."""
    if hasattr(dataset, "__len__"):
        return ShardedBatches(dataset, batch_size, rank, world_size, seed)
    return StreamBatches(dataset, batch_size, rank, world_size, seed)
