"""Per-worker memory of a planned stage: model states, activations, the process baseline, and whether they fit.

Why its own module: `orch plan` must say before anything starts whether a run fits its workers, and name the cheapest
change when it does not; the figures are computed from the config alone (no torch), and every run logs them beside
the measured peak (orchestrator.train.worker_metrics) so that the formula is checked against reality
(benchmarks/memory_plan.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from orchestrator.config.validate import ConfigError, nvidia_smi, visible_cuda_devices, worker_range
from orchestrator.models.activations import activation_elements
from orchestrator.models.sizes import count_parameters


@dataclass
class MemoryEstimate:
    """Bytes per worker: model states (ZeRO paper, Rajbhandari et al. 2020, §3, as DeepSpeed lays them out),
    activations of one micro-batch (orchestrator.models.activations) and the process's own baseline, checked
    against a budget. Offloaded states live in host RAM (cpu) or on disk (nvme) and are listed apart."""

    parameters: int
    weights: int
    gradients: int
    optimizer: int
    activations: int = 0
    buffers: int = 0  # DeepSpeed's communication buffers (ZeRO-0: every gradient flattened into one to all-reduce)
    runtime: int = 0  # what the worker process holds before any model: Python, torch, DeepSpeed, Ray (CPU only)
    offloaded: int = 0  # bytes moved off the device by trainer.offload (not in `total`)
    activations_known: bool = True  # False for a model without an activation formula (counted as 0)
    budget: Optional[int] = None  # bytes per worker; None: unknown (say so, no verdict)
    budget_source: str = ""
    suggestion: str = ""  # when it does not fit: the cheapest change that would

    @property
    def model_states(self) -> int:
        return self.weights + self.gradients + self.optimizer

    @property
    def total(self) -> int:
        return self.model_states + self.buffers + self.activations + self.runtime

    @property
    def fits(self) -> Optional[bool]:
        return None if self.budget is None else self.total <= self.budget


def estimate_memory(
    parameters: int,
    zero_stage: int,
    precision: str,
    num_workers: int,
    optimizer: str,
    offload_optimizer: str = "none",
    offload_param: str = "none",
    on_gpu: bool = False,
    reduce_bucket: int = 0,
) -> MemoryEstimate:
    """Model states per worker. Offloaded states leave the device: to host RAM (`cpu`, which saves nothing when the
    device is the CPU itself) or to NVMe. `reduce_bucket`: ZeRO-3's gradient bucket in elements (zero3_reduce_bucket;
    DeepSpeed's 5e8 when 0)."""
    mixed = precision in ("bf16", "fp16")
    weight_bytes = 2 if mixed else 4
    state_bytes = 8 if optimizer == "adamw" else 4  # Adam: m and v in fp32; SGD: momentum
    if mixed:
        state_bytes += 4  # fp32 master weights
    n = num_workers
    memory = MemoryEstimate(
        parameters=parameters,
        weights=parameters * weight_bytes // (n if zero_stage >= 3 else 1),
        gradients=parameters * weight_bytes // (n if zero_stage >= 2 else 1),
        optimizer=parameters * state_bytes // (n if zero_stage >= 1 else 1),
    )
    if zero_stage == 0 and (n > 1 or mixed):
        # the engine's all-reduce copies the gradients into flat buckets of up to 5e8 elements (measured: +0.35 GB
        # per rank for 85 M fp32 parameters); a lone fp32 rank skips it (orchestrator.train.engine.skip_lone_allreduce)
        memory.buffers = min(parameters, ALLREDUCE_BUCKET_ELEMENTS) * weight_bytes
    elif zero_stage in (1, 2):
        # DeepSpeed's ZeRO-1/2 optimizer (stage_1_and_2.py): a gradient bucket of reduce_bucket_size (5e8) elements,
        # touched up to the model's size (fp32 at ZeRO-1, the weights' type at ZeRO-2), the fp32 gradient of this
        # rank's partition, and an fp32 clone of its weights even when they already are fp32 (mixed precision counts
        # that clone in `optimizer`). Measured: 85 M fp32 parameters on 2 ranks, ZeRO-2 peaks 0.9 GB above the classic
        # formula; this adds 0.68 GB of it.
        bucket_bytes = 4 if zero_stage == 1 else weight_bytes
        memory.buffers = min(parameters, ALLREDUCE_BUCKET_ELEMENTS) * bucket_bytes + 4 * parameters // n
        if not mixed:
            memory.buffers += 4 * parameters // n
    elif zero_stage == 3:
        # DeepSpeed's ZeRO-3 optimizer (stage3.py): the gradient bucket, touched up to the model's size, and the copy
        # of it the reduce-scatter interleaves (coalesced_collectives.reduce_scatter_coalesced), both live at the end
        # of the backward pass. In fp32 the rank's weights are its fp32 master partition
        # (orchestrator.train.engine.zero3_shares_its_fp32_partition); mixed precision counts the master in `optimizer`.
        bucket = min(parameters, reduce_bucket or ALLREDUCE_BUCKET_ELEMENTS)
        memory.buffers = 2 * bucket * weight_bytes
    leaves = {"nvme"} | ({"cpu"} if on_gpu else set())
    if offload_optimizer in leaves:
        memory.offloaded += memory.optimizer
        memory.optimizer = 0
    if offload_param in leaves:
        memory.offloaded += memory.weights
        memory.weights = 0
    return memory


