"""Baseline (b): a hand-written Ray Train + DeepSpeed script of the kind Ray's documentation shows.

TorchTrainer runs `train_loop` on N workers; each builds the model, calls deepspeed.initialize and loops over a
DataLoader with a DistributedSampler. No orchestrator code: no MLflow, no checkpoints, no validation; one
`ray.train.report` at the end. Timing events go to --timeline in the same JSON-lines format as orch's.

    python -m benchmarks.baselines.ray_deepspeed --model mlp --workers 1 --steps 300 --threads 1
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import tempfile
import time
from typing import Any

import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train.torch import TorchTrainer
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from benchmarks.baselines.workload import build_dataset, build_model, deepspeed_config, loss_fn, mark, peak_rss_bytes, write_step_times


def train_loop(config: dict[str, Any]) -> None:
    import deepspeed

    timeline = config["timeline"]
    torch.set_num_threads(config["threads"])
    torch.manual_seed(0)
    rank = ray.train.get_context().get_world_rank()
    if rank == 0:
        mark(timeline, "worker_start")
    dataset = build_dataset(config["model"], config["model_args"].get("block_size", 64))
    model = build_model(config["model"], config["model_args"])
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config["deepspeed"])
    if rank == 0:
        mark(timeline, "engine_ready")
    sampler = DistributedSampler(dataset, num_replicas=dist.get_world_size(), rank=rank, shuffle=True, seed=0)
    loader = DataLoader(dataset, batch_size=config["batch"], sampler=sampler, drop_last=True)
    dtype = next(engine.module.parameters()).dtype
    stamps: list[float] = []
    cpu_stamps: list[float] = []
    step, epoch = 0, 0
    while step < config["steps"]:
        sampler.set_epoch(epoch)
        for inputs, targets in loader:
            if inputs.is_floating_point():
                inputs = inputs.to(dtype)
            loss = loss_fn(engine(inputs), targets)
            engine.backward(loss)
            engine.step()
            step += 1
            stamps.append(time.perf_counter())
            cpu_stamps.append(time.process_time())
            if step == 1 and rank == 0:
                mark(timeline, "first_step", step=1)
            if step == config["steps"]:
                break
        epoch += 1
    mark(timeline, "peak_rss", rank=rank, bytes=peak_rss_bytes())
    if rank == 0:
        write_step_times(timeline, stamps, 1, cpu_stamps)
    ray.train.report({"loss": float(loss.detach()), "step": step})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("mlp", "gpt"), default="mlp")
    parser.add_argument("--model-args", default="{}", help="JSON keyword arguments of the model class")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--zero", type=int, default=0)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--timeline", default=os.environ.get("ORCH_TIMELINE"))
    args = parser.parse_args(argv)
    import json

    temp_dir = tempfile.mkdtemp(prefix="bench-ray-", dir="/tmp")
    # A private local Ray with its dashboard, as ray.init() gives by default (and as orch starts it), on a free port
    # and in its own temp dir so it never meets another Ray on a shared machine.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dashboard_port = probe.getsockname()[1]
    ray.init(
        address="local",
        include_dashboard=True,
        dashboard_port=dashboard_port,
        logging_level=logging.WARNING,
        _temp_dir=temp_dir,
    )
    mark(args.timeline, "ray_ready")
    storage = tempfile.mkdtemp(prefix="bench-ray-storage-")
    try:
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={
                "model": args.model,
                "model_args": json.loads(args.model_args),
                "threads": args.threads,
                "steps": args.steps,
                "batch": args.batch,
                "timeline": args.timeline,
                "deepspeed": deepspeed_config(args.batch, args.workers, args.zero, args.precision, args.steps),
            },
            scaling_config=ray.train.ScalingConfig(num_workers=args.workers, resources_per_worker={"CPU": args.cpus_per_worker}),
            run_config=ray.train.RunConfig(
                storage_path=storage,
                worker_runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}},
            ),
        )
        mark(args.timeline, "fit_start")
        result = trainer.fit()
        print(json.dumps(result.metrics))
    finally:
        ray.shutdown()
        for directory in (temp_dir, storage):
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
