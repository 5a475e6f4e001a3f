"""Recipe `quantize`: post-training dynamic int8 quantization of a model's Linear layers, run on the driver.

`run_on_driver` (no Ray workers, no DeepSpeed: a few seconds of CPU), top to bottom:
  load       the input model (recipe.input: an MLflow run, a pipeline stage, a directory), fp32, from safetensors
  quantize   `orchestrator.compress.quantize_dynamic_int8`: int8 weights, activations quantized per batch
  evaluate   validation loss and accuracy (or perplexity) of the int8 model on CPU
  save       the fp32 weights + model.yaml + quantization.yaml: `load_exported` re-applies the (deterministic)
             quantization, so the int8 model is never stored as a pickle
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

from hydra.utils import instantiate

from orchestrator.artifacts.export import load_exported, mark_quantized
from orchestrator.artifacts.source import fetch_model_dir
from orchestrator.compress import quantize_dynamic_int8, serialized_size_bytes
from orchestrator.config.trust import trusted_model_targets
from orchestrator.train.objective import evaluate_module


def run_on_driver(config: Mapping[str, Any], sources: Mapping[str, Mapping[str, str]], out_dir: Path) -> dict[str, float]:
    recipe, trusted = config["recipe"], trusted_model_targets(config)
    with tempfile.TemporaryDirectory(prefix="orch-quantize-") as scratch:
        shutil.copytree(fetch_model_dir(sources["input"], scratch, trusted), out_dir, dirs_exist_ok=True)
    model = load_exported(out_dir, allowed=trusted)
    quantized = quantize_dynamic_int8(model, skip=recipe["skip"])
    mark_quantized(out_dir, recipe["skip"])
    data = instantiate(config["data"])
    metrics = evaluate_module(quantized, data.val, data.task, recipe["eval_batch_size"])
    metrics["size_bytes_fp32"] = float(serialized_size_bytes(model))
    metrics["size_bytes_int8"] = float(serialized_size_bytes(quantized))
    return metrics
