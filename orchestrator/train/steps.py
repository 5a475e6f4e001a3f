"""Pieces every recipe's worker loop uses: schedules of due steps, cross-rank means, evaluation, throughput."""

from __future__ import annotations

import hashlib
import math
import os
import signal
import time
from typing import Optional

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset

from orchestrator.train.data_order import shard_for_eval
from orchestrator.train.objective import eval_metrics, eval_sums

SETTLE_STEPS = 2  # steps excluded from throughput: first-call allocations and lazy initialisation


def start_worker(trainer: dict) -> tuple[int, int]:
    """This worker's (rank, world size); torch threads and the seed set before any model is built."""
    import ray.train

    context = ray.train.get_context()
    torch.set_num_threads(trainer["threads_per_worker"] or max(1, int(trainer["cpus_per_worker"])))
    torch.manual_seed(trainer["seed"])  # identical initial weights on every rank
    return context.get_world_rank(), context.get_world_size()


def due(step: int, every: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


def to_engine(engine, tensor: torch.Tensor) -> torch.Tensor:
    """Move a batch tensor to the engine's device; floating inputs take the weights' dtype (bf16 engines)."""
    tensor = tensor.to(engine.device, non_blocking=True)
    if tensor.is_floating_point():
        return tensor.to(next(engine.module.parameters()).dtype)
    return tensor


@torch.no_grad()
def evaluate(engine, dataset, task: str, batch_size: int, rank: int, world_size: int) -> dict[str, float]:
    engine.eval()
    sums = torch.zeros(3, dtype=torch.float64)
    for inputs, targets in DataLoader(Subset(dataset, shard_for_eval(dataset, rank, world_size)), batch_size=batch_size):
        sums += eval_sums(engine(to_engine(engine, inputs)), to_engine(engine, targets)).cpu()
    dist.all_reduce(sums)
    engine.train()
    return eval_metrics(sums, task)


def weights_digest(engine) -> str:
    """A hash of this rank's full weights; ZeRO-3 gathers partitioned parameters first."""
    import deepspeed

    params = list(engine.module.parameters())
    digest = hashlib.sha256()
    with deepspeed.zero.GatheredParameters(params, enabled=getattr(params[0], "ds_id", None) is not None):
        for param in params:
            digest.update(param.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def chaos_kill(step: int, rank: int) -> None:
    """Failure injection for resilience tests: SIGKILL this worker once at a given step (real process death)."""
    spec = os.environ.get("ORCH_CHAOS_KILL")  # "<step>:<rank>:<marker file>"
    if not spec:
        return
    at_step, at_rank, marker = spec.split(":", 2)
    if step == int(at_step) and rank == int(at_rank) and not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)


class Throughput:
    """Samples/s over the steps since the last reading, starting after SETTLE_STEPS of each (re)start."""

    def __init__(self, samples_per_step: int, start_step: int) -> None:
        self.samples_per_step, self.start_step = samples_per_step, start_step
        self.window_start: Optional[float] = None
        self.window_steps = 0

    def step_done(self, step: int) -> None:
        if step - self.start_step == SETTLE_STEPS:
            self.window_start, self.window_steps = time.perf_counter(), 0
        elif self.window_start is not None:
            self.window_steps += 1

    def read(self) -> dict[str, float]:
        if self.window_start is None or not self.window_steps:
            return {}
        elapsed = time.perf_counter() - self.window_start
        reading = {"step_time_s": elapsed / self.window_steps, "samples_per_s": self.samples_per_step * self.window_steps / elapsed}
        self.window_start, self.window_steps = time.perf_counter(), 0
        return reading


class TrainingDiverged(RuntimeError):
    """The loss (or gradient norm) stopped being finite: training stops instead of saving a broken state."""

    def __init__(self, step: int) -> None:
        self.step = step
        super().__init__(
            f"the loss or gradient norm was not finite at step {step} on at least one worker; the last good "
            "checkpoint is kept. Lower trainer.optimizer.lr, enable trainer.grad_clip, or try trainer.precision=fp32"
        )


def is_finite_step(step_loss: torch.Tensor, engine) -> bool:
    grad_norm = engine.get_global_grad_norm() if hasattr(engine, "get_global_grad_norm") else None
    finite = bool(torch.isfinite(step_loss))
    if grad_norm is not None:
        finite = finite and math.isfinite(float(grad_norm))
    return finite


class StepAgreement:
    """Collective: the earliest non-finite step on any rank and the loss averaged over ranks, in one all-reduce.

    Every rank must stop at the same step, and the logged loss is the mean over ranks; both are due at log and
    checkpoint steps. On a busy machine one small gloo all-reduce costs ~2-4 ms of waiting (measured at log_every=10
    with 2 workers on 2 cores), half a small model's step, so the loop starts it at a log step and reads it after the
    next step's compute (`async_op`); at checkpoints it waits at once, since nothing is saved before every rank agrees
    the state is finite. Each rank writes its bad step (or +inf) in its own slot, so a sum gives every rank's value
    exactly (integers below 2**53 are exact in float64).
    """

    def __init__(self, step: int, local_bad_step: Optional[int], loss: Optional[torch.Tensor]) -> None:
        self.step, self.has_loss = step, loss is not None
        world_size, rank = dist.get_world_size(), dist.get_rank()
        self.values = torch.zeros(world_size + 1, dtype=torch.float64)
        self.values[rank] = math.inf if local_bad_step is None else float(local_bad_step)
        if loss is not None:
            self.values[world_size] = loss.detach().double().cpu()
        self.work = dist.all_reduce(self.values, async_op=True)

    def result(self) -> tuple[Optional[int], Optional[float]]:
        """(earliest bad step or None, mean loss or None when this step logged none); waits for the all-reduce."""
        self.work.wait()
        world_size = len(self.values) - 1
        earliest = float(self.values[:world_size].min())
        mean_loss = float(self.values[world_size]) / world_size if self.has_loss else None
        return (None if math.isinf(earliest) else int(earliest)), mean_loss
