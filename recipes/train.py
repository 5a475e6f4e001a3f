"""Recipe `train`: supervised data-parallel training of one model on one dataset with DeepSpeed.

`train_loop_per_worker` runs on every Ray Train worker, top to bottom:
  setup    data and model from config (hydra instantiate), DeepSpeed engine, restore the checkpoint Ray hands us
  loop     micro-batches → engine.backward/step; metrics every log_every, validation every eval_every
  save     DeepSpeed checkpoint reported to Ray Train every checkpoint_every and at the last step
  cleanup  flush rank 0's metrics
The driver side (MLflow run, Ray Train trainer, export) is `orchestrator.stage_runner`.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from hydra.utils import instantiate

from orchestrator.track.worker_metrics import WorkerMetrics
from orchestrator.train.data_order import ShardedBatches
from orchestrator.train.engine import build_engine, restore_latest, save_and_report
from orchestrator.train.objective import task_loss
from orchestrator.train.steps import Throughput, chaos_kill, due, evaluate, mean_across_ranks, to_engine, weights_digest


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train

    # --- setup ---
    cfg, trainer = loop_config["config"], loop_config["config"]["trainer"]
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(trainer["threads_per_worker"] or max(1, int(trainer["cpus_per_worker"])))
    torch.manual_seed(trainer["seed"])  # identical initial weights on every rank

    data = instantiate(cfg["data"])
    model = instantiate(cfg["model"])
    engine = build_engine(model, loop_config["deepspeed"], trainer["optimizer"], loop_config["precision_auto"])
    restored = restore_latest(engine)
    step = restored["step"] if restored else 0

    grad_accum, max_steps = trainer["grad_accum_steps"], trainer["max_steps"]
    batches = ShardedBatches(data.train, trainer["micro_batch_size"], rank, world_size, trainer["seed"])
    stream = batches.iterate_from(step * grad_accum)  # the exact data position of the restored step
    throughput = Throughput(trainer["micro_batch_size"] * grad_accum * world_size, start_step=step)
    metrics = WorkerMetrics(loop_config, rank=rank, resumed_at=step if restored else None)

    # --- loop ---
    while step < max_steps:
        chaos_kill(step, rank)
        step_loss = torch.zeros((), dtype=torch.float64)
        for _ in range(grad_accum):
            inputs, targets = next(stream)
            loss = task_loss(engine(to_engine(engine, inputs)), to_engine(engine, targets))
            engine.backward(loss)
            engine.step()
            step_loss += loss.detach().double().cpu()
        step += 1
        throughput.step_done(step)

        step_metrics: dict[str, float] = {}
        if due(step, trainer["log_every"], max_steps):
            step_metrics["loss"] = mean_across_ranks(step_loss / grad_accum)
            step_metrics["lr"] = float(engine.get_lr()[0])
            step_metrics.update(throughput.read())
            if data.task == "lm" and "samples_per_s" in step_metrics:
                step_metrics["tokens_per_s"] = step_metrics["samples_per_s"] * cfg["data"]["block_size"]
        if due(step, trainer["eval_every"], max_steps):
            step_metrics.update(evaluate(engine, data.val, data.task, trainer["micro_batch_size"], rank, world_size))
        if step_metrics:
            metrics.log(step_metrics, step)

        # --- save ---
        if due(step, trainer["checkpoint_every"], max_steps):
            report: dict[str, Any] = {"step": step, **step_metrics}
            if step == max_steps:
                digests: list[Optional[str]] = [None] * world_size
                dist.all_gather_object(digests, weights_digest(engine))
                report["rank_weight_digests"] = ",".join(d or "" for d in digests)
            save_and_report(engine, step, report)

    # --- cleanup ---
    metrics.close()
