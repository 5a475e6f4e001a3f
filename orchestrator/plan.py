"""Config → Plan: everything a run will do, computed without Ray, torch or MLflow.

`orch plan` prints it; `orch run` executes it. Keeping it pure data makes the DeepSpeed config, the resources and
the memory estimate testable in milliseconds and reviewable before anything starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import yaml
from omegaconf import OmegaConf

from orchestrator.config import Composed, ConfigSource, config_groups, validate
from orchestrator.config.reads import recipe_inputs, recipe_reads
from orchestrator.config.trust import checked_model_config, trusted_model_targets
from orchestrator.config.validate import ConfigError
from orchestrator.memory import MemoryEstimate, estimate_memory, plan_memory, zero3_settings  # noqa: F401 - estimate_memory: API

DEFAULT_EXPERIMENT = "orchestrator"


@dataclass
class StagePlan:
    name: str
    recipe: str
    num_workers: int | tuple[int, int]  # (MIN, MAX): an elastic worker group (Ray Train's ScalingConfig takes either)
    use_gpu: bool
    resources_per_worker: dict[str, float]
    placement_strategy: str
    backend: str
    precision: str
    deepspeed: dict[str, Any]
    memory: MemoryEstimate
    config: dict[str, Any]  # the resolved config, plain containers: what crosses into Ray
    kind: str = ""  # the recipe option composed (train, prune, finetune, distill, quantize ...)
    run_name: str = ""  # the stage's MLflow run carries it as tag orch.run_name
    ray_name: str = ""  # Ray Train's RunConfig(name), under storage_path: re-using it resumes from its checkpoints
    storage_path: str = ""
    # role ("input", "teacher") -> reference as written: a pipeline stage name, an MLflow run id/URI or a directory
    inputs: dict[str, str] = field(default_factory=dict)
    key: str = ""  # cache key: hash of the config that shapes the model, and of the inputs' keys

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if isinstance(self.num_workers, tuple) else self.num_workers


@dataclass
class TrackingPlan:
    uri: str
    experiment: str
    artifact_location: Optional[str]  # set only for a local store, so artifacts never land in a worker's temp dir


@dataclass
class Plan:
    """A run of one stage. A pipeline's plan (orchestrator.pipeline.plan.PipelinePlan) extends it with more stages."""

    run_name: str
    resuming: bool
    storage_path: str
    tracking: TrackingPlan
    stages: list[StagePlan] = field(default_factory=list)  # in dependency order; one here


def resolve_precision(trainer: Mapping[str, Any]) -> str:
    # bf16 is supported by DeepSpeed's CPU accelerator and by Ampere-or-newer GPUs; older GPUs fall back to fp16
    # in the worker, where the device can be asked.
    return "bf16" if trainer["precision"] == "auto" else trainer["precision"]


