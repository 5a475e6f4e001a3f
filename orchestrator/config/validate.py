"""Cross-field rules that a schema cannot express, checked before Ray starts.

Each rule raises `ConfigError` naming the key to change, the value it has and what is allowed, so that the CLI can
print one line instead of a traceback. Single-key type and enum errors are already caught by Hydra against the
schemas in `orchestrator.config.schema`.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence


class ConfigError(ValueError):
    """A user error in the configuration: names the key, the value and what is allowed."""

    def __init__(self, key: str, value: Any, expected: str) -> None:
        self.key, self.value, self.expected = key, value, expected
        super().__init__(f"{key}={value!r}: {expected}")


def _at_least(cfg: Mapping[str, Any], section: str, key: str, minimum: float) -> None:
    value = cfg[section][key]
    if value < minimum:
        raise ConfigError(f"{section}.{key}", value, f"expected a value >= {minimum}")


def worker_range(num_workers: Any) -> tuple[int, int]:
    """trainer.num_workers as (MIN, MAX): an int n is (n, n); [MIN, MAX] is an elastic worker group, which Ray
    Train starts with as many workers as the cluster holds (up to MAX) and restarts with fewer (down to MIN) when
    workers are lost."""
    expected = "expected a number of workers >= 1, or [MIN, MAX] with 1 <= MIN <= MAX for an elastic worker group"
    if isinstance(num_workers, int) and not isinstance(num_workers, bool):
        if num_workers < 1:
            raise ConfigError("trainer.num_workers", num_workers, expected)
        return num_workers, num_workers
    if not isinstance(num_workers, (list, tuple)) or len(num_workers) != 2 or not all(
        isinstance(n, int) and not isinstance(n, bool) for n in num_workers
    ):
        raise ConfigError("trainer.num_workers", num_workers, expected)
    low, high = num_workers
    if low < 1:
        raise ConfigError("trainer.num_workers", list(num_workers), f"MIN={low}: an elastic group needs at least 1 worker; {expected}")
    if low > high:
        raise ConfigError("trainer.num_workers", list(num_workers), f"MIN={low} > MAX={high}; {expected}")
    return low, high


def is_elastic(num_workers: Any) -> bool:
    return isinstance(num_workers, (list, tuple))


def elastic_global_batch(trainer: Mapping[str, Any]) -> int:
    """An elastic run keeps one global batch, MAX x micro-batch x accumulation, whatever the size of its group: a
    smaller group accumulates more micro-batches, so a restart on the workers left continues the same optimization
    at the same sample position (what `resume=` on another number of workers does too)."""
    _, high = worker_range(trainer["num_workers"])
    return high * trainer["micro_batch_size"] * trainer["grad_accum_steps"]


def validate_elastic_batch(trainer: Mapping[str, Any]) -> None:
    """Every group size Ray Train may choose in [MIN, MAX] must make the global batch by whole accumulation steps."""
    low, high = worker_range(trainer["num_workers"])
    accum = trainer["grad_accum_steps"]
    misfits = [size for size in range(low, high + 1) if (high * accum) % size]
    if misfits:
        lcm = math.lcm(*range(low, high + 1))
        step = lcm // math.gcd(lcm, high)
        raise ConfigError(
            "trainer.num_workers", [low, high],
            f"an elastic group keeps the global batch of {high} workers x trainer.grad_accum_steps={accum}; a group of "
            f"{misfits[0]} cannot make it by whole accumulation steps: set trainer.grad_accum_steps to a multiple of "
            f"{step}, or choose a range whose sizes all divide {high * accum}",
        )


def validate_trainer(cfg: Mapping[str, Any]) -> None:
    trainer = cfg["trainer"]
    worker_range(trainer["num_workers"])
    if is_elastic(trainer["num_workers"]):
        validate_elastic_batch(trainer)
    for key, minimum in [
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
    validate_deepspeed_overlay(trainer.get("deepspeed") or {})
    target = (cfg.get("model") or {}).get("_target_")
    if trainer.get("activation_checkpointing") and target not in CHECKPOINTABLE_MODELS:
        raise ConfigError(
            "trainer.activation_checkpointing", True,
            f"recomputes transformer blocks in the backward pass, which {', '.join(CHECKPOINTABLE_MODELS)} have; "
            f"the model is {target}: set it to false",
        )
    optimizer, scheduler = trainer["optimizer"], trainer["scheduler"]
    if not (math.isfinite(optimizer["lr"]) and optimizer["lr"] > 0):
        raise ConfigError("trainer.optimizer.lr", optimizer["lr"], "expected a positive, finite learning rate")
    if not (math.isfinite(optimizer["eps"]) and optimizer["eps"] > 0):
        raise ConfigError("trainer.optimizer.eps", optimizer["eps"], "expected a small positive number, e.g. 1e-8")
    if not (math.isfinite(optimizer["weight_decay"]) and optimizer["weight_decay"] >= 0):
        raise ConfigError("trainer.optimizer.weight_decay", optimizer["weight_decay"], "expected a finite value >= 0")
    betas = list(optimizer["betas"])
    if len(betas) != 2 or not all(math.isfinite(b) and 0 <= b < 1 for b in betas):
        raise ConfigError("trainer.optimizer.betas", betas, "expected two coefficients in [0, 1), e.g. [0.9, 0.999]")
    if not 0 <= optimizer["momentum"] < 1:
        raise ConfigError("trainer.optimizer.momentum", optimizer["momentum"], "expected a value in [0, 1)")
    if not (math.isfinite(trainer["grad_clip"])):
        raise ConfigError("trainer.grad_clip", trainer["grad_clip"], "expected a finite norm (0 disables clipping)")
    if not 0 <= scheduler["min_lr_ratio"] <= 1:
        raise ConfigError("trainer.scheduler.min_lr_ratio", scheduler["min_lr_ratio"], "expected a fraction of the peak lr in [0, 1]")
    if trainer["threads_per_worker"] is not None and trainer["threads_per_worker"] < 1:
        raise ConfigError("trainer.threads_per_worker", trainer["threads_per_worker"], "expected >= 1, or null for cpus_per_worker")
    if trainer["use_gpu"] and trainer["gpus_per_worker"] != 1:
        # a data-parallel rank drives one device (DeepSpeed picks cuda:LOCAL_RANK) and NCCL refuses two ranks on one GPU:
        # a fraction puts two ranks on one GPU, and more than one leaves the rest idle
        raise ConfigError(
            "trainer.gpus_per_worker", trainer["gpus_per_worker"],
            "expected 1: each worker is one data-parallel rank on one GPU (use trainer.num_workers for more GPUs)",
        )
    if not 0 <= trainer["scheduler"]["warmup_steps"] < trainer["max_steps"]:
        raise ConfigError(
            "trainer.scheduler.warmup_steps",
            trainer["scheduler"]["warmup_steps"],
            f"expected 0 <= warmup_steps < trainer.max_steps ({trainer['max_steps']})",
        )
    validate_offload(trainer)
    budget = trainer.get("memory_budget_gb")
    if budget is not None and not (math.isfinite(budget) and budget > 0):
        raise ConfigError("trainer.memory_budget_gb", budget, "expected a positive number of GB per worker, or null for the device's memory")


def validate_offload(trainer: Mapping[str, Any]) -> None:
    """What DeepSpeed's ZeRO-Offload accepts, checked here rather than when the engine starts on every worker."""
    offload, stage = trainer.get("offload") or {}, trainer["zero_stage"]
    optimizer, param = offload.get("optimizer", "none"), offload.get("param", "none")
    if optimizer != "none" and stage < 1:
        raise ConfigError(
            "trainer.offload.optimizer", optimizer, "optimizer offload partitions optimizer states: it needs trainer.zero_stage 1, 2 or 3"
        )
    if param != "none" and stage != 3:
        raise ConfigError("trainer.offload.param", param, "parameter offload needs trainer.zero_stage=3 (ZeRO-Infinity)")
    if "nvme" in (optimizer, param):
        key = "trainer.offload.param" if param == "nvme" else "trainer.offload.optimizer"
        path = offload.get("nvme_path")
        if not path:
            raise ConfigError("trainer.offload.nvme_path", path, f"{key}=nvme needs a directory on a local NVMe drive")
        folder = Path(path).expanduser()
        if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigError("trainer.offload.nvme_path", path, "expected an existing, writable directory")
        reason = nvme_offload_unavailable()
        if reason:
            raise ConfigError(key, "nvme", reason)


def nvme_offload_unavailable() -> Optional[str]:
    """Why DeepSpeed cannot offload to NVMe here, or None: it needs its async_io op, which links against libaio.
    Asked only when nvme is requested, as the check compiles a test program (and imports torch)."""
    try:
        from deepspeed.ops.op_builder import AsyncIOBuilder

        if AsyncIOBuilder().is_compatible(verbose=False):
            return None
    except Exception as error:  # noqa: BLE001 - any failure to load the op means no NVMe offload
        return f"DeepSpeed's async_io op cannot load here ({type(error).__name__}: {error}); use cpu or none"
    return "DeepSpeed's async_io op is not available on this machine (it needs libaio: apt install libaio-dev); use cpu or none"


# DeepSpeed keys that the typed `trainer` keys generate: the raw `trainer.deepspeed` overlay may not set them, or it
# would bypass the rules that check those keys (fp16 on CPU, ZeRO-3 with pruning, the batch arithmetic ...).
OWNED_BY_TRAINER = {
    "train_micro_batch_size_per_gpu": "trainer.micro_batch_size",
    "gradient_accumulation_steps": "trainer.grad_accum_steps",
    "train_batch_size": "trainer.micro_batch_size, trainer.grad_accum_steps and trainer.num_workers",
    "zero_optimization.stage": "trainer.zero_stage",
    "fp16": "trainer.precision",
    "bf16": "trainer.precision",
    "gradient_clipping": "trainer.grad_clip",
    "optimizer": "trainer.optimizer",
    "scheduler": "trainer.scheduler",
    "zero_optimization.offload_optimizer": "trainer.offload.optimizer",
    "zero_optimization.offload_param": "trainer.offload.param",
}


