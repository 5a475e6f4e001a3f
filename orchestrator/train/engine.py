"""DeepSpeed engine set-up and checkpoints, wired to Ray Train's checkpoint reporting.

Every rank saves (ZeRO shards live on every rank) into a local directory and reports it; Ray Train merges the
ranks' files into one checkpoint in run storage, and each rank then marks its part complete there. A (re)started
group resumes from the newest complete checkpoint of any attempt of the run (`orchestrator.train.checkpoints`). DeepSpeed's `client_state` carries the step, from
which the data position is recomputed.
"""

from __future__ import annotations

import json
import logging
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import torch
import yaml
from torch import nn

from orchestrator import timeline
from orchestrator.artifacts.export import MODEL_SPEC_FILE
from orchestrator.train.checkpoints import (
    REPORT_FILE,
    Candidate,
    Layout,
    check_resumable,
    complete_checkpoints,
    convert_to_universal,
    load_first_good,
    local_files,
    needs_universal,
    numbers_of,
    write_marker,
)
from orchestrator.train.collectives import collective_device

logger = logging.getLogger(__name__)

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


SHM_ALLREDUCE_OP = "deepspeed_shm_comm"


def skip_shm_allreduce_build() -> None:
    """Keep DeepSpeed from compiling its shared-memory all-reduce, which training never calls.

    DeepSpeed's communication backend JIT-compiles `deepspeed_shm_comm` (C++, OpenMP) whenever it starts on a CPU
    machine: 40-130 s on 2 cores for each Python environment, and again each time another environment on the machine
    compiled it into the shared torch_extensions cache (its build file holds the environment's paths). Only DeepSpeed's
    `inference_all_reduce` (its inference engine's tensor parallelism) uses it; a training engine's collectives go
    through torch.distributed. DeepSpeed consults its table of compatible ops before building one: marked not
    compatible there, the op is not built and the backend goes without it. Call before DeepSpeed's first
    `init_distributed` (that of `deepspeed.initialize` or `zero.Init`) in the process."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[SHM_ALLREDUCE_OP] = False


def build_engine(model: nn.Module, ds_config: dict[str, Any], optimizer_cfg: Mapping[str, Any], precision_auto: bool):
    import deepspeed

    skip_shm_allreduce_build()
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
    with zero3_shares_its_fp32_partition():
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=client_optimizer,
            model_parameters=None if client_optimizer else [p for p in model.parameters() if p.requires_grad],
            config=ds_config,
        )
    skip_lone_allreduce(engine)
    return engine


@contextmanager
def zero3_shares_its_fp32_partition() -> Iterator[None]:
    """ZeRO-3 in fp32 uses a rank's partition of the weights as its fp32 master partition, without a clone.

    DeepSpeed 0.19.8's stage-3 optimizer means to skip the clone when the partition already has the master dtype and
    device (`_create_fp32_partitions`, the branch written for torch autocast), but compares the tensor's
    `torch.device` with the accelerator's device *name*, a str, which is never equal: every fp32 rank kept a second
    copy of its partition (162 MiB per rank for an 85 M-parameter GPT on 2 ranks, benchmarks/memory_plan.py). For
    the length of the optimizer's construction the name is given as a `torch.device`, so DeepSpeed's own check
    decides; mixed precision (other dtype) and offload (their branches come first) are unchanged.
    tests/unit/test_numerical_equivalence.py checks the sharing, and the losses against ZeRO-0; test_lone_allreduce.py
    fails when DeepSpeed's comparison no longer needs this."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3

    original = Stage3._create_fp32_partitions

    def create_fp32_partitions(self) -> None:
        name = self.device
        if type(name) is str:
            self.device = torch.device(name)
        try:
            original(self)
        finally:
            self.device = name

    Stage3._create_fp32_partitions = create_fp32_partitions
    try:
        yield
    finally:
        Stage3._create_fp32_partitions = original


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



def checkpoint_layout(engine) -> Layout:
    """What a checkpoint of this engine is: recorded in its markers, compared on resume."""
    import torch.distributed as dist

    return Layout(
        world_size=dist.get_world_size() if dist.is_initialized() else 1,
        zero_stage=engine.zero_optimization_stage(),
        micro_batch_size=engine.train_micro_batch_size_per_gpu(),
        grad_accum_steps=engine.gradient_accumulation_steps(),
    )


def weights_finite(engine) -> bool:
    """Whether every rank's weights are finite (collective). Under ZeRO-3 a rank holds its partition only."""
    import torch.distributed as dist

    bad = torch.zeros(1, dtype=torch.int32, device=collective_device())
    for parameter in engine.module.parameters():
        local = getattr(parameter, "ds_tensor", parameter)
        if not bool(torch.isfinite(local.detach()).all()):
            bad.fill_(1)
            break
    if dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not bool(bad.item())


