"""Typed schemas for every config group, registered in Hydra's ConfigStore.

Why dataclasses: Hydra merges each YAML onto its schema, so a typo'd key, a wrong type or a value outside an enum
fails during composition, naming the full key, before anything heavy is imported or Ray starts. Rules that span
several keys live in `orchestrator.config.validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


class Precision(str, Enum):
    auto = "auto"  # bf16 where the device supports it (CPU and Ampere+ GPUs), else fp32
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"  # GPU only: dynamic loss scaling


class OptimizerName(str, Enum):
    adamw = "adamw"
    sgd = "sgd"


class SchedulerName(str, Enum):
    constant = "constant"
    cosine = "cosine"
    linear = "linear"


class ClusterKind(str, Enum):
    local = "local"  # start a private Ray instance on this machine
    ray = "ray"  # connect to an existing Ray cluster at `address`


class OffloadDevice(str, Enum):
    none = "none"
    cpu = "cpu"
    nvme = "nvme"


class PlacementStrategy(str, Enum):
    PACK = "PACK"
    SPREAD = "SPREAD"
    STRICT_PACK = "STRICT_PACK"
    STRICT_SPREAD = "STRICT_SPREAD"


@dataclass
class OptimizerConfig:
    name: OptimizerName = OptimizerName.adamw
    lr: float = 3e-3
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    momentum: float = 0.9  # sgd only


@dataclass
class SchedulerConfig:
    name: SchedulerName = SchedulerName.cosine
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine: final lr as a fraction of the peak


@dataclass
class OffloadConfig:
    """ZeRO-Offload / ZeRO-Infinity: where DeepSpeed keeps optimizer states and parameters between uses."""

    optimizer: OffloadDevice = OffloadDevice.none  # needs trainer.zero_stage >= 1
    param: OffloadDevice = OffloadDevice.none  # needs trainer.zero_stage 3
    nvme_path: Optional[str] = None  # an existing, writable directory on a local NVMe drive; read when either is nvme


@dataclass
class TrainerConfig:
    # an int, or [MIN, MAX]: an elastic worker group (Ray Train) that starts with as many as fit and goes on with
    # fewer when a node is lost; checked by orchestrator.config.validate.worker_range
    num_workers: Any = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # only read when use_gpu
    placement_strategy: PlacementStrategy = PlacementStrategy.PACK
    # torch intra-op threads per worker; null = cpus_per_worker rounded down (Ray sets OMP_NUM_THREADS=1 otherwise)
    threads_per_worker: Optional[int] = None
    zero_stage: int = 0
    precision: Precision = Precision.auto
    micro_batch_size: int = 32
    grad_accum_steps: int = 1
    grad_clip: float = 1.0  # 0 disables clipping
    # recompute each transformer block's activations in the backward pass (GPT, Hugging Face LMs): less memory, ~1 more forward
    activation_checkpointing: bool = False
    max_steps: int = 300  # optimizer steps
    log_every: int = 10
    eval_every: int = 100  # 0: evaluate only at the end
    checkpoint_every: int = 100  # 0: checkpoint only at the end
    keep_checkpoints: int = 2
    max_failures: int = 2  # worker-group restarts Ray Train may make before the run fails
    seed: int = 0
    # GPU only: peak TFLOP/s of one device for the `mfu` metric; null = looked up by device name (orchestrator/train/mfu.py)
    peak_tflops: Optional[float] = None
    storage_path: Optional[str] = None  # checkpoints; null = ./orch_runs (use shared storage on a cluster)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    # per-worker memory `orch plan` checks its estimate against; null = the worker's GPU memory, or this machine's RAM
    memory_budget_gb: Optional[float] = None
    # raw DeepSpeed JSON, merged over the generated config for anything the schema does not cover
    deepspeed: Dict[str, Any] = field(default_factory=dict)
    # loop callbacks (orchestrator.train.callbacks.LoopCallback), each a `_target_` dict built on every worker:
    # fault injection, determinism probes, your own instrumentation. Your config only: never read from a run.
    callbacks: List[Any] = field(default_factory=list)


@dataclass
class ClusterConfig:
    kind: ClusterKind = ClusterKind.local
    address: Optional[str] = None  # kind=ray: "auto", "ray://host:10001" or "host:6379"; null reads RAY_ADDRESS
    num_cpus: Optional[int] = None  # kind=local: CPUs Ray may use; null = all of this machine's
    num_gpus: Optional[int] = None  # kind=local: GPUs Ray may use; null = CUDA_VISIBLE_DEVICES's, else nvidia-smi's
    env: Dict[str, str] = field(default_factory=dict)  # extra environment for the workers


@dataclass
class TrackingConfig:
    # null: MLFLOW_TRACKING_URI if set, else a local sqlite store ./mlflow.db (what `mlflow ui` opens by default)
    uri: Optional[str] = None
    experiment: Optional[str] = None  # null: MLFLOW_EXPERIMENT_NAME if set, else "orchestrator"
    artifact_location: Optional[str] = None  # local store only; null = ./mlartifacts
    system_metrics: bool = True
    log_model: bool = True  # the final model: safetensors + model.yaml, and an MLflow Model (model/mlflow_model)
    # at the end of a run (a pipeline: of its final stage), register its model as a new version of this name in
    # MLflow's Model Registry; null = no registration
    register_as: Optional[str] = None
    # set on the new version (moved from the previous one): models:/NAME@newest; "" = none. MLflow reserves "latest"
    # (models:/NAME/latest is the newest version anyway)
    alias: str = "newest"


@dataclass
class TrustConfig:
    """What your config trusts beyond orch's own classes (orchestrator.config.trust). Never read from an artifact."""

    # classes (dotted paths) a model.yaml / orch_model.yaml read from a folder, a run or a checkpoint may name,
    # besides orch's models and your config's own model._target_
    model_targets: List[str] = field(default_factory=list)


