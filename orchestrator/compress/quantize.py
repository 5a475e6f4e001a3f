"""Post-training dynamic int8 quantization of ``nn.Linear`` for CPU inference.

Weights are stored as int8 (per-tensor affine scale); activations are quantized on the fly per batch, so no
calibration data is needed. Linear-heavy models (MLPs, transformers) shrink ~4x on disk for their Linear weights and
usually run faster on x86/ARM CPUs; convolutions and embeddings stay fp32.

Use::

    model = train(...).cpu().eval()
    small = quantize_dynamic_int8(model)
    serialized_size_bytes(model), serialized_size_bytes(small)

Suggested settings: quantize the final (possibly pruned/distilled) fp32 model once, after training, and check
accuracy on the evaluation set; keep the output head in fp32 (``skip=["lm_head"]``) if the accuracy drop matters.

DeepSpeed ZeRO and precision: this is an export step, not a training technique. Consolidate the weights first
(``engine.module`` under ZeRO 0-2, or ``zero_to_fp32`` for ZeRO-3 checkpoints), move to CPU and cast to fp32; bf16/fp16
inputs are rejected by the quantized kernels. The result cannot be trained or wrapped by DeepSpeed, and only runs on
CPU.

Deprecation: ``torch.ao.quantization`` eager mode is deprecated upstream (it still works in torch 2.13 and emits a
DeprecationWarning); torchao's ``quantize_(model, Int8DynamicActivationInt8WeightConfig())`` is the migration path.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["quantize_dynamic_int8", "serialized_size_bytes"]


def quantize_dynamic_int8(model: nn.Module, skip: Sequence[str] = ()) -> nn.Module:
    """Return an int8-weight copy of ``model`` (the original is untouched); modules named in ``skip`` stay fp32."""
    float_model = copy.deepcopy(model).cpu().float().eval()
    skipped = set(skip)
    unknown = skipped - {name for name, _ in float_model.named_modules()}
    if unknown:
        raise ValueError(f"skip names {sorted(unknown)} are not submodules of the model")
    targets = {
        name
        for name, module in float_model.named_modules()
        if isinstance(module, nn.Linear) and name not in skipped
    }
    return torch.ao.quantization.quantize_dynamic(float_model, targets, dtype=torch.qint8)


def serialized_size_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``: the checkpoint size a user would ship."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes
