"""Structured pruning: remove whole neurons/channels so the model is physically smaller and faster.

Unlike magnitude masks (``pruning.py``), which leave dense tensors full of zeros, this removes output neurons of
``nn.Linear`` and output channels of ``nn.Conv2d`` together with everything that depends on them (the next layer's
inputs, BatchNorm statistics, residual partners). Coupled layers are found by torch-pruning's ``DependencyGraph``,
traced once on ``example_inputs``; groups are ranked by L2 weight magnitude.

Use::

    small = prune_structured(model, example_inputs=batch[:2], ratio=0.3)   # ~30% of channels per layer removed
    count_parameters(model), count_parameters(small)
    ... fine-tune ``small`` (optionally distilling from ``model``, see distill.py) ...

Restoring a checkpoint of a pruned model: rebuild the dense architecture, call ``prune_structured`` with the same
``ratio``/``round_to``/``ignored_layers`` (shapes depend only on these, not on the weights, because each layer is
pruned by the same ratio), then ``load_state_dict``. For the built-in MLP and CNN, ``pruned_model_config`` writes
the smaller architecture as a config, which is how the `prune` recipe exports it (safetensors + model.yaml; no
pickled module).

Suggested settings: ratio 0.2-0.5 per round, each followed by fine-tuning (iterate for more); ``round_to=8`` on GPUs
so widths stay tensor-core friendly. Expect accuracy to drop before fine-tuning, far more than unstructured pruning
at the same parameter count.

DeepSpeed ZeRO and precision: prune *before* ``deepspeed.initialize`` (or between training phases on a gathered
fp32 model), never on an engine's module: the optimizer's flat buffers and master copies are sized for the old
shapes. Tracing runs ``example_inputs`` through the model on its device/dtype; use fp32 for tracing, any precision
for training the result. Any ZeRO stage then works on the smaller model.

Attention (the built-in GPT, or any module with a fused ``qkv`` Linear and ``n_head``/``head_dim`` attributes):
whole heads are removed, never dimensions inside a head, so every remaining head keeps its trained geometry.
torch-pruning ranks heads by the mean L2 magnitude of their q/k/v rows (``num_heads`` + ``prune_num_heads``) and
removes the matching input columns of the output projection; ``n_head`` is updated on the module afterwards. Per
block ``ceil(ratio * n_head)`` heads go, and ``ratio`` of the MLP's hidden units. The residual stream (``n_embd``,
shared by every block, the tied embeddings and each LayerNorm) keeps its width: the layers that write into it are
ignored by default, so the result is a GPT with per-layer ``n_heads``/``mlp_hidden`` (see ``pruned_model_config``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from orchestrator.compress.pruning import DEFAULT_HEAD_NAMES
from orchestrator.models.sizes import parameter_count as count_parameters  # tied tensors count once

__all__ = ["attention_modules", "count_parameters", "default_ignored_layers", "prune_structured", "pruned_model_config"]




def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Attention blocks whose heads can be pruned: a fused ``qkv`` Linear laid out as [q | k | v], each head-major,
    with ``n_head`` and ``head_dim`` attributes that the forward pass reads (the built-in GPT's layout)."""
    return {
        name: m for name, m in model.named_modules()
        if isinstance(getattr(m, "qkv", None), nn.Linear) and hasattr(m, "n_head") and hasattr(m, "head_dim")
    }


def _residual_writers(model: nn.Module) -> list[str]:
    """In a transformer, the attention output projection and the MLP's last Linear add into the residual stream;
    their output width is the model width, coupled to every block and the embeddings, so it is kept."""
    names = []
    for block_name, block in model.named_modules():
        attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
        if attn is None or not attention_modules(attn) or not isinstance(mlp, nn.Sequential):
            continue
        names.append(f"{block_name}.attn.proj")
        last = max(i for i, m in enumerate(mlp) if isinstance(m, nn.Linear))
        names.append(f"{block_name}.mlp.{last}")
    return names


