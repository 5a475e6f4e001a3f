"""Recipe `distill`: a student (under DeepSpeed) learns from a frozen teacher's soft predictions (Hinton et al.).

`train_loop_per_worker` runs on every Ray Train worker, top to bottom:
  setup    data; the teacher (recipe.distill.teacher: an MLflow run, a pipeline stage, a directory) loaded from
           safetensors, frozen, in eval mode, fp32 on every rank's device and NOT wrapped by DeepSpeed; the student from the
           model group (or from recipe.input); with feature_weight > 0, a projection trained with the student to
           match the teacher's hidden state; DeepSpeed engine on the student only; optional pruning hook
  fit      the train recipe's loop with the KD objective:
           alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, labels) [+ w * feature MSE],
           token-level for language models (`orchestrator.compress.kd_loss`); with a transfer set
           (recipe.distill.transfer_data) the KL term runs on a batch of its inputs and the CE term on the labelled
           batch, both through one student forward (`orchestrator.compress.transfer_kd_loss`)

ZeRO and precision: any ZeRO stage (0-3) and precision for the student; the teacher's forward is fp32 under
torch.no_grad and the logits are compared in fp32. Only the student's weights are exported.
Under ZeRO-3 the student is built partitioned (`orchestrator.train.construction`) and the teacher stays a full
replica on every rank: it is frozen and only runs forward, so partitioning it would add two all-gathers per layer
per micro-batch to save the memory of one inference-only copy. Feature distillation is refused under ZeRO-3 (it
runs the student outside DeepSpeed once to learn its hidden width).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from hydra.utils import instantiate
from orchestrator.recipes.train import fit
from torch import Tensor

from orchestrator.artifacts.source import load_model
from orchestrator.compress import (
    FeatureDistillation,
    HiddenState,
    StudentWithProjection,
    freeze_teacher,
    kd_loss,
    transfer_kd_loss,
)
from orchestrator.config.trust import trusted_model_targets
from orchestrator.train.compression import pruning_hook
from orchestrator.train.data_order import example_inputs
from orchestrator.train.construction import build_model, enable_activation_checkpointing
from orchestrator.train.engine import build_engine, worker_deepspeed_config
from orchestrator.train.steps import start_worker, to_engine


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    cfg, trainer, recipe = loop_config["config"], loop_config["config"]["trainer"], loop_config["config"]["recipe"]
    settings, sources = recipe["distill"], loop_config["sources"]
    start_worker(loop_config)
    data = instantiate(cfg["data"])
    # the transfer set's labels, if it has any, are never read: the teacher labels its inputs
    transfer = instantiate(settings["transfer"]).train if settings.get("transfer") else None
    trusted = trusted_model_targets(cfg)
    teacher, _ = load_model(sources["teacher"], trusted)
    freeze_teacher(teacher)
    ds_config = worker_deepspeed_config(loop_config)
    if "input" in sources:  # continue from a trained (e.g. structurally pruned) student
        student, student_cfg = load_model(sources["input"], trusted)
        if trainer["activation_checkpointing"]:
            enable_activation_checkpointing(student)
    else:  # after the teacher: under ZeRO-3 only the student is built partitioned
        student, student_cfg = build_model(cfg["model"], ds_config, trainer["activation_checkpointing"]), cfg["model"]
    student.train()

    model, spec = student, {"model": student_cfg, "state_prefix": ""}
    if settings["feature_weight"] > 0:
        layer = settings["feature_layer"] or _output_layer(student)
        teacher_hidden, student_hidden = HiddenState(teacher, layer), HiddenState(student, layer)
        with torch.no_grad():  # one forward of each to learn the two hidden widths
            example = example_inputs(data.train)
            teacher(example), student(example)
        widths = student_hidden.value.shape[-1], teacher_hidden.value.shape[-1]
        model = StudentWithProjection(student, FeatureDistillation(*widths))
        spec["state_prefix"] = StudentWithProjection.STATE_PREFIX
    engine = build_engine(model, ds_config, trainer["optimizer"], precision_auto=False)
    teacher.to(engine.device)  # beside the student: on a GPU worker, a CPU teacher fails (and would starve the GPU)

    def objective(inputs: Tensor, targets: Tensor, transfer_inputs: Optional[Tensor] = None) -> Tensor:
        if transfer_inputs is None:
            with torch.no_grad():
                teacher_logits = teacher(inputs.to(engine.device))  # fp32 inputs: before the student's cast
            logits, labels = engine(to_engine(engine, inputs)), to_engine(engine, targets)
            loss = kd_loss(logits, teacher_logits, labels, settings["temperature"], settings["alpha"])
        else:
            # one student forward over labelled + transfer inputs; the teacher sees the transfer part (all of it
            # when hidden states are matched, so that both hidden states cover the same examples)
            labelled = inputs.shape[0]
            both = torch.cat([inputs, transfer_inputs])
            with torch.no_grad():
                teacher_logits = teacher((both if settings["feature_weight"] > 0 else transfer_inputs).to(engine.device))
            logits = engine(to_engine(engine, both))
            loss = transfer_kd_loss(
                logits[labelled:], teacher_logits[-transfer_inputs.shape[0]:], logits[:labelled],
                to_engine(engine, targets), settings["temperature"], settings["alpha"],
            )
        if settings["feature_weight"] > 0:
            feature_loss = engine.module.features(student_hidden.value, teacher_hidden.value)
            loss = loss + settings["feature_weight"] * feature_loss
        return loss

    hook = pruning_hook(student, recipe["pruning"], trainer["max_steps"], engine.optimizer)
    hooks = {"sparsity": hook} if hook else {}
    fit(engine, data, loop_config, objective=objective, hooks=hooks, model_spec=spec, unlabelled=transfer)


def _output_layer(model: torch.nn.Module) -> str:
    """The last module with parameters (the output head): its input is the penultimate hidden state."""
    owners = [name for name, module in model.named_modules() if name and list(module.parameters(recurse=False))]
    return owners[-1]