def zero3_settings(model: Mapping[str, Any], use_gpu: bool) -> dict[str, Any]:
    """ZeRO-3 settings that let a rank hold its partition rather than the whole model (measured, benchmarks/memory_plan.py).

    DeepSpeed's defaults are sized for billion-parameter models, and on a smaller one they undo the partitioning:
    - `stage3_max_reuse_distance` (1e9 elements): a parameter gathered for the forward pass is not released when its
      next use (the backward pass) is fewer elements away, so below ~1e9 parameters every rank keeps the whole model
      gathered from the forward to the backward pass. CPU: 0, release after each use (nothing to overlap there).
    - `stage3_prefetch_bucket_size`: on CPU (gloo, no streams, nothing to overlap) a prefetch left every parameter
      in flight at the end of the forward pass: 0. A GPU keeps a prefetch sized to the model.
    - `reduce_bucket_size` (5e8 elements): the gradient bucket fills to the model's size before it is reduced, and
      the gloo reduce-scatter copies it once more. Sized to the model as transformers' DeepSpeed integration does
      ("auto"): hidden², prefetch 0.9·hidden², persistence threshold 10·hidden.
    - `sub_group_size` (1e9 elements): the optimizer steps one sub-group of the partition at a time, and for each it
      flattens the sub-group's gradients into a new fp32 tensor and torch's AdamW makes a temporary of the same size,
      so with one sub-group the step held two more copies of the whole partition. CPU: 4·hidden² elements of the
      partition (about a transformer block's share), measured 168 MiB lower per rank on the 85 M-parameter GPT. A
      GPU keeps DeepSpeed's default (fewer, larger kernels).
    Models without a known width (`n_embd`, `hidden_size`) keep DeepSpeed's bucket defaults; the plan counts them."""
    settings: dict[str, Any] = {}
    hidden = model.get("n_embd") or model.get("hidden_size")
    if hidden:
        settings["reduce_bucket_size"] = hidden * hidden
        settings["stage3_param_persistence_threshold"] = 10 * hidden
        if use_gpu:
            settings["stage3_prefetch_bucket_size"] = int(0.9 * hidden * hidden)
    if not use_gpu:
        settings["stage3_prefetch_bucket_size"] = 0
        settings["stage3_max_reuse_distance"] = 0
        if hidden:
            settings["sub_group_size"] = 4 * hidden * hidden
    return settings


def zero3_reduce_bucket(container: Mapping[str, Any]) -> int:
    """Elements of ZeRO-3's gradient bucket for this config: the size zero3_settings gives, unless trainer.deepspeed
    sets its own."""
    trainer = container["trainer"]
    own = ((trainer.get("deepspeed") or {}).get("zero_optimization") or {}).get("reduce_bucket_size")
    sized = zero3_settings(container["model"], trainer["use_gpu"]).get("reduce_bucket_size", ALLREDUCE_BUCKET_ELEMENTS)
    return int(own if own is not None else sized)


# Resident memory of a Ray Train worker process on CPU before it builds a model (Python, torch, DeepSpeed, Ray, MLflow
# imported; gloo group up), measured by benchmarks/memory_plan.py. On a GPU `torch.cuda.max_memory_allocated` is
# compared, which holds none of it.
RUNTIME_CPU_BYTES = 600 * 2**20
ALLREDUCE_BUCKET_ELEMENTS = 500_000_000  # DeepSpeed's MEMORY_OPT_ALLREDUCE_SIZE
GIB = 2**30


def plan_memory(container: Mapping[str, Any], precision: str, budget_check: bool = True) -> MemoryEstimate:
    """Per-worker memory of a resolved config: model states for its ZeRO stage and offload, activations of one
    micro-batch (with or without activation checkpointing), the process baseline on CPU; the budget it must fit in
    and, when it does not, the cheapest change that would. A budget below the smallest plan there is raises."""
    trainer, model = container["trainer"], container["model"]
    parameters = count_parameters(model)
    memory = _memory_of(container, parameters, precision, trainer)
    memory.budget, memory.budget_source = memory_budget(container)
    if memory.budget is None or not budget_check or memory.fits:
        return memory
    changes = cheaper_plans(trainer)
    for description, overrides in changes:
        if _memory_of(container, parameters, precision, {**trainer, **overrides}).total <= memory.budget:
            memory.suggestion = description
            return memory
    smallest = _memory_of(container, parameters, precision, {**trainer, **changes[-1][1]}) if changes else memory
    if smallest.total > memory.budget:
        raise ConfigError(
            "trainer.memory_budget_gb",
            trainer.get("memory_budget_gb") or round(memory.budget / GIB, 2),
            f"smaller than the smallest plan of this model per worker ({smallest.total / 1e9:.2f} GB with "
            f"{changes[-1][0] if changes else 'this config'}); give more memory or workers, or a smaller model",
        )
    return memory


