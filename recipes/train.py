"""Recipe `train`: supervised data-parallel training of one model on one dataset with DeepSpeed.

`train_loop_per_worker` runs on every Ray Train worker, top to bottom:
  setup    data and model from config (hydra instantiate; under ZeRO-3 inside deepspeed.zero.Init, so no rank
           holds the whole model), DeepSpeed engine, the optional pruning hook
  fit      restore the checkpoint Ray hands us → micro-batches → engine.backward/step → hooks; metrics every
           log_every, validation every eval_every; a DeepSpeed checkpoint reported to Ray Train every
           checkpoint_every and at the last step; flush rank 0's metrics
`fit` is the loop every training recipe shares (prune and distill call it with their own objective and hooks).
The driver side (MLflow run, Ray Train trainer, export) is `orchestrator.stage_runner`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import torch
import torch.distributed as dist
from hydra.utils import instantiate
from torch import Tensor
from torch.utils.data import Dataset

from orchestrator import timeline
from orchestrator.compress import StepEndHook
from orchestrator.train.callbacks import build_callbacks
from orchestrator.train.compression import pruning_hook
from orchestrator.train.construction import build_model
from orchestrator.train.data_order import training_batches
from orchestrator.train.engine import (
    build_engine,
    engine_precision,
    restore_latest,
    save_and_report,
    worker_deepspeed_config,
)
from orchestrator.train.mfu import flops_per_sample, mfu, peak_flops_for
from orchestrator.train.objective import task_loss
from orchestrator.train.preemption import Preempted, StopAgreement, install_sigterm_flag
from orchestrator.train.samples import generate_samples
from orchestrator.train.steps import (
    Agreements,
    Throughput,
    due,
    evaluate,
    is_finite_step,
    start_worker,
    to_engine,
)
from orchestrator.train.worker_metrics import WorkerMetrics

# (inputs, targets) as the data loader yields them [, a batch of unlabelled inputs when fit has `unlabelled`] -> loss
Objective = Callable[..., Tensor]


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    cfg, trainer = loop_config["config"], loop_config["config"]["trainer"]
    rank, _ = start_worker(loop_config)
    data = instantiate(cfg["data"])
    ds_config = worker_deepspeed_config(loop_config)
    model = build_model(cfg["model"], ds_config, trainer["activation_checkpointing"])  # ZeRO-3: built partitioned
    engine = build_engine(model, ds_config, trainer["optimizer"], precision_auto=False)
    if rank == 0:
        timeline.mark("engine_ready")
    hook = pruning_hook(engine.module, cfg["recipe"]["pruning"], trainer["max_steps"], engine.optimizer)
    fit(engine, data, loop_config, hooks={"sparsity": hook} if hook else {})


def fit(
    engine,
    data,
    loop_config: dict[str, Any],
    objective: Optional[Objective] = None,
    hooks: Optional[Mapping[str, StepEndHook]] = None,
    model_spec: Optional[dict[str, Any]] = None,
    unlabelled: Optional[Dataset] = None,
) -> None:
    """Train `engine` to trainer.max_steps. `hooks` run after every optimizer step and are checkpointed; a value a
    hook returns is logged under its name. `model_spec` (default: the config's model) is stored in checkpoints.
    `unlabelled`: a second training set (a distillation transfer set) whose inputs reach the objective as a third
    argument, batch for batch with the labelled stream, sharded and resumed the same way."""
    cfg, trainer = loop_config["config"], loop_config["config"]["trainer"]
    rank, world_size = dist.get_rank(), dist.get_world_size()
    hooks = dict(hooks or {})
    callbacks = build_callbacks(trainer.get("callbacks") or [])
    model_spec = model_spec or {"model": cfg["model"], "state_prefix": ""}
    if objective is None:

        def objective(inputs: Tensor, targets: Tensor) -> Tensor:
            return task_loss(engine(to_engine(engine, inputs)), to_engine(engine, targets))

    # --- restore ---
    restored = restore_latest(engine, loop_config.get("attempt", 0))
    step = restored["step"] if restored else 0
    for name, hook in hooks.items():
        if restored:  # after load_checkpoint: masks are re-applied to the restored weights and optimizer state
            hook.load_state_dict(restored["hooks"][name])

    grad_accum, max_steps = trainer["grad_accum_steps"], trainer["max_steps"]
    batches = training_batches(data.train, trainer["micro_batch_size"], rank, world_size, trainer["seed"], grad_accum)
    stream = batches.iterate_from(step * grad_accum)  # the exact data position of the restored step, on any world size
    side = None
    if unlabelled is not None:  # its own order (seed + 1), its position also recomputed from the step
        side = training_batches(unlabelled, trainer["micro_batch_size"], rank, world_size, trainer["seed"] + 1, grad_accum)
        side = side.iterate_from(step * grad_accum)
    throughput = Throughput(trainer["micro_batch_size"] * grad_accum * world_size, start_step=step)
    metrics = WorkerMetrics(loop_config, rank=rank, resumed_at=step if restored else None)
    metrics.set_tag("orch.precision", engine_precision(engine))  # what precision=auto became on this device
    metrics.log({"orch.world_size": world_size}, step)  # at each (re)start: an elastic group may come back smaller
    clock = timeline.StepClock(rank)
    peak = peak_flops_for(torch.cuda.get_device_name(), trainer.get("peak_tflops")) if torch.device(engine.device).type == "cuda" else None
    sample_flops = flops_per_sample(engine.module, cfg["data"].get("block_size", 1) if data.task == "lm" else 1)

    for callback in callbacks:
        callback.on_fit_start(engine, rank, world_size)
    install_sigterm_flag()  # a SIGTERM (preemption) now saves the step it arrives in, on every rank, then stops
    stop, stopped_at = StopAgreement(), None

    # --- loop ---
    bad_step: Optional[int] = None  # this rank's first step with a non-finite loss or gradient norm
    agreements = Agreements(rank)  # divergence and mean loss across ranks, batched over log steps
    while step < max_steps:
        for callback in callbacks:
            callback.on_step_start(step)
        step_loss = torch.zeros((), dtype=torch.float64)
        for _ in range(grad_accum):
            inputs, targets = next(stream)
            loss = objective(inputs, targets) if side is None else objective(inputs, targets, next(side)[0])
            engine.backward(loss)
            engine.step()
            step_loss += loss.detach().double().cpu()
        step += 1
        clock.tick(step)
        throughput.step_done(step)
        if bad_step is None and not is_finite_step(step_loss, engine):
            bad_step = step
        step_metrics: dict[str, float] = {}
        if not settle(agreements, metrics, step, step_metrics):  # the one started earlier, read after this compute
            break
        preempted = stop.agreed()
        log_due = due(step, trainer["log_every"], max_steps)
        save_due = due(step, trainer["checkpoint_every"], max_steps) or preempted
        if log_due:
            agreements.add_loss(step, step_loss / grad_accum)
        if save_due or (log_due and agreements.due(step)):
            agreements.start(step, bad_step)
            # nothing is saved (or logged from a broken state) before every rank agrees
            if save_due and not settle(agreements, metrics, step, step_metrics):
                break
        for name, hook in hooks.items():
            changed = hook.on_step_end(step)
            if changed is not None:
                step_metrics[name] = changed

        if log_due:
            step_metrics["lr"] = float(engine.get_lr()[0])
            step_metrics.update(throughput.read())
            if data.task == "lm" and "samples_per_s" in step_metrics:
                step_metrics["tokens_per_s"] = step_metrics["samples_per_s"] * cfg["data"]["block_size"]
            if peak and "samples_per_s" in step_metrics:
                step_metrics["mfu"] = mfu(step_metrics["samples_per_s"], sample_flops, world_size, peak)
        if due(step, trainer["eval_every"], max_steps):
            step_metrics.update(evaluate(engine, data.val, data.task, trainer["micro_batch_size"], rank, world_size))
            if getattr(data, "codec", None) is not None:  # language models: what it writes, from a fixed prompt
                metrics.log_text(generate_samples(engine, data.codec, data.block_size), f"samples/step_{step:06d}.txt")
        if step_metrics:
            metrics.log(step_metrics, step)

        # --- save ---
        if save_due:
            report: dict[str, Any] = {"step": step, **step_metrics}
            for callback in callbacks:
                callback.on_checkpoint(step, step == max_steps, report)
            hook_states = {name: hook.state_dict() for name, hook in hooks.items()}
            metrics.flush(wait=True)
            if not save_and_report(engine, step, report, client_state={"hooks": hook_states}, model_spec=model_spec):
                metrics.diverged(step)  # non-finite weights on some rank: no checkpoint of them, the run fails here
                break
        if preempted:
            metrics.set_tag("orch.preempted_at_step", str(step))
            stopped_at = step
            break

    # --- cleanup ---
    clock.close()
    metrics.log_memory(cfg, engine_precision(engine), torch.device(engine.device).type, step)
    metrics.close()
    stop.close()  # collective: no rank ends the group (raising Preempted) while rank 0 still writes to MLflow
    if rank == 0:
        timeline.mark("worker_end")
    if stopped_at is not None:
        raise Preempted(stopped_at)


def settle(agreements: Agreements, metrics: WorkerMetrics, step: int, step_metrics: dict[str, float]) -> bool:
    """Read the agreement in flight, if any. False once the driver has been told that a rank diverged (every rank
    gets the same answer, so all leave the loop at the same step); else the agreed losses are logged at their
    steps, this step's into `step_metrics` (logged with them, and reported with a checkpoint)."""
    agreed = agreements.collect()
    if agreed is None:
        return True
    if agreed.diverged_at is not None:
        metrics.diverged(agreed.diverged_at)
        return False
    for logged_at, loss in agreed.losses.items():
        if logged_at == step:
            step_metrics["loss"] = loss
        else:
            metrics.log({"loss": loss}, logged_at)
    return True