class RunsOn(str, Enum):
    workers = "workers"  # the module's train_loop_per_worker, on Ray Train workers (DeepSpeed)
    driver = "driver"  # the module's run_on_driver, in the driver process: no Ray is started for it


@dataclass
class ModelRead:
    """A model reference a recipe reads: where in `recipe` it sits, and whether the recipe cannot run without it."""

    key: str = MISSING  # dotted path under `recipe`, e.g. "input" or "distill.teacher"
    required: bool = False


@dataclass
class RecipeConfig:
    """What a recipe is and what it needs, as data: the library reads this and never imports a recipe to find out.

    `reads` maps a role to a model reference. The library knows two roles: `input`, the model the stage starts from
    (its architecture is the stage's model), and `teacher`, a model whose outputs the stage's model must match.
    """

    name: str = MISSING  # module under orchestrator.recipes that runs this config
    runs_on: RunsOn = RunsOn.workers
    reads: Dict[str, ModelRead] = field(default_factory=dict)


class PruningSchedule(str, Enum):
    none = "none"  # dense training
    one_shot = "one_shot"  # prune to `sparsity` before the first step, then train at fixed masks
    gradual = "gradual"  # cubic schedule (Zhu & Gupta 2017) between start/end_fraction, then fixed masks
    hold = "hold"  # keep the input model's zeros as the masks (fine-tuning a pruned model)


class PruningMethod(str, Enum):
    magnitude = "magnitude"  # |w|
    wanda = "wanda"  # |w| x input-feature L2 norm on calibration batches (recipe=prune only)


@dataclass
class PruningConfig:
    """Unstructured or N:M pruning as a hook of any training recipe (orchestrator.compress.pruning, wanda,
    n_m_sparsity)."""

    schedule: PruningSchedule = PruningSchedule.none
    method: PruningMethod = PruningMethod.magnitude
    pattern: str = "unstructured"  # or "N:M", e.g. "2:4": N of every M weights along the input dimension are kept
    calibration_batches: int = 8  # wanda: first batches of the stage's training data (trainer.micro_batch_size each)
    sparsity: float = 0.0  # final fraction of the selected weights set to zero, 0 <= sparsity < 1
    initial_sparsity: float = 0.0  # gradual: sparsity of the first pruning step
    scope: str = "layer"  # "layer": every tensor to `sparsity`; "global": one ranking over all selected weights
    include: Optional[List[str]] = None  # fnmatch patterns of parameter names; null = Linear/Conv weights but the head
    exclude: List[str] = field(default_factory=list)
    start_fraction: float = 0.0  # gradual: pruning starts at this fraction of trainer.max_steps
    end_fraction: float = 0.7  # gradual: `sparsity` is reached here; the remaining steps fine-tune at fixed masks
    updates: int = 20  # gradual: number of mask updates between start and end


