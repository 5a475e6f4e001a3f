"""Calibration-aware pruning scores (Wanda, Sun et al. 2023): |W_ij| × ||X_j||₂, the weight's magnitude times the L2
norm of the input feature it multiplies, over the tokens of a few calibration batches.

Why: in language models a few input features carry activations orders of magnitude larger than the rest, so a
small weight on such a feature matters more than a large weight on a quiet one; magnitude alone prunes it. Wanda
needs no gradients and no weight update, only forward passes.

Use::

    params = prunable_parameters(model)
    norms = input_feature_norms(model, params, batches)         # forward pre-hooks, model unchanged
    scores = wanda_scores(params, norms, weight_input_dims(model, params))
    masks = masks_from_scores(scores, 0.5, "layer")             # or n_m_masks(scores, 2, 4, dims)

Suggested settings: 8-32 calibration batches of the training data; 50% unstructured or 2:4, then fine-tune at fixed
masks. The norms are measured once, on the model before pruning; a gradual schedule reuses them at each update
(activations drift little over a short fine-tune). Scores are ranked per tensor (scope=layer) or over all tensors
(global); the paper's per-output-row comparison is what N:M groups give along the input dimension.

Layers: nn.Linear (weight [out, in]) and transformers' Conv1D (GPT-2; weight [in, out]: the input dimension is 0).
DeepSpeed: the norms are computed on the fp32 model before `deepspeed.initialize`, identically on every rank (same
weights, same first batches), so every rank picks the same masks without communication.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from orchestrator.compress.calibration import calibrate

__all__ = ["input_feature_norms", "wanda_scores", "weight_input_dims"]


def _owner(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name.rpartition(".")[0])


def weight_input_dims(model: nn.Module, params: Mapping[str, Tensor]) -> dict[str, int]:
    """For each weight, the dimension that indexes the layer's input features: 1 for nn.Linear, 0 for GPT-2's
    Conv1D. Other layer types raise ValueError (their inputs are not features along the last axis)."""
    from transformers.pytorch_utils import Conv1D

    dims = {}
    for name in params:
        module = _owner(model, name)
        if isinstance(module, nn.Linear):
            dims[name] = 1
        elif isinstance(module, Conv1D):
            dims[name] = 0
        else:
            raise ValueError(
                f"recipe.pruning: {name} belongs to a {type(module).__name__}; wanda scores and N:M patterns apply to "
                "nn.Linear and Conv1D weights (exclude it with recipe.pruning.exclude)"
            )
    return dims


@torch.no_grad()
def input_feature_norms(model: nn.Module, params: Mapping[str, Tensor], batches: Iterable[Tensor]) -> dict[str, Tensor]:
    """L2 norm of every input feature of each weight's layer over all tokens of `batches` (model in eval mode,
    restored afterwards). A layer that never ran raises ValueError: its weights would have no score."""
    squares: dict[str, Tensor] = {}
    handles = []
    for name in params:
        def accumulate(module: nn.Module, args: tuple, name: str = name) -> None:
            features = args[0].detach().float().reshape(-1, args[0].shape[-1])
            squares[name] = squares.get(name, 0) + features.pow(2).sum(dim=0)

        handles.append(_owner(model, name).register_forward_pre_hook(accumulate))
    calibrate(model, batches, handles)
    silent = sorted(set(params) - set(squares))
    if silent:
        raise ValueError(f"no calibration input reached {silent}: wanda cannot score them")
    return {name: total.sqrt() for name, total in squares.items()}


def wanda_scores(params: Mapping[str, Tensor], norms: Mapping[str, Tensor], input_dims: Mapping[str, int]) -> dict[str, Tensor]:
    """|W| × input-feature norm, broadcast along each weight's input dimension (lower = pruned first)."""
    scores = {}
    for name, weight in params.items():
        norm = norms[name].to(weight.device)
        norm = norm[None, :] if input_dims[name] == 1 else norm[:, None]
        scores[name] = weight.detach().abs().float() * norm
    return scores
