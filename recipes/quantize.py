"""Recipe `quantize`: post-training torchao quantization of a model's Linear layers, run on the driver.

`run_on_driver` (no Ray workers, no DeepSpeed: seconds to a minute of CPU), top to bottom:
  load       the input model (recipe.input: an MLflow run, a pipeline stage, a directory), fp32, from safetensors
  quantize   `orchestrator.compress.quantize_model` with recipe.method (int8_dynamic | int8_weight_only on CPU or
             CUDA; int4_weight_only | fp8 on CUDA) on recipe.device
  save       quantized.pt (torchao tensors, read back with weights_only=True) + quantization.yaml beside the fp32
             weights and model.yaml
  evaluate   the model as a consumer gets it: reloaded from the folder (`load_exported`), validation loss and
             accuracy (or perplexity); its checkpoint size against fp32; on CPU, one-thread latency of a batch
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

from hydra.utils import instantiate

from orchestrator.artifacts.export import QUANTIZED_FILE, load_exported, mark_quantized
from orchestrator.artifacts.source import fetch_model_dir
from orchestrator.compress.quantize import one_thread_latency_ms, quantize_model, save_quantized, serialized_size_bytes
from orchestrator.config.trust import trusted_model_targets
from orchestrator.train.data_order import example_inputs
from orchestrator.train.objective import evaluate_module


def run_on_driver(config: Mapping[str, Any], sources: Mapping[str, Mapping[str, str]], out_dir: Path) -> dict[str, float]:
    recipe, trusted = config["recipe"], trusted_model_targets(config)
    method, skip, device = recipe["method"], list(recipe["skip"]), recipe["device"]
    with tempfile.TemporaryDirectory(prefix="orch-quantize-") as scratch:
        shutil.copytree(fetch_model_dir(sources["input"], scratch, trusted), out_dir, dirs_exist_ok=True)
    model = load_exported(out_dir, quantized=False, allowed=trusted)
    save_quantized(quantize_model(model, method, skip, device), out_dir / QUANTIZED_FILE)
    mark_quantized(out_dir, skip, method, device)
    served = load_exported(out_dir, allowed=trusted)
    data = instantiate(config["data"])
    metrics = evaluate_module(served, data.val, data.task, recipe["eval_batch_size"], device=device)
    metrics["size_bytes_fp32"] = float(serialized_size_bytes(model))
    metrics["size_bytes_quantized"] = float(serialized_size_bytes(served))
    if method.startswith("int8"):
        metrics["size_bytes_int8"] = metrics["size_bytes_quantized"]  # the name runs before torchao logged
    if device == "cpu":
        example = example_inputs(data.val, count=8)
        metrics["latency_ms_fp32_1thread"] = one_thread_latency_ms(model, example)
        metrics["latency_ms_quantized_1thread"] = one_thread_latency_ms(served, example)
    return metrics
