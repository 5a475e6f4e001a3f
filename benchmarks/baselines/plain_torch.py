"""Baseline (c): one process, a plain PyTorch training loop: no Ray, no DeepSpeed, no tracking.

The same model, data, batch size, optimizer (torch AdamW, the one orch's DeepSpeed config selects with torch_adam),
gradient clipping at 1.0 and torch thread count as the other two ways; fp32 only (bf16 in DeepSpeed also keeps fp32
master weights, which a plain loop would have to re-implement to be comparable).

    python -m benchmarks.baselines.plain_torch --model mlp --steps 300 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from torch.utils.data import DataLoader, RandomSampler

from benchmarks.baselines.workload import LR, build_dataset, build_model, loss_fn, mark, peak_rss_bytes, write_step_times


def train(model_name: str, model_args: dict, steps: int, batch: int, threads: int, timeline: str | None) -> float:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    mark(timeline, "worker_start")
    dataset = build_dataset(model_name, model_args.get("block_size", 64))
    model = build_model(model_name, model_args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    loader = DataLoader(dataset, batch_size=batch, sampler=RandomSampler(dataset), drop_last=True)
    mark(timeline, "engine_ready")
    stamps: list[float] = []
    cpu_stamps: list[float] = []
    step = 0
    while step < steps:
        for inputs, targets in loader:
            loss = loss_fn(model(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            stamps.append(time.perf_counter())
            cpu_stamps.append(time.process_time())
            if step == 1:
                mark(timeline, "first_step", step=1)
            if step == steps:
                break
    mark(timeline, "peak_rss", rank=0, bytes=peak_rss_bytes())
    write_step_times(timeline, stamps, 1, cpu_stamps)
    return float(loss.detach())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("mlp", "gpt"), default="mlp")
    parser.add_argument("--model-args", default="{}", help="JSON keyword arguments of the model class")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--timeline", default=os.environ.get("ORCH_TIMELINE"))
    args = parser.parse_args(argv)
    loss = train(args.model, json.loads(args.model_args), args.steps, args.batch, args.threads, args.timeline)
    print(json.dumps({"loss": loss}))


if __name__ == "__main__":
    main()
