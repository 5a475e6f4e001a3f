"""The benchmark workload shared by the baselines: model, data and DeepSpeed config, without orchestrator code.

The model classes are the only thing taken from the project (`orchestrator.models.*`, plain torch modules): the
workload must be the same network for the comparison to mean anything. Data are built here from the same sources
(scikit-learn's digits; the bundled text sample as byte tokens), and the DeepSpeed config is written out by hand the
way a user of DeepSpeed would, with the same values orch generates for the same settings.
"""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

TEXT_SAMPLE = Path(__file__).resolve().parents[2] / "orchestrator" / "data" / "sample.txt"
LR = 3e-3


def build_model(name: str, model_args: dict[str, Any]) -> nn.Module:
    if name == "mlp":
        from orchestrator.models.mlp import MLP

        return MLP(input_shape=(1, 8, 8), num_classes=10, **model_args)
    from orchestrator.models.gpt import GPT

    return GPT(vocab_size=256, **model_args)


def build_dataset(name: str, block_size: int = 64) -> TensorDataset:
    if name == "mlp":
        from sklearn.datasets import load_digits

        images, labels = load_digits(return_X_y=True)
        inputs = torch.tensor(images / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
        return TensorDataset(inputs, torch.tensor(labels, dtype=torch.long))
    tokens = torch.from_numpy(np.frombuffer(TEXT_SAMPLE.read_bytes(), dtype=np.uint8).astype(np.int64))
    blocks = (len(tokens) - 1) // block_size
    starts = torch.arange(blocks) * block_size
    windows = torch.stack([tokens[s : s + block_size + 1] for s in starts.tolist()])
    return TensorDataset(windows[:, :-1].contiguous(), windows[:, 1:].contiguous())


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def deepspeed_config(batch: int, workers: int, zero: int, precision: str, steps: int) -> dict[str, Any]:
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": batch,
        "gradient_accumulation_steps": 1,
        "train_batch_size": batch * workers,
        "zero_optimization": {"stage": zero},
        "steps_per_print": 10**9,
        "gradient_clipping": 1.0,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": LR, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0, "torch_adam": True},
        },
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": steps,
                "warmup_num_steps": 1,
                "warmup_min_ratio": 1.0,
                "cos_min_ratio": 0.0,
                "warmup_type": "linear",
            },
        },
    }
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    return config


def mark(path: str | None, event: str, **fields: Any) -> None:
    """The same JSON-lines events as orch's ORCH_TIMELINE, so one parser reads both."""
    if path:
        with open(path, "a") as handle:
            handle.write(json.dumps({"event": event, "t": time.time(), "pid": os.getpid(), **fields}) + "\n")


def write_step_times(path: str | None, stamps: list[float], first_step: int, cpu_stamps: list[float] | None = None) -> None:
    """Wall and process-CPU duration of every step, as orch's StepClock writes them."""
    if len(stamps) > 1:
        cpu = [b - a for a, b in zip(cpu_stamps, cpu_stamps[1:])] if cpu_stamps else []
        mark(path, "step_times", first_step=first_step + 1, durations=[b - a for a, b in zip(stamps, stamps[1:])], cpu_durations=cpu)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