@dataclass
class StructuredConfig:
    """Structured pruning (orchestrator.compress.structured): whole neurons/channels removed before training."""

    ratio: float = 0.0  # fraction of output neurons/channels removed from every Linear/Conv2d but the head; 0 = off
    round_to: Optional[int] = None  # keep widths a multiple of this (8 on GPUs)
    ignored_layers: Optional[List[str]] = None  # module names that keep their width; null = the output head
    # transformer blocks removed, least influential first (built-in GPT, HF GPT-2/Llama; orchestrator.compress.depth)
    drop_blocks: int = 0
    calibration_batches: int = 8  # drop_blocks: first batches of the training data that measure block influence


@dataclass
class LMStructuredConfig:
    """Structured pruning of Hugging Face causal LMs (orchestrator.compress.lm_structured), before training."""

    heads_ratio: float = 0.0  # fraction of every layer's attention heads removed (Llama-style models); 0 = off
    mlp_ratio: float = 0.0  # fraction of every layer's MLP hidden units removed; 0 = off


@dataclass
class DistillConfig:
    """Knowledge distillation (orchestrator.compress.distill); the teacher is never wrapped by DeepSpeed."""

    teacher: Optional[str] = None  # an MLflow run id (or runs:/ URI), a pipeline stage name, or a model/checkpoint dir
    temperature: float = 4.0
    alpha: float = 0.9  # weight of the soft (teacher) term; 1 - alpha weighs the hard labels
    feature_weight: float = 0.0  # > 0 adds feature distillation (MSE of hidden states) with this weight
    feature_layer: Optional[str] = None  # hidden state = the input of this module in both models; null = the head
    # Hinton's transfer set: inputs the teacher labels, on which the soft term runs (the hard term stays on the
    # labelled data): a data option (conf/data/) or "all_inputs" (every training input of the stage's data, labels
    # ignored, e.g. digits beyond data.limit_train); null = both terms on the labelled batches
    transfer_data: Optional[str] = None
    # the transfer set's data config, filled in by orch when it plans the stage (from transfer_data); not set by hand
    transfer: Optional[Dict[str, Any]] = None


@dataclass
class TrainRecipeConfig(RecipeConfig):
    name: str = "train"
    pruning: PruningConfig = field(default_factory=PruningConfig)


@dataclass
class PruneRecipeConfig(TrainRecipeConfig):
    name: str = "prune"
    reads: Dict[str, ModelRead] = field(default_factory=lambda: {"input": ModelRead("input", required=True)})
    input: Optional[str] = None  # the model to compress: an MLflow run id/URI, a pipeline stage name, or a dir
    structured: StructuredConfig = field(default_factory=StructuredConfig)
    lm_structured: LMStructuredConfig = field(default_factory=LMStructuredConfig)


@dataclass
class DistillRecipeConfig(TrainRecipeConfig):
    name: str = "distill"
    reads: Dict[str, ModelRead] = field(
        default_factory=lambda: {"teacher": ModelRead("distill.teacher", required=True), "input": ModelRead("input")}
    )
    input: Optional[str] = None  # optional: start the student from this model instead of fresh `model` weights
    distill: DistillConfig = field(default_factory=DistillConfig)


class QuantMethod(str, Enum):
    int8_dynamic = "int8_dynamic"  # int8 weights, activations quantized per token at run time
    int8_weight_only = "int8_weight_only"  # int8 weights, full-precision activations
    int4_weight_only = "int4_weight_only"  # int4 weights in groups of 128: CUDA only
    fp8 = "fp8"  # float8 weights and activations: CUDA only