def _validate_sizes(model: Mapping[str, Any], data: Mapping[str, Any]) -> None:
    """Sizes a worker would only trip over after Ray started (a layer of -4 units, blocks of 0 tokens)."""
    for key in ("hidden_sizes", "channels", "n_heads", "mlp_hidden"):
        sizes = model.get(key)
        if sizes is not None and not all(isinstance(n, int) and n >= 1 for n in sizes):
            raise ConfigError(f"model.{key}", list(sizes), "expected positive integers")
    for key in ("hidden_size", "n_layer", "n_head", "n_embd"):
        if key in model and model[key] is not None and model[key] < 1:
            raise ConfigError(f"model.{key}", model[key], "expected a positive integer")
    if "dropout" in model and not 0 <= model["dropout"] < 1:
        raise ConfigError("model.dropout", model["dropout"], "expected a probability in [0, 1)")
    for key, minimum in (("block_size", 1), ("limit_train", 1), ("num_samples", 2), ("val_blocks", 1), ("shuffle_buffer", 0)):
        if data.get(key) is not None and data[key] < minimum:
            raise ConfigError(f"data.{key}", data[key], f"expected >= {minimum}" + (" (or null for all)" if key == "limit_train" else ""))


def readable_text(path: Path) -> Optional[str]:
    """Why a text data file cannot be trained on (empty, or binary rather than text), or None."""
    with path.open("rb") as handle:
        head = handle.read(4096)
    if not head:
        return "the file is empty"
    if b"\0" in head:
        return "the file is binary (it holds NUL bytes), not text"
    return None


def validate_deepspeed_overlay(overlay: Mapping[str, Any]) -> None:
    """The overlay adds what the schema does not cover (overlap_comm, bucket sizes, offload ...); what a typed key
    owns is set through that key, where orch's rules see it."""
    for dotted, owner in OWNED_BY_TRAINER.items():
        node: Any = overlay
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        if node is not None:
            raise ConfigError(f"trainer.deepspeed.{dotted}", node, f"set it through {owner} (the overlay is for keys the trainer group does not have)")


def validate_known_keys(cfg: Any) -> None:
    """A key added with `+` under a typed section (`+trainer.foo=1`) would be accepted and ignored: refuse it.
    Free-form mappings (trainer.deepspeed, cluster.env, model/data arguments) may hold any key."""
    import dataclasses

    from omegaconf import DictConfig, OmegaConf

    def walk(node: Any, path: str) -> None:
        if not isinstance(node, DictConfig):
            return
        schema = OmegaConf.get_type(node)
        if schema is not None and dataclasses.is_dataclass(schema):
            known = {f.name for f in dataclasses.fields(schema)}
            for key in node.keys():
                if key not in known:
                    close = difflib.get_close_matches(str(key), sorted(known), n=1)
                    hint = f"; did you mean {path}{close[0]}?" if close else ""
                    child = node._get_node(key)
                    value = "{...}" if isinstance(child, DictConfig) else child._value()
                    raise ConfigError(f"{path}{key}", value, f"no such key in {path.rstrip('.') or 'the config'}{hint}")
        for key in node.keys():
            if schema is not None and dataclasses.is_dataclass(schema):
                walk(node._get_node(key), f"{path}{key}.")

    walk(cfg, "")


def validate_cluster(cfg: Mapping[str, Any]) -> None:
    cluster = cfg["cluster"]
    if cluster.get("num_cpus") is not None and cluster["num_cpus"] < 1:
        raise ConfigError("cluster.num_cpus", cluster["num_cpus"], "expected >= 1, or null for all of this machine's CPUs")
    if cluster.get("num_gpus") is not None and cluster["num_gpus"] < 0:
        raise ConfigError("cluster.num_gpus", cluster["num_gpus"], "expected >= 0, or null for all of this machine's GPUs")


def validate_resources(cfg: Mapping[str, Any], available_cpus: float, available_gpus: float, where: str) -> None:
    """Checked against this machine before a local start, and against the cluster right after connecting."""
    trainer = cfg["trainer"]
    # an elastic group starts with as many workers as fit, so only its minimum must fit
    workers, _ = worker_range(trainer["num_workers"])
    shown = trainer["num_workers"]
    at_least = "at least " if is_elastic(shown) else ""
    needed_cpus = workers * trainer["cpus_per_worker"]
    if needed_cpus > available_cpus:
        raise ConfigError(
            "trainer.num_workers",
            shown,
            f"{at_least}{workers} workers x trainer.cpus_per_worker={trainer['cpus_per_worker']} need {needed_cpus:g} CPUs but "
            f"{where} has {available_cpus:g}; lower trainer.num_workers or trainer.cpus_per_worker",
        )
    if trainer["use_gpu"]:
        needed_gpus = workers * trainer["gpus_per_worker"]
        if needed_gpus > available_gpus:
            raise ConfigError(
                "trainer.num_workers",
                shown,
                f"{at_least}{workers} workers x trainer.gpus_per_worker={trainer['gpus_per_worker']} need {needed_gpus:g} GPUs "
                f"but {where} has {available_gpus:g}; use fewer workers, or trainer=default to train on CPU",
            )


