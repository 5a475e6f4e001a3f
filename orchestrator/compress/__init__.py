"""Compression building blocks: pruning (unstructured and structured), distillation, int8 quantization.

Each technique is a pure function plus, where training must be steered, a small hook object implementing
``StepEndHook``. Components take flat typed arguments; recipes map their config onto them.
"""

from orchestrator.compress.distill import (
    FeatureDistillation,
    HiddenState,
    StudentWithProjection,
    freeze_teacher,
    kd_loss,
    transfer_kd_loss,
)
from orchestrator.compress.fixed_masks import FixedMasks
from orchestrator.compress.mask_enforcer import MaskEnforcer
from orchestrator.compress.protocols import StepEndHook
from orchestrator.compress.pruning import (
    GradualPruning,
    cubic_sparsity,
    magnitude_masks,
    masks_from_scores,
    prunable_parameters,
    realized_sparsity,
    sparsity_table,
)
from orchestrator.compress.quantize import quantize_dynamic_int8, serialized_size_bytes
from orchestrator.compress.structured import (
    count_parameters,
    prune_structured,
    pruned_model_config,
)

__all__ = [
    "FeatureDistillation",
    "FixedMasks",
    "GradualPruning",
    "HiddenState",
    "MaskEnforcer",
    "StepEndHook",
    "StudentWithProjection",
    "count_parameters",
    "cubic_sparsity",
    "freeze_teacher",
    "kd_loss",
    "magnitude_masks",
    "masks_from_scores",
    "prunable_parameters",
    "prune_structured",
    "pruned_model_config",
    "quantize_dynamic_int8",
    "realized_sparsity",
    "serialized_size_bytes",
    "sparsity_table",
    "transfer_kd_loss",
]