def save_and_report(
    engine,
    step: int,
    metrics: dict[str, Any],
    client_state: Optional[dict[str, Any]] = None,
    model_spec: Optional[dict[str, Any]] = None,
) -> bool:
    """Collective: every rank must call it at the same steps (Ray Train and DeepSpeed both synchronise here).
    False, with nothing saved or reported on any rank, when some rank's weights are not finite: a checkpoint of a
    broken state would be resumed from.

    `model_spec` ({"model": config, "state_prefix": ...}) makes the checkpoint self-describing: the architecture
    of what it holds (which a structured-pruning stage changed) and where in the module's state the model lives.
    """
    import ray.train
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    if not weights_finite(engine):
        return False
    tag = checkpoint_tag(step)
    dir_name = f"checkpoint_{tag}"
    with tempfile.TemporaryDirectory(prefix="orch-ckpt-") as local_dir:
        if rank == 0:
            timeline.mark("checkpoint_start", step=step)
        engine.save_checkpoint(local_dir, tag=tag, client_state={"step": step, **(client_state or {})})
        if model_spec is not None and rank == 0:
            (Path(local_dir) / MODEL_SPEC_FILE).write_text(yaml.safe_dump(model_spec, sort_keys=False))
        if rank == 0:
            (Path(local_dir) / REPORT_FILE).write_text(json.dumps(numbers_of(metrics), sort_keys=True))
        files = local_files(local_dir)
        if rank == 0:
            timeline.mark("checkpoint_saved", step=step)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(local_dir), checkpoint_dir_name=dir_name)
    # report uploads synchronously (Ray's default CheckpointUploadMode.SYNC): the files are in storage now, and the
    # marker that makes them count goes there after them
    storage = ray.train.get_context().get_storage()
    write_marker(storage.storage_filesystem, f"{storage.experiment_fs_path}/{dir_name}", rank, tag, checkpoint_layout(engine), files)
    if rank == 0:
        timeline.mark("checkpoint_reported", step=step)
    return True


@contextmanager
def universal_loading(engine) -> Iterator[None]:
    """DeepSpeed reads `checkpoint.load_universal` from its parsed config at load time (0.19.8 has no argument for
    it): switched on for one load of a converted checkpoint, so later loads of native checkpoints stay native."""
    previous = engine._config.load_universal_checkpoint
    engine._config.load_universal_checkpoint = True
    try:
        yield
    finally:
        engine._config.load_universal_checkpoint = previous


def restore_latest(engine, attempt: int = 0) -> Optional[dict[str, Any]]:
    """Load the newest complete checkpoint of any attempt of this run (after a failure, or `resume=`); its client
    state or None. `attempt` N > 0: this attempt writes into `resume-N` inside the run's folder (stage_runner).

    A checkpoint of another world size (or ZeRO stage >= 1) is loaded through its universal conversion, made once by
    rank 0; the others wait for its vote."""
    import ray.train
    import torch.distributed as dist

    storage = ray.train.get_context().get_storage()
    run_path = storage.storage_fs_path if attempt else storage.experiment_fs_path
    now = checkpoint_layout(engine)
    candidates = complete_checkpoints(storage.storage_filesystem, run_path, now.world_size)

    def agree(ok: bool) -> bool:
        vote = torch.tensor([1 if ok else 0], dtype=torch.int32, device=collective_device())
        dist.all_reduce(vote, op=dist.ReduceOp.MIN)
        return bool(vote.item())

    def load(candidate: Candidate) -> Optional[dict[str, Any]]:
        if candidate.layout is not None:
            check_resumable(candidate.layout, now.world_size, now.zero_stage, now.micro_batch_size, now.grad_accum_steps)
        if not needs_universal(candidate.layout, now.world_size, now.zero_stage):
            with candidate.checkpoint().as_directory() as directory:
                load_path, client_state = engine.load_checkpoint(directory, tag=candidate.tag or None)
            return client_state if load_path is not None else None
        converted = None
        if dist.get_rank() == 0:
            try:
                converted = convert_to_universal(candidate)
            except Exception as error:  # noqa: BLE001 - every rank must learn of it, or the others wait forever
                logger.warning("checkpoint %s could not be converted to a universal checkpoint (%s)", candidate.path, error)
        if not agree(converted is not None or dist.get_rank() != 0):
            raise RuntimeError(f"the universal conversion of {candidate.path} failed")
        universal = ray.train.Checkpoint(candidate.universal_path, filesystem=candidate.filesystem)
        with universal.as_directory() as directory, universal_loading(engine):
            load_path, client_state = engine.load_checkpoint(directory, tag=candidate.tag)
        return client_state if load_path is not None else None

    def lowest(key: int) -> int:
        value = torch.tensor([key], dtype=torch.int64, device=collective_device())
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return int(value.item())

    return load_first_good(candidates, load, agree, lowest)
