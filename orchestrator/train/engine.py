"""DeepSpeed engine set-up and checkpoints, wired to Ray Train's checkpoint reporting.

Every rank saves (ZeRO shards live on every rank) into a local directory, marks it complete and reports it; Ray
Train merges the ranks' files into one checkpoint in run storage. A (re)started group resumes from the newest
complete checkpoint there (`orchestrator.train.checkpoints`). DeepSpeed's `client_state` carries the step, from
which the data position is recomputed.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import yaml
from torch import nn

from orchestrator import timeline
from orchestrator.artifacts.export import MODEL_SPEC_FILE
from orchestrator.train.checkpoints import (
    complete_checkpoints,
    load_first_good,
    write_marker,
)

CPU_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 (AVX512-BF16, AMX) and Arm ("bf16" in Features)


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU computes in bf16 natively. Without it PyTorch emulates bf16 matmuls, measured ~9x slower
    than fp32 on an AVX2 server (benchmarks/zero_precision.py), so precision=auto must not pick bf16 there."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return bool(flags & CPU_BF16_FLAGS)


def auto_precision_config(ds_config: dict[str, Any]) -> dict[str, Any]:
    """precision=auto, decided on the worker where the device is known: the plan's bf16 stays on Ampere-or-newer
    GPUs and CPUs with native bf16; older GPUs get fp16 with dynamic loss scaling, other CPUs fp32."""
    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return ds_config
        ds_config = {key: value for key, value in ds_config.items() if key != "bf16"}
        ds_config["fp16"] = {"enabled": True, "auto_cast": True, "loss_scale": 0, "initial_scale_power": 16}
        return ds_config
    if cpu_has_native_bf16():
        return ds_config
    return {key: value for key, value in ds_config.items() if key != "bf16"}


def engine_precision(engine) -> str:
    if engine.bfloat16_enabled():
        return "bf16"
    return "fp16" if engine.fp16_enabled() else "fp32"


def worker_deepspeed_config(loop_config: Mapping[str, Any]) -> dict[str, Any]:
    """The run's DeepSpeed config as this worker's engine will use it (precision=auto decided for its device):
    what ZeRO-3's partitioned construction (orchestrator.train.construction) must be given too."""
    ds_config = dict(loop_config["deepspeed"])
    return auto_precision_config(ds_config) if loop_config["precision_auto"] else ds_config


def build_engine(model: nn.Module, ds_config: dict[str, Any], optimizer_cfg: Mapping[str, Any], precision_auto: bool):
    import deepspeed

    if precision_auto:
        ds_config = auto_precision_config(ds_config)
    client_optimizer: Optional[torch.optim.Optimizer] = None
    if optimizer_cfg["name"] == "sgd":
        client_optimizer = torch.optim.SGD(
            model.parameters(),
            lr=optimizer_cfg["lr"],
            momentum=optimizer_cfg["momentum"],
            weight_decay=optimizer_cfg["weight_decay"],
        )
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=client_optimizer,
        model_parameters=None if client_optimizer else [p for p in model.parameters() if p.requires_grad],
        config=ds_config,
    )
    skip_lone_allreduce(engine)
    return engine


def skip_lone_allreduce(engine) -> None:
    """A single data-parallel rank in fp32 with ZeRO-0 does not reduce its gradients with itself.

    DeepSpeed still flattens every gradient, all-reduces the buffer over a group of one and copies it back: 16 % of
    a small MLP's step in a py-spy profile (1 worker, 1 thread). The result is the identity, so the reduction is
    switched off (`enable_backward_allreduce`, the engine's own switch). fp16/bf16 and ZeRO >= 1 keep it: their
    optimizers take state from that path.
    """
    if engine.dp_world_size == 1 and engine.zero_optimization_stage() == 0 and engine_precision(engine) == "fp32":
        engine.enable_backward_allreduce = False


def checkpoint_tag(step: int) -> str:
    return f"step_{step:08d}"



def save_and_report(
    engine,
    step: int,
    metrics: dict[str, Any],
    client_state: Optional[dict[str, Any]] = None,
    model_spec: Optional[dict[str, Any]] = None,
) -> None:
    """Collective: every rank must call it at the same steps (Ray Train and DeepSpeed both synchronise here).

    `model_spec` ({"model": config, "state_prefix": ...}) makes the checkpoint self-describing: the architecture
    of what it holds (which a structured-pruning stage changed) and where in the module's state the model lives.
    """
    import ray.train
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    with tempfile.TemporaryDirectory(prefix="orch-ckpt-") as local_dir:
        if rank == 0:
            timeline.mark("checkpoint_start", step=step)
        engine.save_checkpoint(local_dir, tag=checkpoint_tag(step), client_state={"step": step, **(client_state or {})})
        if model_spec is not None and rank == 0:
            (Path(local_dir) / MODEL_SPEC_FILE).write_text(yaml.safe_dump(model_spec, sort_keys=False))
        write_marker(local_dir, rank, checkpoint_tag(step))
        if rank == 0:
            timeline.mark("checkpoint_saved", step=step)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(local_dir),
            checkpoint_dir_name=f"checkpoint_{checkpoint_tag(step)}",
        )
        if rank == 0:
            timeline.mark("checkpoint_reported", step=step)


def restore_latest(engine) -> Optional[dict[str, Any]]:
    """Load the newest complete checkpoint of this run (after a failure, or `resume=`); its client state or None."""
    import ray.train
    import torch
    import torch.distributed as dist

    storage = ray.train.get_context().get_storage()
    candidates = complete_checkpoints(storage.storage_filesystem, storage.experiment_fs_path, dist.get_world_size())

    def load(directory: str) -> Optional[dict[str, Any]]:
        load_path, client_state = engine.load_checkpoint(directory)
        return client_state if load_path is not None else None

    def agree(ok: bool) -> bool:
        vote = torch.tensor([1 if ok else 0], dtype=torch.int32)
        dist.all_reduce(vote, op=dist.ReduceOp.MIN)
        return bool(vote.item())

    return load_first_good(candidates, load, agree)