def default_ignored_layers(model: nn.Module) -> list[str]:
    """Names of the layers whose output width is the model's output: modules named like a head, else the last
    Linear/Conv2d registered; plus, in transformers, the layers that write into the residual stream. A heuristic;
    ``prune_structured`` verifies the output shape afterwards."""
    prunable = [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    heads = [name for name, _ in prunable if name.rsplit(".", 1)[-1] in DEFAULT_HEAD_NAMES]
    if not heads and prunable:
        heads = [prunable[-1][0]]
    return heads + _residual_writers(model)


def _resolve(model: nn.Module, original: nn.Module, layers: Sequence[nn.Module | str]) -> list[nn.Module]:
    names_in_original = {id(m): name for name, m in original.named_modules()}
    resolved = []
    for layer in layers:
        name = layer if isinstance(layer, str) else names_in_original.get(id(layer))
        if name is None:
            raise ValueError(f"ignored layer {layer!r} is not a submodule of the model being pruned")
        resolved.append(model.get_submodule(name))
    return resolved


def _output_shapes(output: Any) -> Any:
    if torch.is_tensor(output):
        return tuple(output.shape)
    if isinstance(output, (list, tuple)):
        return tuple(_output_shapes(o) for o in output)
    if isinstance(output, dict):
        return {k: _output_shapes(v) for k, v in output.items()}
    return None


def prune_structured(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    ratio: float,
    ignored_layers: Sequence[nn.Module | str] | None = None,
    round_to: int | None = None,
    inplace: bool = False,
) -> nn.Module:
    """Return a copy of ``model`` with ``ratio`` of the output neurons/channels of each Linear/Conv2d removed.

    ``ignored_layers`` (modules or their names) keep their output width; by default the output head (see
    ``default_ignored_layers``), so the number of classes/vocab size is preserved. Raises RuntimeError if the
    output shape changed anyway, pointing at ``ignored_layers``. ``inplace=True`` avoids the copy for large models.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio={ratio!r} is outside the allowed range 0 <= ratio < 1")
    pruned = model if inplace else copy.deepcopy(model)
    # a transformer's residual width is never pruned (see module docstring), whatever else the caller ignores
    layers = default_ignored_layers(model) if ignored_layers is None else [*ignored_layers, *_residual_writers(model)]
    ignored = _resolve(pruned, model, layers)
    was_training = pruned.training
    pruned.eval()  # tracing must not update BatchNorm running statistics
    shapes_before = _output_shapes(_forward(pruned, example_inputs))
    attention = attention_modules(pruned)
    for name, m in attention.items():
        if math.ceil(ratio * m.n_head) >= m.n_head:
            raise ValueError(
                f"ratio={ratio} would remove all {m.n_head} heads of {name} (ceil(ratio * n_head) are removed); "
                f"use ratio < {(m.n_head - 1) / m.n_head:.3f}"
            )
    if ratio > 0:
        # no torch.no_grad here: torch-pruning traces the autograd graph to find coupled layers
        pruner = tp.pruner.BasePruner(
            pruned,
            example_inputs,
            importance=tp.importance.MagnitudeImportance(p=2),
            pruning_ratio=ratio,
            ignored_layers=ignored,
            round_to=round_to,
            num_heads={m.qkv: m.n_head for m in attention.values()},
            prune_num_heads=bool(attention),
            prune_head_dims=False,  # whole heads only: every kept head keeps its width
            head_pruning_ratio=ratio if attention else 0.0,
        )
        pruner.step()
        for m in attention.values():
            m.n_head = pruner.num_heads[m.qkv]
            if m.qkv.out_features != 3 * m.n_head * m.head_dim:
                raise RuntimeError(f"head pruning left {m.qkv.out_features} qkv outputs for {m.n_head} heads")
    shapes_after = _output_shapes(_forward(pruned, example_inputs))
    pruned.train(was_training)
    if shapes_after != shapes_before:
        raise RuntimeError(
            f"structured pruning changed the model output from {shapes_before} to {shapes_after}; "
            f"pass the output layer(s) in ignored_layers (ignored now: {layers})"
        )
    return pruned


@torch.no_grad()
def _forward(model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor]) -> Any:
    if torch.is_tensor(example_inputs):
        return model(example_inputs)
    return model(*example_inputs)


def pruned_model_config(model_cfg: dict[str, Any], pruned: nn.Module) -> dict[str, Any]:
    """The config that rebuilds ``pruned`` (a structurally pruned built-in MLP, CNN or GPT) with its smaller widths.

    Exported models are a config plus safetensors weights, never a pickled module, so the smaller architecture has
    to be expressible as a config. Raises ValueError for other models.
    """
    target = model_cfg.get("_target_", "")
    config = dict(model_cfg)
    if target == "orchestrator.models.mlp.MLP":
        config["hidden_sizes"] = [m.out_features for m in pruned.body if isinstance(m, nn.Linear)]
    elif target == "orchestrator.models.cnn.CNN":
        config["channels"] = [m.out_channels for m in pruned.features if isinstance(m, nn.Conv2d)]
        config["hidden_size"] = next(m.out_features for m in pruned.body if isinstance(m, nn.Linear))
    elif target == "orchestrator.models.gpt.GPT":
        config["head_dim"] = pruned.head_dim
        config["n_heads"] = [block.attn.n_head for block in pruned.blocks]
        config["mlp_hidden"] = [block.mlp[0].out_features for block in pruned.blocks]
    else:
        raise ValueError(f"no config can describe a structurally pruned {target or type(pruned).__name__}")
    return config