def deepspeed_config(trainer: Mapping[str, Any], precision: str, model: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """DeepSpeed JSON generated from the `trainer` group (and, for ZeRO-3's buffers, the model's width), then
    overlaid with the raw `trainer.deepspeed` dict."""
    optimizer, scheduler = trainer["optimizer"], trainer["scheduler"]
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": trainer["micro_batch_size"],
        "gradient_accumulation_steps": trainer["grad_accum_steps"],
        # an elastic group keeps the batch of its MAX workers; a smaller group accumulates more (start_worker)
        "train_batch_size": validate.elastic_global_batch(trainer) if validate.is_elastic(trainer["num_workers"])
        else trainer["micro_batch_size"] * trainer["grad_accum_steps"] * trainer["num_workers"],
        "zero_optimization": {"stage": trainer["zero_stage"]},
        "steps_per_print": 10**9,  # orch reports progress itself
    }
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif precision == "fp16":
        config["fp16"] = {
            "enabled": True,
            # DeepSpeed reads auto_cast even with fp16 disabled, so the section exists only when fp16 is on
            "auto_cast": True,
            "loss_scale": 0,  # 0 selects dynamic loss scaling
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        }
    if trainer["grad_clip"] > 0:
        config["gradient_clipping"] = trainer["grad_clip"]
    if optimizer["name"] == "adamw":
        config["optimizer"] = {
            "type": "AdamW",
            "params": {
                "lr": optimizer["lr"],
                "betas": list(optimizer["betas"]),
                "eps": optimizer["eps"],
                "weight_decay": optimizer["weight_decay"],
                # torch's AdamW: DeepSpeed's default CPU path would JIT-compile its own fused Adam (~70 s)
                "torch_adam": True,
            },
        }
    else:
        # DeepSpeed has no built-in SGD: the worker passes torch.optim.SGD, which ZeRO accepts with this flag.
        config["zero_allow_untested_optimizer"] = True
    _map_offload(config, trainer)
    if trainer["zero_stage"] == 3:
        config["zero_optimization"].update(zero3_settings(model or {}, trainer["use_gpu"]))
    # DeepSpeed's warmup schedulers refuse warmup_num_steps=0: "no warmup" is one step that starts at the peak.
    warmup, total, lr = scheduler["warmup_steps"], trainer["max_steps"], optimizer["lr"]
    steps, start_ratio = (warmup, 0.0) if warmup else (1, 1.0)
    if scheduler["name"] == "cosine":
        config["scheduler"] = {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": total,
                "warmup_num_steps": steps,
                "warmup_min_ratio": start_ratio,
                "cos_min_ratio": scheduler["min_lr_ratio"],
                "warmup_type": "linear",
            },
        }
    elif scheduler["name"] == "linear":
        config["scheduler"] = {
            "type": "WarmupDecayLR",
            "params": {
                "total_num_steps": total,
                "warmup_min_lr": lr * start_ratio,
                "warmup_max_lr": lr,
                "warmup_num_steps": steps,
                "warmup_type": "linear",
            },
        }
    elif warmup:
        config["scheduler"] = {
            "type": "WarmupLR",
            "params": {"warmup_min_lr": 0.0, "warmup_max_lr": lr, "warmup_num_steps": warmup, "warmup_type": "linear"},
        }
    return _deep_merge(config, dict(trainer.get("deepspeed") or {}))


def _map_offload(config: dict[str, Any], trainer: Mapping[str, Any]) -> None:
    """trainer.offload.* as DeepSpeed's `offload_optimizer` / `offload_param` (ZeRO-Offload, ZeRO-Infinity)."""
    offload = trainer.get("offload") or {}
    zero = config["zero_optimization"]
    for key, section in (("optimizer", "offload_optimizer"), ("param", "offload_param")):
        device = offload.get(key, "none")
        if device == "none":
            continue
        # pinned pages speed host-to-GPU copies; on a CPU device there is no copy, and pinning needs an accelerator
        zero[section] = {"device": device, "pin_memory": bool(trainer["use_gpu"])}
        if device == "nvme":
            zero[section]["nvme_path"] = offload["nvme_path"]
    if offload.get("optimizer", "none") != "none":
        if "optimizer" not in config:
            config["zero_force_ds_cpu_optimizer"] = False  # torch's SGD on the offloaded states
        elif trainer["use_gpu"]:
            # GPU workers step the offloaded states with DeepSpeed's CPU Adam (its C++ op, built on first use). CPU
            # workers keep torch's AdamW: the op's build took 2 min 45 s of CPU here (14 min on the shared 2-core
            # machine), and the states never left the same RAM anyway.
            config["optimizer"]["params"].pop("torch_adam", None)


