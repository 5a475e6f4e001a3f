"""Which examples each worker sees at each micro-step: disjoint shards, reshuffled every epoch, resumable.

Neither Ray Train nor DeepSpeed saves a data loader's position. Because the order here is a pure function of
(seed, epoch, rank, world size, global batch), a restored run recomputes its position from the step count in the
checkpoint and continues with exactly the samples the interrupted run would have taken next, on any world size that
keeps the global batch (a streamed dataset's shards follow the world size: its position is exact on the same one).
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset


class ShardedBatches:
    """The order is one permutation of the dataset per epoch (seed + epoch) cut into global batches; global batch i
    of an epoch is samples [i*G, (i+1)*G) of it, and each micro-step takes the next micro_batch_size x world_size of
    them, rank r every world_size-th. So the position after N optimizer steps is N*G samples whatever the world size:
    a run resumed on another number of workers (with the same global batch G) neither repeats nor skips a sample."""

    def __init__(self, dataset: Dataset, batch_size: int, rank: int, world_size: int, seed: int, grad_accum: int = 1) -> None:
        self.dataset, self.batch_size, self.rank, self.world_size, self.seed = dataset, batch_size, rank, world_size, seed
        self.grad_accum = grad_accum
        self.global_batch = batch_size * world_size * grad_accum
        # whole global batches only: every rank gets the same number of batches, so collectives never wait on a
        # rank that ran dry, and an epoch ends at the same sample whatever the world size
        self.steps_per_epoch = len(dataset) // self.global_batch  # type: ignore[arg-type]
        self.batches_per_epoch = self.steps_per_epoch * grad_accum
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"the training split has {len(dataset)} examples: too few for trainer.micro_batch_size={batch_size} "  # type: ignore[arg-type]
                f"x trainer.grad_accum_steps={grad_accum} on each of {world_size} workers; lower "
                "trainer.micro_batch_size or trainer.num_workers"
            )

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's micro-batches of one epoch, in order."""
        generator = torch.Generator()
        generator.manual_seed(self.seed + epoch)  # the permutation DistributedSampler draws: the same on every rank
        order = torch.randperm(len(self.dataset), generator=generator).tolist()  # type: ignore[arg-type]
        per_micro_step = self.batch_size * self.world_size
        return [
            order[start + self.rank : start + per_micro_step : self.world_size]
            for start in range(0, self.batches_per_epoch * per_micro_step, per_micro_step)
        ]

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


def training_batches(dataset, batch_size: int, rank: int, world_size: int, seed: int, grad_accum: int = 1):
    """ShardedBatches for a map-style dataset, StreamBatches for a streamed one (`datasets.IterableDataset`)."""
    if hasattr(dataset, "__len__"):
        return ShardedBatches(dataset, batch_size, rank, world_size, seed, grad_accum)
    return StreamBatches(dataset, batch_size, rank, world_size, seed)
