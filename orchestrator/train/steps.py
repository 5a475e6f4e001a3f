"""Pieces every recipe's worker loop uses: schedules of due steps, cross-rank means, evaluation, throughput."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset

from orchestrator import timeline
from orchestrator.train.collectives import collective_device
from orchestrator.train.data_order import example_inputs, shard_for_eval
from orchestrator.train.objective import eval_metrics, eval_sums

SETTLE_STEPS = 2  # steps excluded from throughput: first-call allocations and lazy initialisation


def start_worker(loop_config: dict) -> tuple[int, int]:
    """This worker's (rank, world size); torch threads and the seed set before any model is built. Rank 0, the one
    that writes to MLflow, starts connecting to it now, in the background (see `connect_in_background`)."""
    import ray.train

    from orchestrator.train.worker_metrics import (
        connect_in_background,
        send_warnings_to_driver,
    )

    trainer = loop_config["config"]["trainer"]
    context = ray.train.get_context()
    torch.set_num_threads(trainer["threads_per_worker"] or max(1, int(trainer["cpus_per_worker"])))
    torch.manual_seed(trainer["seed"])  # identical initial weights on every rank
    rank = context.get_world_rank()
    if isinstance(trainer["num_workers"], (list, tuple)):
        _keep_elastic_global_batch(loop_config, context.get_world_size())
    if rank == 0:
        timeline.mark("worker_start")
        connect_in_background(loop_config["tracking"]["uri"])
        if loop_config.get("progress") is not None:
            send_warnings_to_driver(loop_config["progress"])
    return rank, context.get_world_size()


def _keep_elastic_global_batch(loop_config: dict, world_size: int) -> None:
    """An elastic group of `world_size` workers accumulates what makes the run's global batch (this worker's copy
    of the loop config: the data order and DeepSpeed's engine both read it)."""
    trainer = loop_config["config"]["trainer"]
    global_batch = loop_config["deepspeed"]["train_batch_size"]  # the plan's: MAX x micro x accumulation
    grad_accum = global_batch // (world_size * trainer["micro_batch_size"])  # validated to divide
    trainer["grad_accum_steps"] = grad_accum
    loop_config["deepspeed"] = {**loop_config["deepspeed"], "gradient_accumulation_steps": grad_accum,
                                "train_batch_size": global_batch}


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
    """Every example once across ranks (collective). Under ZeRO-3 each forward gathers the weights from all ranks, so
    a rank whose shard has fewer batches runs as many forwards as rank 0 (whose shard is the largest) on a throwaway
    batch: otherwise its all-reduce of the sums would meet rank 0's gathers (a hang, or corrupted sums)."""
    engine.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=collective_device())
    batches = 0
    for inputs, targets in DataLoader(Subset(dataset, shard_for_eval(dataset, rank, world_size)), batch_size=batch_size):
        sums += eval_sums(engine(to_engine(engine, inputs)), to_engine(engine, targets)).to(sums.device)
        batches += 1
    if engine.zero_optimization_stage() == 3:
        for _ in range(eval_batches_of_rank0(len(dataset), world_size, batch_size) - batches):
            engine(to_engine(engine, example_inputs(dataset, count=1)))
    dist.all_reduce(sums)
    engine.train()
    return eval_metrics(sums.cpu(), task)


def eval_batches_of_rank0(examples: int, world_size: int, batch_size: int) -> int:
    """The most evaluation batches any rank runs: rank 0's strided shard holds ceil(examples / world_size)."""
    return math.ceil(math.ceil(examples / world_size) / batch_size)


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
    """Whether this step's loss and gradient norm are finite, as the engine reports them."""
    grad_norm = engine.get_global_grad_norm() if hasattr(engine, "get_global_grad_norm") else None
    overflow_skipped = hasattr(engine, "fp16_enabled") and engine.fp16_enabled() and not engine.was_step_applied()
    return step_is_finite(float(step_loss), None if grad_norm is None else float(grad_norm), overflow_skipped)


def step_is_finite(loss: float, grad_norm: Optional[float], overflow_skipped: bool) -> bool:
    """fp16's dynamic loss scaling overflows by design (at its first steps, and each time it probes a larger scale):
    DeepSpeed then skips the step, lowers the scale and reports an infinite gradient norm. Such a step is not a
    divergence; a non-finite loss always is (the loss is computed in fp32)."""
    if not math.isfinite(loss):
        return False
    return grad_norm is None or overflow_skipped or math.isfinite(grad_norm)


