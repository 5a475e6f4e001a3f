"""Every exported model as an MLflow Model too: pytorch flavour, `pt2` format, with a signature and an input example.

Why `pt2` (torch.export) and not MLflow's default pickle: a pickled module names its class, so loading it imports
orchestrator (or transformers) and runs whatever the pickle says. A `pt2` archive is a traced graph plus raw tensors:
`mlflow.pytorch.load_model` rebuilds it with torch alone (no orchestrator, no transformers installed) and, since
MLflow 3.17, checks that the archive holds no pickle before loading it. The batch dimension, and a language model's
sequence length up to its block size, stay dynamic (`Dim.AUTO` on the signature's -1 dimensions).

orch itself never loads this folder (the trust boundary): its own loading is model.safetensors + model.yaml
(`orchestrator.artifacts.export.load_exported`). The MLflow Model is what the Model Registry, `mlflow models serve`
and other tools read.

A quantized model (recipe=quantize) goes out as its fp32 weights, marked in the MLmodel metadata (method, skipped
layers): the pt2 archive is torch.export's, which does not serialize torchao's quantized tensor subclasses.
`load_exported` returns the quantized model from the folder's quantized.pt and quantization.yaml.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
import yaml
from torch import nn

from orchestrator.artifacts.export import CONFIG_FILE, QUANTIZATION_FILE, load_exported
from orchestrator.config.trust import BUILT_IN_MODEL_TARGETS

MLFLOW_MODEL_DIR = "mlflow_model"  # inside the run's `model` artifact: register runs:/<id>/model/mlflow_model
EXAMPLE_COUNT = 2  # > 1: torch.export specializes a dimension of size 1, and the batch dimension must stay dynamic


def input_example(data_cfg: Mapping[str, Any], count: int = EXAMPLE_COUNT) -> torch.Tensor:
    """The inputs of the first `count` validation examples of the run's data, as one batch."""
    from hydra.utils import instantiate

    data = instantiate(dict(data_cfg))
    return torch.stack([data.val[index][0] for index in range(count)])


def model_signature(model: nn.Module, example: torch.Tensor) -> Any:
    """Inputs and outputs as tensor specs; -1 marks the dimensions that vary: the batch, and a language model's
    sequence length (integer token inputs)."""
    import numpy as np
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    with torch.no_grad():
        output = model(example)
    tokens = not example.is_floating_point()
    input_shape = (-1, -1) if tokens else (-1, *example.shape[1:])
    output_shape = (-1, -1, *output.shape[2:]) if tokens else (-1, *output.shape[1:])
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(str(example.numpy().dtype)), input_shape, "inputs")]),
        outputs=Schema([TensorSpec(np.dtype(str(output.numpy().dtype)), output_shape, "logits")]),
    )


def save_mlflow_model(
    model_dir: str | Path, example: torch.Tensor, allowed: Iterable[str] = BUILT_IN_MODEL_TARGETS
) -> Path:
    """Write `<model_dir>/mlflow_model` from the exported weights in `model_dir` (safetensors + model.yaml, read
    with `load_exported`, so the class is checked against `allowed` first). Replaces one copied from an input."""
    import mlflow.pytorch

    model_dir = Path(model_dir)
    target = model_dir / MLFLOW_MODEL_DIR
    if target.exists():
        shutil.rmtree(target)
    model = load_exported(model_dir, quantized=False, allowed=allowed)
    metadata: dict[str, Any] = {"orch_model": yaml.safe_load((model_dir / CONFIG_FILE).read_text())}
    quantization = model_dir / QUANTIZATION_FILE
    if quantization.is_file():
        metadata["orch_quantization"] = {
            **yaml.safe_load(quantization.read_text()),
            "note": "the weights here are fp32: torch.export cannot trace torchao quantized layers",
        }
    mlflow.pytorch.save_model(
        model,
        str(target),
        serialization_format="pt2",
        signature=model_signature(model, example),
        input_example=example.numpy(),
        # given, not inferred: inference imports the model in a subprocess (seconds); a pt2 archive needs torch only
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        metadata=metadata,
    )
    return target
