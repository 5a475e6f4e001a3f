"""Recipe `evaluate`: measure a model on a data config's validation split, run on the driver (`orch eval MODEL`).

`run_on_driver` (no Ray workers, no DeepSpeed: CPU, in this process), top to bottom:
  load       the model (recipe.input: an MLflow run, a runs:/ or models:/ URI, a directory) from safetensors +
             model.yaml, checked against the trusted classes; a quantized model comes back quantized (its stage's
             recipe.method), as it is served
  evaluate   validation loss and accuracy (classifiers) or perplexity (language models): the same
             `evaluate_module` the quantize recipe and the pipeline's compression report use
Nothing is saved: the run holds the metrics, the config (recipe.input, data.*) as params, the data as its dataset
input and, as tags, the run (and registered version) it evaluated (orch.input_run_id, orch.input_model_uri).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from hydra.utils import instantiate

from orchestrator.artifacts.source import load_model
from orchestrator.config.trust import trusted_model_targets
from orchestrator.train.objective import evaluate_module


def run_on_driver(config: Mapping[str, Any], sources: Mapping[str, Mapping[str, str]], out_dir: Path) -> dict[str, float]:
    model, _ = load_model(sources["input"], trusted_model_targets(config))
    data = instantiate(config["data"])
    metrics = evaluate_module(model, data.val, data.task, config["recipe"]["eval_batch_size"])
    metrics["val_examples"] = float(len(data.val))
    return metrics
