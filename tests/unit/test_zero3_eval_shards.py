"""ZeRO-3 evaluation with shards of unequal batch counts: two real processes, a real gloo group, real ZeRO-3 engines.

Each forward of a ZeRO-3 engine gathers the weights from every rank. With 5 examples, 2 ranks and batches of 2, rank
0's shard has 2 batches and rank 1's one: unless rank 1 runs a second (throwaway) forward, its all-reduce of the
sums meets rank 0's gathers."""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import TensorDataset

from orchestrator.train.steps import eval_batches_of_rank0

EXAMPLES, BATCH = 5, 2


def data() -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(EXAMPLES, 6, generator=generator), torch.arange(EXAMPLES) % 3)


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def evaluate_on_rank(rank: int, port: int, out: str) -> None:
    import deepspeed

    from orchestrator.train.engine import skip_shm_allreduce_build
    from orchestrator.train.steps import evaluate

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    skip_shm_allreduce_build()
    deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=60))  # a mismatch fails, never hangs
    config = {
        "train_micro_batch_size_per_gpu": BATCH,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        # every parameter partitioned and gathered for each forward (a tiny model would otherwise stay whole)
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    }
    net = model()
    engine, *_ = deepspeed.initialize(model=net, model_parameters=list(net.parameters()), config=config)
    metrics = evaluate(engine, data(), "classification", BATCH, rank, 2)
    Path(out, f"rank{rank}.json").write_text(json.dumps(metrics))
    # both ranks leave the group together: a process exiting with the group's threads still running was seen to
    # abort in C++ at exit ("terminate called without an active exception") once in a loaded full-suite run
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


def test_every_rank_runs_rank0s_number_of_forwards_under_zero3(tmp_path):
    from orchestrator.launch.ray_session import free_port
    from orchestrator.train.objective import evaluate_module

    assert eval_batches_of_rank0(EXAMPLES, 2, BATCH) == 2  # rank 1's shard (2 examples) is one batch
    mp.spawn(evaluate_on_rank, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    metrics = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    expected = evaluate_module(model(), data(), "classification", BATCH)  # the same weights in one process
    assert metrics[0] == metrics[1]
    assert abs(metrics[0]["val_loss"] - expected["val_loss"]) < 1e-5
    assert metrics[0]["val_accuracy"] == expected["val_accuracy"]


def test_rank0_holds_the_most_batches():
    from orchestrator.train.data_order import shard_for_eval

    for examples in range(0, 40):
        for world in (1, 2, 3, 4):
            for batch in (1, 2, 3, 8):
                sizes = [len(shard_for_eval(range(examples), rank, world)) for rank in range(world)]
                assert eval_batches_of_rank0(examples, world, batch) == max(-(-size // batch) for size in sizes)