def _deep_merge(base: dict[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def resolve_tracking(tracking: Mapping[str, Any], cwd: Path) -> TrackingPlan:
    uri = tracking.get("uri") or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{cwd / 'mlflow.db'}"
    experiment = tracking.get("experiment") or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    artifacts = None
    if uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri:
        artifacts = tracking.get("artifact_location") or (cwd / "mlartifacts").as_uri()
    return TrackingPlan(uri=uri, experiment=experiment, artifact_location=artifacts)


def new_run_name(recipe: str) -> str:
    return f"{recipe}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


# Keys that change where or how a run is tracked and scheduled, never the model it produces.
_NOT_IN_KEY = {"name", "resume", "tracking", "cluster", "pipeline", "sweep", "trust"}
_TRAINER_NOT_IN_KEY = {"storage_path", "max_failures", "keep_checkpoints", "log_every", "peak_tflops", "callbacks", "memory_budget_gb"}


def stage_key(config: Mapping[str, Any], input_keys: Mapping[str, str]) -> str:
    """Hash of what a stage's model depends on: its resolved config and (recursively) its inputs' keys."""
    shaping = {key: value for key, value in config.items() if key not in _NOT_IN_KEY}
    shaping["trainer"] = {k: v for k, v in config["trainer"].items() if k not in _TRAINER_NOT_IN_KEY}
    payload = json.dumps({"config": shaping, "inputs": dict(sorted(input_keys.items()))}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def read_model_config(directory: str, key: str, allowed: Sequence[str]) -> Optional[dict[str, Any]]:
    """The model config stored beside exported weights (model.yaml) or in an orch checkpoint (orch_model.yaml),
    checked against the `allowed` classes by name only: nothing is imported at plan time. Refusals name `key`."""
    for name, field_name in (("model.yaml", None), ("orch_model.yaml", "model")):
        path = Path(directory).expanduser() / name
        if path.is_file():
            loaded = yaml.safe_load(path.read_text())
            if field_name:
                loaded = loaded.get(field_name) if isinstance(loaded, dict) else None
            return checked_model_config(loaded, key, allowed, origin=str(path))
    return None


def plan_stage(container: dict[str, Any], name: str, kind: str) -> StagePlan:
    """Validate one resolved config (recipe, trainer, compression, local resources) and plan its stage."""
    validate.validate_recipe(container)
    validate.validate_trainer(container)
    validate.validate_compression(container)
    validate.validate_registration(container)
    validate.validate_cluster(container)
    trainer = container["trainer"]
    if container["cluster"]["kind"] == "local":
        cpus = container["cluster"]["num_cpus"] or validate.local_cpu_count()
        gpus = container["cluster"]["num_gpus"]
        if gpus is None:  # null: all of this machine's GPUs, as Ray counts them (asked only when the run wants one)
            gpus = validate.local_gpu_count() if container["trainer"]["use_gpu"] else 0
        validate.validate_resources(container, cpus, gpus, "this machine")
    precision = resolve_precision(trainer)
    resources = {"CPU": float(trainer["cpus_per_worker"])}
    if trainer["use_gpu"]:
        resources["GPU"] = float(trainer["gpus_per_worker"])
    return StagePlan(
        name=name,
        recipe=container["recipe"]["name"],
        num_workers=tuple(trainer["num_workers"]) if validate.is_elastic(trainer["num_workers"]) else trainer["num_workers"],
        use_gpu=trainer["use_gpu"],
        resources_per_worker=resources,
        placement_strategy=trainer["placement_strategy"],
        backend="nccl" if trainer["use_gpu"] else "gloo",
        precision=precision,
        deepspeed=deepspeed_config(trainer, precision, container["model"]),
        memory=plan_memory(container, precision),
        config=container,
        kind=kind,
    )


def run_identity(container: Mapping[str, Any], default_name: str, cwd: Path, paths_here: bool = True) -> tuple[str, str, bool]:
    """(run name, storage root, resuming): a new name unless one is given, checked against what is stored."""
    storage_path = container["trainer"]["storage_path"] or str(cwd / "orch_runs")
    for key in ("resume", "name"):
        if container.get(key):
            validate.validate_run_name_format(key, container[key])
    resume = container.get("resume")
    run_name = resume or container.get("name") or new_run_name(default_name)
    validate.validate_run_name(run_name, resume, storage_path, paths_here)
    return run_name, storage_path, bool(resume)


def resolved_container(composed: Composed, paths_here: bool = True) -> dict[str, Any]:
    """The composed config as plain containers, checked first where resolving would hide the real mistake."""
    # before resolving: a model/data mismatch would otherwise surface as an obscure missing interpolation
    validate.validate_known_keys(composed.cfg)
    validate.validate_model_and_data(composed.cfg, composed.choices, paths_here)
    container = OmegaConf.to_container(composed.cfg, resolve=True, throw_on_missing=True, enum_to_str=True)
    assert isinstance(container, dict)
    return container


def resolve_transfer_data(container: dict[str, Any], source: ConfigSource) -> None:
    """recipe.distill.transfer_data (a data option or all_inputs) -> recipe.distill.transfer, the transfer set's data
    config the workers instantiate; checked against the student before Ray starts."""
    distill = container["recipe"].get("distill")
    if distill is None:
        return
    option = distill.get("transfer_data")
    if option is None:
        distill["transfer"] = None
        return
    if option == validate.ALL_INPUTS:
        transfer = validate.transfer_data_config(container["data"])
    else:
        options = config_groups(source).get("data", [])
        if option not in options:
            raise ConfigError(
                "recipe.distill.transfer_data", option,
                f"expected {validate.ALL_INPUTS} (the stage's own training inputs) or a data option: {', '.join(options)}",
            )
        composed = source.compose([f"data={option}"])
        transfer = OmegaConf.to_container(composed.cfg.data, resolve=True, throw_on_missing=True, enum_to_str=True)
        assert isinstance(transfer, dict)
    validate.validate_transfer_data(option, transfer, container["data"], container["model"])
    distill["transfer"] = transfer


def build_plan(composed: Composed, cwd: Optional[Path] = None, paths_here: bool = True) -> Plan:
    """Validate one composed config and turn it into the Plan of its single stage. Raises ConfigError naming the key
    on any user error. A config with a pipeline is planned by `orchestrator.pipeline.plan.build_pipeline_plan`.

    `paths_here=False` (`orch submit`): files, folders and stored runs the config names live on the cluster, so they
    are not looked for here; the job's driver checks them before it starts Ray, with the same one-line errors."""
    cwd = cwd or Path.cwd()
    if composed.cfg.get("pipeline") is not None:
        raise ConfigError(
            "pipeline", composed.cfg.pipeline.get("name"), "a pipeline is planned by orchestrator.pipeline (orch run recipe=pipeline pipeline=NAME)"
        )
    container = resolved_container(composed, paths_here)
    validate.validate_standalone_references(container, paths_here)
    inputs = recipe_inputs(container["recipe"])
    reads, allowed = recipe_reads(container["recipe"]), trusted_model_targets(container)
    for role, reference in inputs.items():
        if paths_here and validate.reference_kind(reference) == "path":
            model = read_model_config(reference, f"recipe.{reads[role][0]}", allowed)
            if role == "teacher" and model:
                validate.validate_teacher_matches_student("recipe.distill.teacher", model, container["model"])
            elif role == "input" and model:
                container["model"] = model  # the input defines the architecture the stage starts from
    resolve_transfer_data(container, ConfigSource.for_directory(cwd))

    run_name, storage_path, resuming = run_identity(container, container["recipe"]["name"], cwd, paths_here)
    container["trainer"]["storage_path"] = storage_path
    container["name"] = run_name

    stage = plan_stage(container, container["recipe"]["name"], kind=composed.choices.get("recipe", container["recipe"]["name"]))
    stage.run_name, stage.ray_name, stage.storage_path = run_name, run_name, storage_path
    stage.inputs = inputs
    stage.key = stage_key(container, {})
    return Plan(
        run_name=run_name,
        resuming=resuming,
        storage_path=storage_path,
        tracking=resolve_tracking(container["tracking"], cwd),
        stages=[stage],
    )