def validate_model_and_data(cfg: Mapping[str, Any], choices: Mapping[str, str], paths_here: bool = True) -> None:
    """`choices` are the group options picked (model=..., data=...), used only to word the errors. `paths_here`: the
    files the config names are on this machine (False for `orch submit`: they are checked by the job's driver on the
    cluster, in its first seconds, with the same errors)."""
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
    _validate_sizes(model, data)
    if "n_head" in model and model.get("head_dim") is None and model["n_embd"] % model["n_head"]:
        raise ConfigError("model.n_head", model["n_head"], f"must divide model.n_embd={model['n_embd']}")
    if "val_fraction" in data and not 0 < data["val_fraction"] < 1:
        raise ConfigError("data.val_fraction", data["val_fraction"], "expected a fraction strictly between 0 and 1")
    if "path" in data and paths_here:
        import glob

        path = str(Path(str(data["path"])).expanduser())
        files = [Path(match) for match in glob.glob(path, recursive=True) if Path(match).is_file()]
        if not files:
            raise ConfigError("data.path", str(data["path"]), "no such file; expected a readable text/JSONL file or a glob of them")
        unusable = {str(f): readable_text(f) for f in files[:64]}  # a glob of many shards: the first ones tell
        if all(unusable.values()):
            raise ConfigError("data.path", str(data["path"]), next(iter(unusable.values())) + "; expected UTF-8 text or JSONL")
    if model.get("pretrained_path") and paths_here:
        reason = missing_pretrained_reason(str(model["pretrained_path"]))
        if reason:
            raise ConfigError("model.pretrained_path", str(model["pretrained_path"]), reason)
    if data.get("tokenizer") and paths_here:
        tokenizer = Path(str(data["tokenizer"])).expanduser()
        if not tokenizer.is_dir():
            raise ConfigError("data.tokenizer", str(data["tokenizer"]), "no such directory; expected a local tokenizer directory (or null for bytes)")
        if not any((tokenizer / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
            raise ConfigError(
                "data.tokenizer", str(data["tokenizer"]),
                "the directory holds no tokenizer (tokenizer.json / tokenizer_config.json); set data.tokenizer=null "
                "for bytes, or point it at a tokenizer directory",
            )


def missing_pretrained_reason(path: str) -> Optional[str]:
    """Why `path` is not a loadable local model directory, or None when it is (cheap: no transformers import)."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        return "no such directory; pretrained models are loaded from a local directory only (no hub downloads)"
    if not (directory / "config.json").is_file():
        return "the directory has no config.json; expected a directory written by save_pretrained"
    return None


# MLflow's own rules, checked before a run rather than after it: a registered model's name holds no '/' or ':', an
# alias is letters, digits, '_' and '-', and "latest" and v<N> are reserved (models:/NAME/latest, version aliases)
ALIAS = re.compile(r"[\w-]{1,255}")


def validate_registration(cfg: Mapping[str, Any]) -> None:
    tracking = cfg["tracking"]
    name, alias = tracking.get("register_as"), tracking.get("alias")
    if name is None:
        return
    validate_registered_name("tracking.register_as", name, "tracking.alias", alias)


def validate_registered_name(name_key: str, name: Any, alias_key: str, alias: Optional[str]) -> None:
    """A registered model's name and alias as MLflow will accept them (tracking.*, pipeline.promote.*)."""
    if not str(name).strip() or any(c in str(name) for c in "/:"):
        raise ConfigError(name_key, name, "expected a registered model name without '/' or ':'")
    if alias and (not ALIAS.fullmatch(alias) or alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias)):
        raise ConfigError(
            alias_key, alias,
            "expected letters, digits, '_' and '-' (MLflow reserves 'latest', which models:/NAME/latest already "
            "means, and v<N>); or '' for no alias",
        )


def validate_recipe(cfg: Mapping[str, Any]) -> None:
    name = cfg["recipe"]["name"]
    if importlib.util.find_spec(f"orchestrator.recipes.{name}") is None:
        raise ConfigError("recipe.name", name, "no recipe module orchestrator.recipes.<name> with that name")


# A run name becomes a directory under trainer.storage_path, a Ray Train run name and a value in MLflow search filters
# (tags.`orch.run_name` = '<name>'): no separators, no quotes, no "..", nothing hidden.
RUN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


def validate_run_name_format(key: str, value: Any) -> None:
    """`name=` and `resume=` as typed: a plain name, never a path."""
    if not isinstance(value, str) or not RUN_NAME.fullmatch(value):
        path_hint = "; resume takes the name of a run under trainer.storage_path, not a path" if key == "resume" else ""
        raise ConfigError(
            key, value,
            "expected a run name of letters, digits, '.', '_' and '-', not starting with '.', at most 128 "
            f"characters{path_hint}",
        )


def storage_run_kind(storage_path: str, name: str) -> str:
    """What lies at `storage_path/name`: "dir", "file" or "none", read through pyarrow.fs, the filesystem layer Ray
    Train writes its runs with, so that a local path, a file:// URI and a remote URI (s3://, gs://, hdfs://) are
    looked up the same way."""
    import pyarrow.fs

    uri = storage_path if "://" in storage_path else str(Path(storage_path).expanduser().resolve())
    try:
        filesystem, root = pyarrow.fs.FileSystem.from_uri(uri)
        info = filesystem.get_file_info(f"{root.rstrip('/')}/{name}")
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid/ArrowIOError derive from these
        raise ConfigError(
            "trainer.storage_path", storage_path, f"could not list it to check the run name ({error}); expected a path or a "
            "URI pyarrow.fs can open (file://, s3://, gs://, hdfs://)",
        ) from None
    return {pyarrow.fs.FileType.Directory: "dir", pyarrow.fs.FileType.NotFound: "none"}.get(info.type, "file")


def canonical_storage(storage_path: str) -> str:
    """One spelling of a storage location, as a run records it (tag orch.storage_path) and resume compares it: a local
    path or file:// URI as its resolved absolute path, any other URI without a trailing '/'."""
    if storage_path.startswith("file://"):
        storage_path = storage_path[len("file://"):]
    if "://" in storage_path:
        return storage_path.rstrip("/")
    return str(Path(storage_path).expanduser().resolve())


def validate_run_name(name: str, resume: Optional[str], storage_path: str, paths_here: bool = True) -> None:
    """A new run never silently continues an old one; `resume=` must name a run that exists. Checked for every kind
    of storage: a reused name on s3:// would otherwise continue the old run's checkpoints."""
    if not paths_here:  # `orch submit`: the storage is the cluster's; the job's driver checks it at its start
        return
    kind = storage_run_kind(storage_path, name)
    if resume:
        if kind != "dir":
            raise ConfigError("resume", resume, f"no run named {resume!r} under trainer.storage_path={storage_path}")
    elif kind != "none":
        raise ConfigError(
            "name", name, f"a run with this name already exists under {storage_path}; pass resume={name} to continue it"
        )


def local_cpu_count() -> float:
    return float(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def visible_cuda_devices() -> Optional[list[str]]:
    """CUDA_VISIBLE_DEVICES as a list of indices or UUIDs (as Ray reads it: "NoDevFiles" is none), or None unset."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return None
    ids = [device.strip() for device in visible.split(",") if device.strip()]
    return [] if ids[:1] == ["NoDevFiles"] else ids


def nvidia_smi(*fields: str) -> list[list[str]]:
    """One row of `fields` per GPU the driver lists, visible or not ([] without nvidia-smi); no torch import (~2 s)."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return []
    try:
        listed = subprocess.run(
            ["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [[value.strip() for value in line.split(",")] for line in listed.splitlines() if line.strip()]


def local_gpu_count() -> int:
    """The GPUs a local Ray started here gets when cluster.num_gpus is null, counted before Ray starts:
    CUDA_VISIBLE_DEVICES when it is set, as Ray reads it, else nvidia-smi's list."""
    visible = visible_cuda_devices()
    return len(visible) if visible is not None else len(nvidia_smi("index"))


# --- compression recipes and pipelines ---------------------------------------------------------------------------

RUN_ID = re.compile(r"[0-9a-f]{32}")
# models whose blocks can be recomputed in the backward pass (their enable_activation_checkpointing method)
CHECKPOINTABLE_MODELS = ("orchestrator.models.gpt.GPT", "orchestrator.models.hf_causal_lm.HFCausalLM")
STRUCTURED_MODELS = ("orchestrator.models.mlp.MLP", "orchestrator.models.cnn.CNN", "orchestrator.models.gpt.GPT")
HF_MODEL = "orchestrator.models.hf_causal_lm.HFCausalLM"
REFERENCE_FORMS = (
    "an MLflow run id (32 hex characters), a runs:/<run id>/model URI, a registered model (models:/NAME@alias or "
    "models:/NAME/VERSION), or a directory holding an exported model (model.yaml + model.safetensors) or an orch "
    "checkpoint"
)
# models:/NAME@ALIAS, models:/NAME/VERSION or models:/NAME/latest (the newest version): MLflow's Model Registry
REGISTERED_MODEL = re.compile(r"models:/(?P<name>[^/@:]+)(?:@(?P<alias>[\w-]+)|/(?P<version>[0-9]+|latest))")


def reference_kind(value: str, paths_here: bool = True) -> Optional[str]:
    """What a model reference outside a pipeline's stage names is: "run", "registered", "path", or None when it is
    none of them. Without `paths_here` a path is taken at its word when it is written as one (it is checked where it
    lives)."""
    if value.startswith("runs:/") or RUN_ID.fullmatch(value):
        return "run"
    if REGISTERED_MODEL.fullmatch(value):
        return "registered"
    if Path(value).expanduser().is_dir() or (not paths_here and value.startswith(("/", "~", "./", "../"))):
        return "path"
    return None


def validate_reference(key: str, value: Optional[str], stage_names: Sequence[str] = (), paths_here: bool = True) -> str:
    """A model reference is a pipeline stage name, an MLflow run, or a directory; returns its kind."""
    if value is None or value == "":
        raise ConfigError(key, value, f"this recipe needs a model to start from: {REFERENCE_FORMS}")
    if value in stage_names:
        return "stage"
    kind = reference_kind(value, paths_here)
    if kind is None:
        known = f"no stage of this pipeline is named {value!r} (stages: {', '.join(stage_names)}) and it is not " if stage_names else "expected "
        raise ConfigError(key, value, known + REFERENCE_FORMS)
    return kind


def output_size(model: Mapping[str, Any]) -> Optional[int]:
    """Width of a model's output (classes or vocabulary), from its config; None for a model that has neither key."""
    if model.get("pretrained_path"):  # a pretrained model's vocabulary is its own (config.json), not the YAML's
        import json

        config_file = Path(str(model["pretrained_path"])).expanduser() / "config.json"
        if config_file.is_file():
            return int(json.loads(config_file.read_text())["vocab_size"])
    if model.get("vocab_size") is None and isinstance(model.get("config"), Mapping) and "vocab_size" in model["config"]:
        return int(model["config"]["vocab_size"])  # an exported Hugging Face model (model.yaml)
    for key in ("num_classes", "vocab_size"):
        if model.get(key) is not None:
            return int(model[key])
    return None


def _fraction(key: str, value: float, upper_inclusive: bool, what: str) -> None:
    if not (0.0 <= value <= 1.0 if upper_inclusive else 0.0 <= value < 1.0):
        raise ConfigError(key, value, f"expected 0 <= {what} {'<=' if upper_inclusive else '<'} 1")


def validate_compression(cfg: Mapping[str, Any]) -> None:
    """Ranges and combinations of recipe.pruning / recipe.structured / recipe.distill, when the recipe has them."""
    recipe, trainer = cfg["recipe"], cfg["trainer"]
    pruning = recipe.get("pruning")
    if pruning is not None:
        _fraction("recipe.pruning.sparsity", pruning["sparsity"], False, "sparsity")
        _fraction("recipe.pruning.initial_sparsity", pruning["initial_sparsity"], False, "initial_sparsity")
        if pruning["scope"] not in ("layer", "global"):
            raise ConfigError("recipe.pruning.scope", pruning["scope"], "expected 'layer' or 'global'")
        schedule = pruning["schedule"]
        validate_pruning_pattern(cfg, pruning, schedule)
        if schedule == "gradual":
            if pruning["initial_sparsity"] > pruning["sparsity"]:
                raise ConfigError(
                    "recipe.pruning.initial_sparsity", pruning["initial_sparsity"],
                    f"expected at most recipe.pruning.sparsity={pruning['sparsity']}",
                )
            _fraction("recipe.pruning.start_fraction", pruning["start_fraction"], False, "start_fraction")
            _fraction("recipe.pruning.end_fraction", pruning["end_fraction"], True, "end_fraction")
            start, end = pruning_window(pruning, trainer["max_steps"])
            if end <= start:
                raise ConfigError(
                    "recipe.pruning.end_fraction", pruning["end_fraction"],
                    f"the pruning window is empty: start step {start}, end step {end} of trainer.max_steps="
                    f"{trainer['max_steps']}; expected end_fraction > start_fraction",
                )
            if pruning["updates"] < 1:
                raise ConfigError("recipe.pruning.updates", pruning["updates"], "expected at least 1 mask update")
        if schedule != "none" and trainer["zero_stage"] == 3:
            raise ConfigError(
                "trainer.zero_stage", 3,
                "pruning keeps one mask per parameter and ZeRO-3 partitions parameters; use trainer.zero_stage 0, 1 "
                "or 2, or recipe.pruning.schedule=none",
            )
    structured = recipe.get("structured")
    if structured is not None:
        _fraction("recipe.structured.ratio", structured["ratio"], False, "ratio")
        if structured["ratio"] > 0 and cfg["model"].get("_target_") not in STRUCTURED_MODELS:
            raise ConfigError(
                "recipe.structured.ratio", structured["ratio"],
                f"structured pruning exports the smaller model as a config, which orch can write for "
                f"{', '.join(STRUCTURED_MODELS)}; the model is {cfg['model'].get('_target_')}",
            )
        model = cfg["model"]
        if model.get("_target_") == "orchestrator.models.gpt.GPT":
            fewest = min(model.get("n_heads") or [model["n_head"]])
            if math.ceil(structured["ratio"] * fewest) >= fewest:
                raise ConfigError(
                    "recipe.structured.ratio", structured["ratio"],
                    f"ceil(ratio * heads) heads are removed per layer and a layer has {fewest}; expected a ratio "
                    f"below {(fewest - 1) / fewest:.3f} so each layer keeps a head",
                )
    if structured is not None and structured.get("drop_blocks", 0) != 0:
        validate_drop_blocks(cfg["model"], structured)
    lm_structured = recipe.get("lm_structured")
    if lm_structured is not None and (lm_structured["heads_ratio"] > 0 or lm_structured["mlp_ratio"] > 0):
        _fraction("recipe.lm_structured.heads_ratio", lm_structured["heads_ratio"], False, "heads_ratio")
        _fraction("recipe.lm_structured.mlp_ratio", lm_structured["mlp_ratio"], False, "mlp_ratio")
        model = cfg["model"]
        if model.get("_target_") != HF_MODEL:
            raise ConfigError(
                "recipe.lm_structured", dict(lm_structured),
                f"removes heads/MLP units of Hugging Face models (model=hf_causal_lm or hf_llama); the model is "
                f"{model.get('_target_')}",
            )
        if lm_structured["heads_ratio"] > 0 and model.get("model_type") == "gpt2" and not model.get("pretrained_path"):
            raise ConfigError(
                "recipe.lm_structured.heads_ratio", lm_structured["heads_ratio"],
                "GPT-2 heads cannot be removed in a form transformers 5 loads back; use 0 (MLP units only) or a "
                "Llama-style model (model=hf_llama)",
            )
    if recipe.get("name") == "quantize":
        validate_quantization(recipe, cfg["cluster"])
    distill = recipe.get("distill")
    if distill is not None:
        if distill["temperature"] <= 0:
            raise ConfigError("recipe.distill.temperature", distill["temperature"], "expected a temperature > 0")
        _fraction("recipe.distill.alpha", distill["alpha"], True, "alpha")
        if distill["feature_weight"] < 0:
            raise ConfigError("recipe.distill.feature_weight", distill["feature_weight"], "expected a weight >= 0")
        if distill["feature_weight"] > 0 and cfg["trainer"]["zero_stage"] == 3:
            raise ConfigError(
                "trainer.zero_stage", 3,
                "feature distillation (recipe.distill.feature_weight > 0) runs the student once outside DeepSpeed to "
                "learn its hidden width, which ZeRO-3's partitioned parameters do not allow; use trainer.zero_stage "
                "0, 1 or 2, or recipe.distill.feature_weight=0",
            )


def _pattern(value: Any) -> Optional[tuple[int, int]]:
    if value == "unstructured":
        return None
    parts = str(value).split(":")
    if len(parts) == 2 and all(part.isdigit() for part in parts) and 0 < int(parts[0]) < int(parts[1]):
        return int(parts[0]), int(parts[1])
    raise ConfigError("recipe.pruning.pattern", value, "expected 'unstructured' or 'N:M' with 0 < N < M, e.g. '2:4'")


def _input_widths(model: Mapping[str, Any]) -> dict[str, int]:
    """Input widths of the Linear/Conv1D layers the default pruning selection holds, by what sets them, for the
    models whose config says them (built-in GPT, HF GPT-2 and Llama-style built from config); else {}."""
    target = model.get("_target_")
    if target == "orchestrator.models.gpt.GPT":
        widths = {"model.n_embd": model["n_embd"]}
        head_dim = model.get("head_dim") or model["n_embd"] // model["n_head"]
        for heads in model.get("n_heads") or [model["n_head"]]:
            widths.setdefault("model.n_head x head_dim", heads * head_dim)
        for hidden in model.get("mlp_hidden") or [4 * model["n_embd"]]:
            widths.setdefault("the MLP width (4 x model.n_embd)", hidden)
        return widths
    if target == HF_MODEL and not model.get("pretrained_path"):
        config = model.get("config") or {}
        if model.get("model_type") == "gpt2" and "n_embd" in config:
            return {"model.config.n_embd": config["n_embd"], "model.config.n_inner": config.get("n_inner") or 4 * config["n_embd"]}
        if "hidden_size" in config and "intermediate_size" in config:
            widths = {"model.config.hidden_size": config["hidden_size"], "model.config.intermediate_size": config["intermediate_size"]}
            if config.get("head_dim") and config.get("num_attention_heads"):
                widths["model.config.num_attention_heads x head_dim"] = config["num_attention_heads"] * config["head_dim"]
            return widths
    return {}


def validate_pruning_pattern(cfg: Mapping[str, Any], pruning: Mapping[str, Any], schedule: str) -> None:
    """recipe.pruning.method / pattern / calibration_batches: wanda needs a trained input model (recipe=prune); an
    N:M pattern needs every pruned layer's input width to be a multiple of M (checked for the default selection of
    models whose config gives the widths; other layers are checked when the masks are made)."""
    n_m = _pattern(pruning["pattern"])
    if schedule in ("none", "hold"):
        return
    if pruning["method"] == "wanda":
        if cfg["recipe"].get("name") != "prune":
            raise ConfigError(
                "recipe.pruning.method", "wanda",
                f"scores weights by the activations of a trained model on calibration batches; use recipe=prune "
                f"(this is recipe={cfg['recipe'].get('name')})",
            )
        if pruning["calibration_batches"] < 1:
            raise ConfigError("recipe.pruning.calibration_batches", pruning["calibration_batches"], "expected at least 1 batch")
    if n_m and pruning["include"] is None and not pruning["exclude"]:
        for key, width in _input_widths(cfg["model"]).items():
            if width % n_m[1]:
                raise ConfigError(
                    "recipe.pruning.pattern", pruning["pattern"],
                    f"groups of {n_m[1]} run along each layer's input and {key}={width} is not a multiple of "
                    f"{n_m[1]}; choose M dividing it or exclude those layers (recipe.pruning.exclude)",
                )


def _block_count(model: Mapping[str, Any]) -> Optional[int]:
    """The number of transformer blocks the model config says (None when only the model's files know)."""
    if model.get("_target_") == "orchestrator.models.gpt.GPT":
        return int(model["n_layer"])
    if model.get("_target_") == HF_MODEL and not model.get("pretrained_path"):
        config = model.get("config") or {}
        if model.get("model_type") == "gpt2":
            return int(config.get("n_layer", 12))
        if "num_hidden_layers" in config:
            return int(config["num_hidden_layers"])
    return None


def validate_drop_blocks(model: Mapping[str, Any], structured: Mapping[str, Any]) -> None:
    """recipe.structured.drop_blocks: a GPT or Hugging Face LM, at least one block left, calibration batches."""
    count = structured["drop_blocks"]
    if model.get("_target_") not in ("orchestrator.models.gpt.GPT", HF_MODEL):
        raise ConfigError(
            "recipe.structured.drop_blocks", count,
            f"removes transformer blocks of model=gpt, hf_causal_lm or hf_llama; the model is {model.get('_target_')}",
        )
    blocks = _block_count(model)
    if count < 0 or (blocks is not None and count >= blocks):
        allowed = f"0 <= drop_blocks < {blocks} (the model's blocks)" if blocks is not None else "drop_blocks >= 0"
        raise ConfigError("recipe.structured.drop_blocks", count, f"expected {allowed}")
    if structured["calibration_batches"] < 1:
        raise ConfigError("recipe.structured.calibration_batches", structured["calibration_batches"], "expected at least 1 batch")


def validate_quantization(recipe: Mapping[str, Any], cluster: Mapping[str, Any]) -> None:
    """recipe.method must have torchao kernels on recipe.device (int4 and fp8: CUDA only), and a local cuda device
    must exist: the quantize recipe runs in this (driver) process."""
    method, device = str(recipe["method"]), str(recipe["device"])
    if method in ("int4_weight_only", "fp8") and device != "cuda":
        raise ConfigError(
            "recipe.method", method,
            f"torchao has {method} kernels for CUDA only and recipe.device={device}; use recipe.device=cuda on a GPU "
            "machine, or int8_weight_only / int8_dynamic on CPU",
        )
    if device == "cuda" and cluster.get("kind") == "local":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("recipe.device", device, "this machine has no CUDA device; expected cpu")


def pruning_window(pruning: Mapping[str, Any], max_steps: int) -> tuple[int, int]:
    """The gradual schedule's (start step, end step), from fractions of trainer.max_steps."""
    return int(pruning["start_fraction"] * max_steps), int(pruning["end_fraction"] * max_steps)


def validate_standalone_references(cfg: Mapping[str, Any], paths_here: bool = True) -> None:
    """Outside a pipeline, every model reference the recipe reads (recipe.input, recipe.distill.teacher ...) must
    name an MLflow run or a directory; a required one must be given."""
    from orchestrator.config.reads import recipe_reads, recipe_value

    recipe = cfg["recipe"]
    for key, required in recipe_reads(recipe).values():
        value = recipe_value(recipe, key)
        if value is not None or required:
            validate_reference(f"recipe.{key}", value, paths_here=paths_here)


def validate_teacher_matches_student(key: str, teacher_model: Mapping[str, Any], student_model: Mapping[str, Any]) -> None:
    teacher, student = output_size(teacher_model), output_size(student_model)
    if teacher is not None and student is not None and teacher != student:
        raise ConfigError(
            key, teacher,
            f"the teacher's output has {teacher} classes/tokens but the student's has {student}; distillation "
            "matches the two output distributions, so both must predict the same label set",
        )


ALL_INPUTS = "all_inputs"  # recipe.distill.transfer_data: every training input of the stage's own data


def transfer_data_config(data: Mapping[str, Any]) -> dict[str, Any]:
    """`all_inputs`: the stage's data config with its label limit lifted, so the transfer set is every training
    input (the validation split stays out: the same split seed keeps it apart)."""
    transfer = dict(data)
    if "limit_train" in transfer:
        transfer["limit_train"] = None
    return transfer


def validate_transfer_data(
    option: str, transfer: Mapping[str, Any], data: Mapping[str, Any], model: Mapping[str, Any]
) -> None:
    """A transfer set's inputs go through the student (stacked with the labelled batch) and the teacher: same task,
    same input shape for classifiers, same vocabulary and block length for language models."""
    key = "recipe.distill.transfer_data"
    task = data.get("task")
    same_source = transfer.get("_target_") == data.get("_target_") and transfer.get("path") == data.get("path")
    split = ("split_seed", "val_fraction", "num_samples")
    if same_source and any(transfer.get(k) != data.get(k) for k in split):
        differ = ", ".join(f"{k} {transfer.get(k)} vs {data.get(k)}" for k in split if transfer.get(k) != data.get(k))
        raise ConfigError(
            key, option,
            f"the stage's own dataset split another way ({differ}) would put validation inputs in the transfer set; "
            f"use {ALL_INPUTS}, which keeps the stage's split",
        )
    if transfer.get("task") != task:
        raise ConfigError(key, option, f"is a {transfer.get('task')} dataset but the stage's data is {task}; the transfer set must be the same kind")
    if task == "classification":
        expected = list(model.get("input_shape") or data.get("input_shape") or [])
        got = list(transfer.get("input_shape") or [])
        if got != expected:
            raise ConfigError(key, option, f"its inputs have shape {got} but the student's have {expected}; expected a data option with the student's input shape, or {ALL_INPUTS}")
        return
    vocab = output_size(model) or data.get("vocab_size")
    if transfer.get("vocab_size") != vocab or transfer.get("tokenizer") != data.get("tokenizer"):
        raise ConfigError(
            key, option,
            f"its vocabulary (vocab_size={transfer.get('vocab_size')}, tokenizer={transfer.get('tokenizer')}) differs "
            f"from the student's (vocab_size={vocab}, tokenizer={data.get('tokenizer')}); teacher and student must "
            "read the same tokens",
        )
    if transfer.get("block_size") != data.get("block_size"):
        raise ConfigError(key, option, f"its blocks have {transfer.get('block_size')} tokens but the stage's data has {data.get('block_size')}; expected the same data.block_size")
