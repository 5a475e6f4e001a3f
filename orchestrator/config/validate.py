"""Cross-field rules that a schema cannot express, checked before Ray starts.

Each rule raises `ConfigError` naming the key to change, the value it has and what is allowed, so that the CLI can
print one line instead of a traceback. Single-key type and enum errors are already caught by Hydra against the
schemas in `orchestrator.config.schema`.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Mapping, Optional


class ConfigError(ValueError):
    """A user error in the configuration: names the key, the value and what is allowed."""

    def __init__(self, key: str, value: Any, expected: str) -> None:
        self.key, self.value, self.expected = key, value, expected
        super().__init__(f"{key}={value!r}: {expected}")


def _at_least(cfg: Mapping[str, Any], section: str, key: str, minimum: float) -> None:
    value = cfg[section][key]
    if value < minimum:
        raise ConfigError(f"{section}.{key}", value, f"expected a value >= {minimum}")


def validate_trainer(cfg: Mapping[str, Any]) -> None:
    trainer = cfg["trainer"]
    for key, minimum in [
        ("num_workers", 1),
        ("micro_batch_size", 1),
        ("grad_accum_steps", 1),
        ("max_steps", 1),
        ("log_every", 1),
        ("eval_every", 0),
        ("checkpoint_every", 0),
        ("keep_checkpoints", 1),
        ("max_failures", 0),
        ("grad_clip", 0),
    ]:
        _at_least(cfg, "trainer", key, minimum)
    if trainer["cpus_per_worker"] <= 0:
        raise ConfigError("trainer.cpus_per_worker", trainer["cpus_per_worker"], "expected a positive number of CPUs")
    if trainer["zero_stage"] not in (0, 1, 2, 3):
        raise ConfigError("trainer.zero_stage", trainer["zero_stage"], "expected one of 0, 1, 2, 3 (DeepSpeed ZeRO stages)")
    if trainer["precision"] == "fp16" and not trainer["use_gpu"]:
        raise ConfigError(
            "trainer.precision",
            "fp16",
            "fp16 with loss scaling runs on GPUs only (DeepSpeed refuses fp16 on CPU); "
            "use trainer.precision=bf16 or fp32 on CPU, or trainer=gpu on a GPU cluster",
        )
    if trainer["optimizer"]["lr"] <= 0:
        raise ConfigError("trainer.optimizer.lr", trainer["optimizer"]["lr"], "expected a positive learning rate")
    if not 0 <= trainer["scheduler"]["warmup_steps"] < trainer["max_steps"]:
        raise ConfigError(
            "trainer.scheduler.warmup_steps",
            trainer["scheduler"]["warmup_steps"],
            f"expected 0 <= warmup_steps < trainer.max_steps ({trainer['max_steps']})",
        )


def validate_resources(cfg: Mapping[str, Any], available_cpus: float, available_gpus: float, where: str) -> None:
    """Checked against this machine before a local start, and against the cluster right after connecting."""
    trainer = cfg["trainer"]
    workers = trainer["num_workers"]
    needed_cpus = workers * trainer["cpus_per_worker"]
    if needed_cpus > available_cpus:
        raise ConfigError(
            "trainer.num_workers",
            workers,
            f"{workers} workers x trainer.cpus_per_worker={trainer['cpus_per_worker']} need {needed_cpus:g} CPUs but "
            f"{where} has {available_cpus:g}; lower trainer.num_workers or trainer.cpus_per_worker",
        )
    if trainer["use_gpu"]:
        needed_gpus = workers * trainer["gpus_per_worker"]
        if needed_gpus > available_gpus:
            raise ConfigError(
                "trainer.num_workers",
                workers,
                f"{workers} workers x trainer.gpus_per_worker={trainer['gpus_per_worker']} need {needed_gpus:g} GPUs "
                f"but {where} has {available_gpus:g}; use fewer workers, or trainer=default to train on CPU",
            )


def validate_model_and_data(cfg: Mapping[str, Any], choices: Mapping[str, str]) -> None:
    """`choices` are the group options picked (model=..., data=...), used only to word the errors."""
    model, data = cfg["model"], cfg["data"]
    model_name, data_name = choices.get("model", model.get("_target_")), choices.get("data", data.get("_target_"))
    task = data.get("task")
    if task not in ("classification", "lm"):
        raise ConfigError("data.task", task, "expected 'classification' or 'lm'")
    is_classifier = "num_classes" in model
    is_lm = "vocab_size" in model
    if task == "lm" and is_classifier:
        raise ConfigError(
            "model", model_name, f"is a classifier, but data={data_name} is a language-model dataset; use model=gpt"
        )
    if task == "classification" and is_lm:
        raise ConfigError(
            "model", model_name, f"is a language model, but data={data_name} is a classification dataset; use model=mlp or model=cnn"
        )
    if model.get("_target_") == "orchestrator.models.cnn.CNN" and len(data["input_shape"]) != 3:
        raise ConfigError(
            "model", model_name, f"needs image-shaped inputs (C, H, W) but data={data_name} gives input_shape="
            f"{list(data['input_shape'])}; use model=mlp"
        )
    if "n_head" in model and model["n_embd"] % model["n_head"]:
        raise ConfigError("model.n_head", model["n_head"], f"must divide model.n_embd={model['n_embd']}")
    if "val_fraction" in data and not 0 < data["val_fraction"] < 1:
        raise ConfigError("data.val_fraction", data["val_fraction"], "expected a fraction strictly between 0 and 1")
    if "path" in data:
        path = Path(str(data["path"])).expanduser()
        if not path.is_file():
            raise ConfigError("data.path", str(data["path"]), "no such file; expected a readable text file")


def validate_recipe(cfg: Mapping[str, Any]) -> None:
    name = cfg["recipe"]["name"]
    if importlib.util.find_spec(f"orchestrator.recipes.{name}") is None:
        raise ConfigError("recipe.name", name, "no recipe module orchestrator.recipes.<name> with that name")


def validate_run_name(name: str, resume: Optional[str], storage_path: str) -> None:
    """A new run never silently continues an old one; `resume=` must name a run that exists."""
    if "://" in storage_path:  # remote storage: Ray Train checks when it opens the run
        return
    run_dir = Path(storage_path) / name
    if resume:
        if not run_dir.is_dir():
            raise ConfigError("resume", resume, f"no run named {resume!r} under trainer.storage_path={storage_path}")
    elif run_dir.exists():
        raise ConfigError(
            "name", name, f"a run with this name already exists under {storage_path}; pass resume={name} to continue it"
        )


def local_cpu_count() -> float:
    return float(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
