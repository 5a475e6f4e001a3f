"""Task losses and evaluation sums, shared by every recipe so that "loss" means the same thing everywhere."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor
from torch.nn import functional as F


def task_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy for classifiers ([B, C] vs [B]) and language models ([B, L, V] vs [B, L])."""
    if logits.dim() == 3:
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    return F.cross_entropy(logits.float(), targets)


def eval_sums(logits: Tensor, targets: Tensor) -> Tensor:
    """[loss sum, correct, count]: sums, so that ranks' shards combine with one all-reduce."""
    if logits.dim() == 3:
        logits, targets = logits.flatten(0, 1), targets.flatten()
    loss_sum = F.cross_entropy(logits.float(), targets, reduction="sum")
    correct = (logits.argmax(dim=-1) == targets).sum()
    return torch.stack([loss_sum.double(), correct.double(), torch.tensor(float(targets.numel()), dtype=torch.float64, device=loss_sum.device)])


def eval_metrics(sums: Tensor, task: str) -> dict[str, float]:
    loss = float(sums[0] / sums[2])
    if task == "lm":
        return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0))}
    return {"val_loss": loss, "val_accuracy": float(sums[1] / sums[2])}


@torch.no_grad()
def evaluate_module(
    model: torch.nn.Module, dataset, task: str, batch_size: int, device: Optional[str | torch.device] = None
) -> dict[str, float]:
    """Validation metrics of a plain module, in one process (the driver's view of an exported model). It runs where
    its weights are unless `device` says otherwise: a model quantized with CUDA-only kernels (int4, fp8) is loaded on
    CUDA. Floating inputs take the weights' dtype (fp8 quantizes a bf16 model; its unquantized layers stay bf16)."""
    from torch.utils.data import DataLoader

    model.eval()
    weights = next(model.parameters())
    device = device or weights.device
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    sums = torch.zeros(3, dtype=torch.float64)
    for inputs, targets in DataLoader(dataset, batch_size=batch_size):
        inputs = inputs.to(device)
        sums += eval_sums(model(inputs.to(dtype) if inputs.is_floating_point() else inputs), targets.to(device)).cpu()
    return eval_metrics(sums, task)