def _memory_of(container: Mapping[str, Any], parameters: int, precision: str, trainer: Mapping[str, Any]) -> MemoryEstimate:
    offload = trainer.get("offload") or {}
    memory = estimate_memory(
        parameters,
        trainer["zero_stage"],
        precision,
        worker_range(trainer["num_workers"])[0],  # elastic [MIN, MAX]: a worker holds the most with the fewest
        trainer["optimizer"]["name"],
        offload.get("optimizer", "none"),
        offload.get("param", "none"),
        on_gpu=trainer["use_gpu"],
        reduce_bucket=zero3_reduce_bucket({**container, "trainer": trainer}),
    )
    model = container["model"]
    seq_len = container["data"].get("block_size") or model.get("block_size") or 1
    elements = activation_elements(model, trainer["micro_batch_size"], seq_len, bool(trainer.get("activation_checkpointing", False)))
    memory.activations_known = elements is not None
    memory.activations = (elements or 0) * (2 if precision in ("bf16", "fp16") else 4)
    memory.runtime = 0 if trainer["use_gpu"] else RUNTIME_CPU_BYTES
    return memory


def cheaper_plans(trainer: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Changes that lower per-worker memory, cheapest first (in step time), then all of them together: a higher
    ZeRO stage (communication only), activation checkpointing (~1/3 more compute), offload to host RAM (GPU only:
    on a CPU the states stay in the same RAM), then a smaller micro-batch (changes the optimisation itself)."""
    changes: list[tuple[str, dict[str, Any]]] = []
    together: dict[str, Any] = {}
    for stage in range(trainer["zero_stage"] + 1, 4):
        changes.append((f"trainer.zero_stage={stage}", {"zero_stage": stage}))
    together["zero_stage"] = 3
    if not trainer.get("activation_checkpointing", False):
        changes.append(("trainer.activation_checkpointing=true", {"activation_checkpointing": True}))
        together["activation_checkpointing"] = True
    offload = dict(trainer.get("offload") or {"optimizer": "none", "param": "none"})
    if trainer["use_gpu"]:
        if offload.get("optimizer", "none") == "none":
            stage = max(trainer["zero_stage"], 1)
            changes.append(
                ("trainer.offload.optimizer=cpu" + (f" trainer.zero_stage={stage}" if stage != trainer["zero_stage"] else ""),
                 {"offload": {**offload, "optimizer": "cpu"}, "zero_stage": stage})
            )
        if offload.get("param", "none") == "none":
            changes.append(("trainer.offload.param=cpu trainer.zero_stage=3", {"offload": {**offload, "param": "cpu"}, "zero_stage": 3}))
        together["offload"] = {
            **offload,
            "optimizer": offload.get("optimizer") if offload.get("optimizer", "none") != "none" else "cpu",
            "param": offload.get("param") if offload.get("param", "none") != "none" else "cpu",
        }
    batch = trainer["micro_batch_size"] // 2
    while batch >= 1:
        changes.append((f"trainer.micro_batch_size={batch}", {"micro_batch_size": batch}))
        batch //= 2
    together["micro_batch_size"] = 1
    described = " ".join(
        f"trainer.{k}={str(v).lower()}" if k != "offload" else f"trainer.offload.optimizer={v['optimizer']} trainer.offload.param={v['param']}"
        for k, v in together.items()
        if k == "offload" or trainer.get(k) != v
    )
    if described:
        changes.append((described, together))
    return changes


def memory_budget(container: Mapping[str, Any]) -> tuple[Optional[int], str]:
    """Bytes one worker may use, and where that figure comes from: trainer.memory_budget_gb, else the GPU's memory
    (nvidia-smi on this machine), else this machine's RAM shared by the workers of a local cluster."""
    trainer = container["trainer"]
    if trainer.get("memory_budget_gb") is not None:
        return int(trainer["memory_budget_gb"] * 1e9), "trainer.memory_budget_gb"
    if trainer["use_gpu"]:
        memory = local_gpu_memory()
        return (memory, "GPU memory (nvidia-smi)") if memory else (None, "unknown: set trainer.memory_budget_gb")
    if container["cluster"]["kind"] != "local":
        return None, "unknown on a cluster: set trainer.memory_budget_gb"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    workers = worker_range(trainer["num_workers"])[1]  # elastic: up to MAX local workers share the RAM
    return ram // workers, f"this machine's RAM / {workers} workers"


def local_gpu_memory() -> Optional[int]:
    """The smallest visible GPU's memory in bytes (those of CUDA_VISIBLE_DEVICES when it is set, by index or UUID),
    asked of nvidia-smi; None without one."""
    visible = visible_cuda_devices()
    sizes = [
        int(memory) * 2**20
        for index, uuid, memory in (row for row in nvidia_smi("index", "uuid", "memory.total") if len(row) == 3)
        if memory.isdigit() and (visible is None or index in visible or uuid in visible)
    ]
    return min(sizes) if sizes else None