AGREE_EVERY_S = 1.0  # ranks agree (divergence, mean loss) at log steps at most about this often; see Agreements


@dataclass
class Agreed:
    diverged_at: Optional[int]  # the earliest step at which any rank saw a non-finite loss or gradient norm
    losses: dict[int, float]  # log step -> its loss averaged over ranks
    next_step: int  # the ranks agree again at the first log step from this one on (rank 0's proposal)


class StepAgreement:
    """One collective: the earliest non-finite step on any rank, the losses of the log steps since the last agreement
    averaged over ranks, and rank 0's proposal of when to agree next, in a single asynchronous all-reduce.

    Each rank writes its bad step (or +inf) in its own slot, so a sum gives every rank's value exactly (integers
    below 2**53 are exact in float64); only rank 0 writes the proposal, so the sum is rank 0's value on every rank.
    """

    def __init__(self, losses: list[tuple[int, torch.Tensor]], local_bad_step: Optional[int], proposal: int) -> None:
        world_size, rank = dist.get_world_size(), dist.get_rank()
        self.world_size, self.steps = world_size, [step for step, _ in losses]
        values = torch.zeros(world_size + 1 + len(losses), dtype=torch.float64)
        values[rank] = math.inf if local_bad_step is None else float(local_bad_step)
        values[world_size] = float(proposal) if rank == 0 else 0.0
        for slot, (_, loss) in enumerate(losses, start=world_size + 1):
            values[slot] = loss.detach().double().cpu()
        self.values = values.to(collective_device())
        self.work = dist.all_reduce(self.values, async_op=True)

    def result(self) -> Agreed:
        """Waits for the all-reduce."""
        self.work.wait()
        world_size = self.world_size
        values = self.values.cpu()
        earliest = float(values[:world_size].min())
        means = (values[world_size + 1 :] / world_size).tolist()
        return Agreed(
            diverged_at=None if math.isinf(earliest) else int(earliest),
            losses=dict(zip(self.steps, means)),
            next_step=int(values[world_size]),
        )


class Agreements:
    """When the ranks agree, and the losses of the log steps waiting for it.

    Every rank must stop at the same step when any of them diverges, and the logged loss is the mean over ranks;
    both take a collective. One small gloo all-reduce costs 0.3-1.7 ms of waiting on 2 busy cores even when started
    asynchronously (tracking benchmark, 2 workers: a log step cost 0.3-1.7 ms with it, 0.03-0.3 ms without), which at
    log_every=10 was ~1.8 % of a small model's step. So the ranks agree at a log step at most about every
    `every_s` seconds, carrying every loss logged since the last agreement; models whose steps take longer than
    that agree at every log step. The cadence must be the same on every rank, so rank 0 proposes the next
    agreement step from its own step time, inside the agreement itself. Agreements are started at a step and read
    after the next step's compute; at checkpoints they are read at once (nothing is saved before every rank agrees
    the state is finite). A rank's divergence therefore stops training within about `every_s` seconds.
    """

    def __init__(self, rank: int, every_s: float = AGREE_EVERY_S) -> None:
        self.rank, self.every_s = rank, every_s
        self.pending: list[tuple[int, torch.Tensor]] = []
        self.in_flight: Optional[StepAgreement] = None
        self.next_step = 0  # the first log step agrees; each agreement then sets the next
        self.last_start: Optional[tuple[int, float]] = None

    def add_loss(self, step: int, loss: torch.Tensor) -> None:
        self.pending.append((step, loss))

    def due(self, step: int) -> bool:
        return self.in_flight is None and step >= self.next_step

    def start(self, step: int, local_bad_step: Optional[int]) -> None:
        if self.in_flight is not None:
            raise RuntimeError("an agreement is still in flight: collect() it before starting the next")
        now, proposal = time.perf_counter(), step + 1
        if self.last_start is not None and step > self.last_start[0]:
            step_time = (now - self.last_start[1]) / (step - self.last_start[0])
            proposal = step + max(1, math.ceil(self.every_s / step_time)) if step_time > 0 else step + 1
        self.last_start = (step, now)
        self.in_flight = StepAgreement(self.pending, local_bad_step, proposal)
        self.pending = []

    def collect(self) -> Optional[Agreed]:
        """The agreement in flight, waited for; None when there is none."""
        if self.in_flight is None:
            return None
        agreed, self.in_flight = self.in_flight.result(), None
        self.next_step = agreed.next_step
        return agreed
