"""Compression building blocks: pruning (unstructured, N:M, wanda, structured, depth), distillation, quantization.

Each technique is a pure function plus, where training must be steered, a small hook object implementing
``StepEndHook``. Components take flat typed arguments; recipes map their config onto them.
"""

from orchestrator.compress.depth import block_influence, drop_blocks
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
from orchestrator.compress.n_m_sparsity import n_m_masks, parse_pattern
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
from orchestrator.compress.quantize import (
    load_quantized,
    quantize_dynamic_int8,
    quantize_model,
    save_quantized,
    serialized_size_bytes,
)
from orchestrator.compress.structured import (
    count_parameters,
    prune_structured,
    pruned_model_config,
)
from orchestrator.compress.wanda import input_feature_norms, wanda_scores, weight_input_dims

__all__ = [
    "FeatureDistillation",
    "FixedMasks",
    "GradualPruning",
    "HiddenState",
    "MaskEnforcer",
    "StepEndHook",
    "StudentWithProjection",
    "block_influence",
    "count_parameters",
    "cubic_sparsity",
    "drop_blocks",
    "freeze_teacher",
    "input_feature_norms",
    "kd_loss",
    "load_quantized",
    "magnitude_masks",
    "masks_from_scores",
    "n_m_masks",
    "parse_pattern",
    "prunable_parameters",
    "prune_structured",
    "pruned_model_config",
    "quantize_dynamic_int8",
    "quantize_model",
    "realized_sparsity",
    "save_quantized",
    "serialized_size_bytes",
    "sparsity_table",
    "wanda_scores",
    "weight_input_dims",
    "transfer_kd_loss",
]
