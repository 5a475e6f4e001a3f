"""Depth pruning: remove the transformer blocks that change the hidden states least (Men et al. 2024, "ShortGPT":
block influence = 1 - cosine similarity between a block's input and output hidden states, averaged over tokens).

Use::

    influence = block_influence(model, batches)      # one number per block, on calibration batches
    smaller, model_cfg = drop_blocks(model, model_cfg, 2, batches)   # a fresh model with n_layer - 2 blocks

Why: deep LMs carry blocks that nearly pass their input through (cosine ~0.99 in the middle layers of trained
LLMs); removing whole blocks shortens the sequential path, so it saves latency as well as memory, unlike width
pruning. Suggested settings: drop 10-25% of the blocks, then fine-tune or distill; combine with heads/MLP width
pruning in the same stage (blocks go first, widths are then chosen on the shorter model).

Supported: the built-in GPT (`model.blocks`; its config's per-layer lists shrink with it) and Hugging Face GPT-2
and Llama-style models (`transformer.h` / `model.layers`; `n_layer` / `num_hidden_layers` reduced). The smaller
model is rebuilt from its own config and the kept blocks' weights are copied in (`load_state_dict(strict=True)`),
so it exports and reloads like any model: no masks. Runs on the fp32 model before DeepSpeed; the same batches and
weights on every rank give the same choice.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from orchestrator.compress.calibration import calibrate

__all__ = ["block_influence", "drop_blocks", "transformer_blocks"]

GPT_TARGET = "orchestrator.models.gpt.GPT"


def _blocks_and_prefix(model: nn.Module) -> tuple[nn.ModuleList, str, str]:
    """(blocks, state-dict prefix of block i, config key of the block count) for the supported models."""
    from orchestrator.models.gpt import GPT
    from orchestrator.models.hf_causal_lm import HFCausalLM

    if isinstance(model, GPT):
        return model.blocks, "blocks", "n_layer"
    if isinstance(model, HFCausalLM):
        hf = model.hf
        if hf.config.model_type == "gpt2":
            return hf.transformer.h, "hf.transformer.h", "n_layer"
        if hasattr(hf, "model") and hasattr(hf.model, "layers"):
            return hf.model.layers, "hf.model.layers", "num_hidden_layers"
    raise ValueError(
        f"recipe.structured.drop_blocks: depth pruning supports the built-in GPT and Hugging Face GPT-2 / Llama-style "
        f"models; the model is {type(model).__name__}"
    )


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's sequence of transformer blocks (ValueError for an unsupported model)."""
    return _blocks_and_prefix(model)[0]


@torch.no_grad()
def block_influence(model: nn.Module, batches: Iterable[Tensor]) -> Tensor:
    """1 - cos(input, output) of every block's hidden states, averaged over all tokens of `batches` (eval mode)."""
    blocks = transformer_blocks(model)
    sums = torch.zeros(len(blocks), dtype=torch.float64)
    counts = torch.zeros(len(blocks), dtype=torch.float64)
    handles = []
    for index, block in enumerate(blocks):
        def measure(module: nn.Module, args: tuple, kwargs: dict, output: Any, index: int = index) -> None:
            hidden_in = args[0] if args else kwargs["hidden_states"]
            hidden_out = output[0] if isinstance(output, (tuple, list)) else output
            cosine = F.cosine_similarity(hidden_in.float(), hidden_out.float(), dim=-1)
            sums[index] += (1.0 - cosine).sum().double().cpu()
            counts[index] += cosine.numel()

        handles.append(block.register_forward_hook(measure, with_kwargs=True))
    calibrate(model, batches, handles)
    if not counts.all():
        raise ValueError("block_influence: no calibration batch reached every block")
    return (sums / counts).float()


def _smaller_config(model_cfg: Mapping[str, Any], count_key: str, keep: list[int], total: int) -> dict[str, Any]:
    spec = copy.deepcopy(dict(model_cfg))
    if spec.get("_target_") == GPT_TARGET:
        spec[count_key] = len(keep)
        for key in ("n_heads", "mlp_hidden"):
            if spec.get(key) is not None:
                spec[key] = [spec[key][i] for i in keep]
        return spec
    settings = dict(spec["config"])
    settings[count_key] = len(keep)
    if isinstance(settings.get("layer_types"), list) and len(settings["layer_types"]) == total:
        settings["layer_types"] = [settings["layer_types"][i] for i in keep]
    spec["config"] = settings
    return spec


def drop_blocks(
    model: nn.Module, model_cfg: Mapping[str, Any], count: int, batches: Iterable[Tensor]
) -> tuple[nn.Module, dict[str, Any]]:
    """(smaller model, its config): `model` without the `count` least influential blocks, rebuilt from a config with
    the block count reduced and the kept blocks' weights copied in order. `model` is left unchanged."""
    from hydra.utils import instantiate

    blocks, prefix, count_key = _blocks_and_prefix(model)
    total = len(blocks)
    if not 0 < count < total:
        raise ValueError(f"recipe.structured.drop_blocks={count}: expected 0 < drop_blocks < {total} (the model's blocks)")
    influence = block_influence(model, batches)
    dropped = set(torch.topk(influence, count, largest=False).indices.tolist())
    keep = [index for index in range(total) if index not in dropped]
    if model_cfg.get("_target_") != GPT_TARGET:
        from orchestrator.models.hf_causal_lm import hf_model_config

        model_cfg = hf_model_config(model)  # the full architecture, without a pretrained directory
    spec = _smaller_config(model_cfg, count_key, keep, total)
    renumber = {old: new for new, old in enumerate(keep)}
    state = {}
    for name, tensor in model.state_dict().items():
        if name.startswith(prefix + "."):
            index, _, rest = name[len(prefix) + 1 :].partition(".")
            if int(index) in dropped:
                continue
            name = f"{prefix}.{renumber[int(index)]}.{rest}"
        state[name] = tensor.detach().clone()
    with torch.no_grad():
        smaller = instantiate(spec)
        smaller.load_state_dict(state, strict=True)
    return smaller.train(model.training), spec