class QuantDevice(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


@dataclass
class QuantizeRecipeConfig(RecipeConfig):
    name: str = "quantize"
    runs_on: RunsOn = RunsOn.driver
    reads: Dict[str, ModelRead] = field(default_factory=lambda: {"input": ModelRead("input", required=True)})
    input: Optional[str] = None  # the fp32 model to quantize: an MLflow run id/URI, a pipeline stage name, or a dir
    method: QuantMethod = QuantMethod.int8_dynamic  # torchao config applied to every Linear (orchestrator.compress.quantize)
    device: QuantDevice = QuantDevice.cpu  # where the driver quantizes, evaluates and serves it; int4/fp8 need cuda
    skip: List[str] = field(default_factory=list)  # Linear modules kept in fp32 (e.g. the head)
    eval_batch_size: int = 256


@dataclass
class EvaluateRecipeConfig(RecipeConfig):
    name: str = "evaluate"
    runs_on: RunsOn = RunsOn.driver
    reads: Dict[str, ModelRead] = field(default_factory=lambda: {"input": ModelRead("input", required=True)})
    # the model to evaluate: an MLflow run id/URI, models:/NAME@alias or models:/NAME/VERSION, or a model folder
    input: Optional[str] = None
    eval_batch_size: int = 256


@dataclass
class PipelineRecipeConfig(RecipeConfig):
    name: str = "pipeline"


@dataclass
class PipelineStageConfig:
    name: str = MISSING  # referenced by later stages' `input`/`teacher`
    kind: str = MISSING  # the recipe option this stage composes (conf/recipe/<kind>.yaml): train, prune, distill ...
    input: Optional[str] = None  # stage name (or run id/dir) whose model this stage starts from -> recipe.input
    teacher: Optional[str] = None  # distill: stage name (or run id/dir) of the teacher -> recipe.distill.teacher
    overrides: List[str] = field(default_factory=list)  # Hydra overrides for this stage, after pipeline.overrides


@dataclass
class QualityGate:
    """The final model's quality may fall at most `max_drop` below stage `vs`'s (both measured by the report)."""

    vs: Optional[str] = None  # a stage of this pipeline; null = the first stage
    metric: str = "val_accuracy"  # val_accuracy (higher is better) or, for language models, val_perplexity (lower)
    max_drop: Optional[float] = None  # 0.02 = 2 accuracy points; perplexity: the allowed increase; null = no gate


@dataclass
class RatioGate:
    """Stage `vs`'s size (or latency) divided by the final model's must be at least `min` (4.0: four times smaller)."""

    vs: Optional[str] = None  # a stage of this pipeline; null = the first stage
    min: Optional[float] = None  # null = no gate


@dataclass
class PromoteConfig:
    """Register the final stage's model and move `alias` to it only if every gate passes (orchestrator.pipeline.promote)."""

    register_as: Optional[str] = None  # registered model name in MLflow's Model Registry; null = no promotion gate
    alias: str = "champion"  # moved to the new version when every gate passes; left where it was otherwise
    max_quality_drop: QualityGate = field(default_factory=QualityGate)
    min_size_ratio: RatioGate = field(default_factory=RatioGate)  # on the report's size (state dict as shipped)
    min_latency_ratio: RatioGate = field(default_factory=RatioGate)  # on the report's one-thread CPU batch latency


@dataclass
class PipelineConfig:
    name: str = MISSING
    overrides: List[str] = field(default_factory=list)  # Hydra overrides every stage starts from
    stages: List[PipelineStageConfig] = MISSING
    cache: bool = True  # reuse a finished stage whose config and inputs are unchanged
    report_batch_size: int = 256  # batch of the CPU latency measurement in the compression report
    promote: PromoteConfig = field(default_factory=PromoteConfig)  # a promotion gate for the final model


class SearchAlgorithm(str, Enum):
    random = "random"  # Ray Tune's BasicVariantGenerator: independent samples (and every grid combination)
    grid = "grid"  # the same generator; every dimension must be a grid or a choice (expanded as a grid)
    optuna = "optuna"  # Optuna TPE through ray.tune.search.optuna.OptunaSearch (no grid dimensions)


class SweepMode(str, Enum):
    min = "min"
    max = "max"


@dataclass
class SweepSchedulerConfig:
    name: str = "none"  # "none" (every trial runs to trainer.max_steps) or "asha" (early stopping)
    grace_period: Optional[int] = None  # asha: steps before a trial can be stopped; null = trainer.checkpoint_every
    reduction_factor: float = 2.0  # asha: keep the best 1/reduction_factor of the trials at each rung


@dataclass
class SweepConfig:
    """A Ray Tune search over any config keys; every trial is a full `orch run` of the base recipe."""

    name: str = MISSING
    overrides: List[str] = field(default_factory=list)  # Hydra overrides every trial starts from (the base recipe)
    # dotted config key -> one distribution: {loguniform: [lo, hi]}, {uniform: [lo, hi]}, {int: [lo, hi]}
    # (inclusive), {choice: [a, b, ...]} or {grid: [a, b, ...]}
    space: Dict[str, Any] = field(default_factory=dict)
    metric: str = "val_accuracy"  # a metric the recipe reports at its checkpoints (val_accuracy, val_loss, loss, ...)
    mode: SweepMode = SweepMode.max
    # several metrics at once, metric -> max|min (at least 2): the sweep's outcome is their Pareto front, and
    # sweep.metric/mode are not used; null = one metric (sweep.metric, sweep.mode). Typed Any so that the command line
    # can set a whole mapping (sweep.objectives={a: max, b: min}); its shape is checked by the sweep's plan
    objectives: Any = None
    num_samples: int = 4  # trials (with grid dimensions: repeats of the whole grid)
    max_concurrent_trials: Optional[int] = None  # null = as many as the cluster's CPUs/GPUs hold at once
    search: SearchAlgorithm = SearchAlgorithm.random
    seed: Optional[int] = 0  # seeds the search algorithm, so a sweep's trial configs repeat
    points_to_evaluate: List[Dict[str, Any]] = field(default_factory=list)  # configs tried first (key -> value)
    scheduler: SweepSchedulerConfig = field(default_factory=SweepSchedulerConfig)


# Models and data: one schema per built-in option, so each option's own keys are checked.
@dataclass
class MLPConfig:
    _target_: str = "orchestrator.models.mlp.MLP"
    input_shape: List[int] = MISSING
    num_classes: int = MISSING
    hidden_sizes: List[int] = field(default_factory=lambda: [128, 128])
    dropout: float = 0.0


@dataclass
class CNNConfig:
    _target_: str = "orchestrator.models.cnn.CNN"
    input_shape: List[int] = MISSING
    num_classes: int = MISSING
    channels: List[int] = field(default_factory=lambda: [16, 32])
    hidden_size: int = 64
    dropout: float = 0.0


@dataclass
class GPTConfig:
    _target_: str = "orchestrator.models.gpt.GPT"
    vocab_size: int = MISSING
    block_size: int = MISSING
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    dropout: float = 0.0
    # Written by structured pruning for the smaller model it exports (per layer); leave unset otherwise.
    head_dim: Optional[int] = None
    n_heads: Optional[List[int]] = None
    mlp_hidden: Optional[List[int]] = None


@dataclass
class HFCausalLMConfig:
    """A transformers causal LM (orchestrator.models.hf_causal_lm): from model_type + config, or a local directory."""

    _target_: str = "orchestrator.models.hf_causal_lm.HFCausalLM"
    model_type: Optional[str] = "gpt2"  # any AutoConfig model type; ignored with pretrained_path
    config: Dict[str, Any] = field(default_factory=dict)  # that architecture's own config keys (sizes, dropout)
    vocab_size: Optional[int] = None  # overrides config.vocab_size (null: the config's or the pretrained model's)
    block_size: Optional[int] = None  # overrides the maximum positions
    pretrained_path: Optional[str] = None  # a local save_pretrained directory; never downloaded


@dataclass
class DigitsConfig:
    _target_: str = "orchestrator.data.digits.load_digits_splits"
    task: str = "classification"
    input_shape: List[int] = field(default_factory=lambda: [1, 8, 8])
    num_classes: int = 10
    val_fraction: float = 0.2
    split_seed: int = 0
    limit_train: Optional[int] = None  # keep only this many training examples (limited-label experiments)


@dataclass
class SyntheticConfig:
    _target_: str = "orchestrator.data.synthetic.make_classification_splits"
    task: str = "classification"
    num_samples: int = 2048
    num_features: int = 32
    input_shape: List[int] = field(default_factory=lambda: [32])
    num_classes: int = 4
    val_fraction: float = 0.2
    split_seed: int = 0


@dataclass
class TextConfig:
    _target_: str = "orchestrator.data.text.load_text_splits"
    task: str = "lm"
    path: str = MISSING
    block_size: int = 64
    vocab_size: int = 256  # byte-level: every byte is a token
    val_fraction: float = 0.1
    tokenizer: Optional[str] = None  # a local Hugging Face tokenizer directory; null = bytes (vocabulary 256)
    text_field: str = "text"  # .jsonl files: the field that holds the text
    streaming: bool = False  # read the files as a stream (larger than memory); validation = the first val_blocks
    val_blocks: int = 64  # streaming only: blocks held out for validation
    shuffle_buffer: int = 1000  # streaming only: examples in the shuffle buffer (0 = file order)


@dataclass
class OrchConfig:
    recipe: Any = MISSING
    model: Any = MISSING
    data: Any = MISSING
    trainer: TrainerConfig = MISSING
    cluster: ClusterConfig = MISSING
    tracking: TrackingConfig = MISSING
    trust: TrustConfig = field(default_factory=TrustConfig)
    # run name: [A-Za-z0-9._-], no leading dot, at most 128 characters; null = <recipe>-<timestamp>-<hex>; a name
    # already used is refused
    name: Optional[str] = None
    resume: Optional[str] = None  # name (not a path) of an earlier run to continue from its last checkpoint
    pipeline: Optional[PipelineConfig] = None  # recipe=pipeline only (conf/pipeline/)
    sweep: Optional[SweepConfig] = None  # `orch sweep` only (conf/sweep/)


def register_schemas() -> None:
    cs = ConfigStore.instance()
    cs.store(name="orch_schema", node=OrchConfig)
    cs.store(group="schema/recipe", name="recipe", node=RecipeConfig)
    cs.store(group="schema/recipe", name="train", node=TrainRecipeConfig)
    cs.store(group="schema/recipe", name="prune", node=PruneRecipeConfig)
    cs.store(group="schema/recipe", name="distill", node=DistillRecipeConfig)
    cs.store(group="schema/recipe", name="quantize", node=QuantizeRecipeConfig)
    cs.store(group="schema/recipe", name="evaluate", node=EvaluateRecipeConfig)
    cs.store(group="schema/recipe", name="pipeline", node=PipelineRecipeConfig)
    cs.store(group="schema/pipeline", name="pipeline", node=PipelineConfig)
    cs.store(group="schema/sweep", name="sweep", node=SweepConfig)
    cs.store(group="schema/trainer", name="trainer", node=TrainerConfig)
    cs.store(group="schema/cluster", name="cluster", node=ClusterConfig)
    cs.store(group="schema/tracking", name="tracking", node=TrackingConfig)
    cs.store(group="schema/model", name="mlp", node=MLPConfig)
    cs.store(group="schema/model", name="cnn", node=CNNConfig)
    cs.store(group="schema/model", name="gpt", node=GPTConfig)
    cs.store(group="schema/model", name="hf_causal_lm", node=HFCausalLMConfig)
    cs.store(group="schema/data", name="digits", node=DigitsConfig)
    cs.store(group="schema/data", name="synthetic", node=SyntheticConfig)
    cs.store(group="schema/data", name="text", node=TextConfig)


register_schemas()
