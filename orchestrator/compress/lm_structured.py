"""Structured pruning of Hugging Face causal LMs: remove attention heads and MLP hidden units by importance, giving a
smaller dense model that `transformers` builds (and `from_pretrained` loads) from its saved config.

Use::

    smaller = prune_causal_lm(model, heads_ratio=0.25, mlp_ratio=0.5)   # model: HFCausalLM
    smaller.hf.save_pretrained("pruned/")                               # AutoModelForCausalLM.from_pretrained works

How: importance scores pick, in every layer, which heads (key/value groups under grouped-query attention) and
which MLP units to keep; the pruned architecture is a config with fewer heads / a narrower MLP; a fresh model is
built from it and the kept slices of every weight are copied in (`load_state_dict(strict=True)` checks that every
tensor was accounted for). Every layer keeps the same number of heads and units, because these configs hold one
number for all layers.

Importance: weight magnitude (L2 norm of the weights reading from and writing to a unit or head), deterministic,
so every data-parallel rank makes the same choice without communication. Suggested settings: heads_ratio 0.25-0.5,
mlp_ratio 0.3-0.6, then fine-tune or distill from the unpruned model to recover (conf/pipeline/lm_compress.yaml).

Supported architectures: Llama-style (q/k/v/o projections with an explicit head_dim; gate/up/down MLP: Llama,
Mistral, Qwen2 and relatives) for heads and MLP units; GPT-2 for MLP units (n_inner). transformers 5 removed
`prune_heads`/`config.pruned_heads`, and GPT-2's attention width is tied to n_embd, so GPT-2 heads cannot be
removed in a config transformers can load back: asking for it is an error. Pruning happens on the fp32 model
before DeepSpeed sees it, so any ZeRO stage and precision trains the result.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

__all__ = ["prune_causal_lm", "supports_head_pruning", "LLAMA_LIKE"]

LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")


def supports_head_pruning(model_type: str) -> bool:
    return model_type in LLAMA_LIKE


def _keep_count(total: int, ratio: float, what: str) -> int:
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"{what} pruning ratio {ratio!r}: expected 0 <= ratio < 1")
    return max(1, total - int(round(total * ratio)))


def _top(scores: Tensor, keep: int) -> Tensor:
    """Indices of the `keep` largest scores, in their original order (so kept heads/units stay in place)."""
    return torch.topk(scores, keep).indices.sort().values


def _llama_plan(hf, heads_ratio: float, mlp_ratio: float) -> tuple[dict[str, Any], dict[str, tuple[int, Tensor]]]:
    """(config changes, {parameter name: (dim, kept indices)}) for a Llama-style model."""
    config = hf.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads, group = config.num_key_value_heads, config.num_attention_heads // config.num_key_value_heads
    keep_groups = _keep_count(kv_heads, heads_ratio, "head")
    keep_units = _keep_count(config.intermediate_size, mlp_ratio, "MLP")
    slices: dict[str, tuple[int, Tensor]] = {}
    for index, layer in enumerate(hf.model.layers):
        prefix = f"hf.model.layers.{index}"
        attn, mlp = layer.self_attn, layer.mlp
        if keep_groups < kv_heads:
            q = attn.q_proj.weight.view(kv_heads, group * head_dim, -1).pow(2).sum(dim=(1, 2))
            k = attn.k_proj.weight.view(kv_heads, head_dim, -1).pow(2).sum(dim=(1, 2))
            v = attn.v_proj.weight.view(kv_heads, head_dim, -1).pow(2).sum(dim=(1, 2))
            o = attn.o_proj.weight.view(-1, kv_heads, group * head_dim).pow(2).sum(dim=(0, 2))
            groups = _top((q + k + v + o).sqrt(), keep_groups)
            kv_rows = (groups[:, None] * head_dim + torch.arange(head_dim, device=groups.device)).flatten()
            q_rows = (groups[:, None] * group * head_dim + torch.arange(group * head_dim, device=groups.device)).flatten()
            for name, dim, rows in (("q_proj", 0, q_rows), ("k_proj", 0, kv_rows), ("v_proj", 0, kv_rows), ("o_proj", 1, q_rows)):
                slices[f"{prefix}.self_attn.{name}.weight"] = (dim, rows)
                if name != "o_proj" and getattr(attn, name).bias is not None:
                    slices[f"{prefix}.self_attn.{name}.bias"] = (0, rows)
        if keep_units < config.intermediate_size:
            score = (mlp.gate_proj.weight.pow(2).sum(1) + mlp.up_proj.weight.pow(2).sum(1) + mlp.down_proj.weight.pow(2).sum(0)).sqrt()
            units = _top(score, keep_units)
            for name, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
                slices[f"{prefix}.mlp.{name}.weight"] = (dim, units)
                if name != "down_proj" and getattr(mlp, name).bias is not None:
                    slices[f"{prefix}.mlp.{name}.bias"] = (0, units)
    changes = {
        "num_attention_heads": keep_groups * group,
        "num_key_value_heads": keep_groups,
        "head_dim": head_dim,  # explicit: no longer hidden_size // num_attention_heads
        "intermediate_size": keep_units,
    }
    return changes, slices


def _gpt2_plan(hf, heads_ratio: float, mlp_ratio: float) -> tuple[dict[str, Any], dict[str, tuple[int, Tensor]]]:
    if heads_ratio > 0:
        raise ValueError(
            "recipe.lm_structured.heads_ratio: GPT-2 attention heads cannot be removed in a form transformers 5 loads "
            "back (its attention width is n_embd, and config.pruned_heads was removed); use heads_ratio=0 with "
            "mlp_ratio, or a Llama-style model (model=hf_llama)"
        )
    config = hf.config
    inner = config.n_inner or 4 * config.n_embd
    keep_units = _keep_count(inner, mlp_ratio, "MLP")
    slices: dict[str, tuple[int, Tensor]] = {}
    if keep_units < inner:
        for index, block in enumerate(hf.transformer.h):
            prefix = f"hf.transformer.h.{index}.mlp"
            # Conv1D stores weights as [in, out]: c_fc's units are columns, c_proj's are rows
            score = (block.mlp.c_fc.weight.pow(2).sum(0) + block.mlp.c_proj.weight.pow(2).sum(1)).sqrt()
            units = _top(score, keep_units)
            slices.update({f"{prefix}.c_fc.weight": (1, units), f"{prefix}.c_fc.bias": (0, units), f"{prefix}.c_proj.weight": (0, units)})
    return {"n_inner": keep_units}, slices


def prune_causal_lm(model, heads_ratio: float = 0.0, mlp_ratio: float = 0.0):
    """A smaller copy of `model` (an `HFCausalLM`) with `heads_ratio` of each layer's heads and `mlp_ratio` of its
    MLP units removed, the least important first; the input model is left unchanged."""
    from orchestrator.models.hf_causal_lm import HFCausalLM, hf_model_config

    if not isinstance(model, HFCausalLM):
        raise TypeError(f"structured LM pruning needs a Hugging Face model (model=hf_causal_lm), got {type(model).__name__}")
    model_type = model.hf.config.model_type
    if model_type == "gpt2":
        changes, slices = _gpt2_plan(model.hf, heads_ratio, mlp_ratio)
    elif supports_head_pruning(model_type):
        changes, slices = _llama_plan(model.hf, heads_ratio, mlp_ratio)
    else:
        raise ValueError(
            f"structured LM pruning supports model types gpt2 (MLP units) and {', '.join(LLAMA_LIKE)} (heads and MLP "
            f"units); the model is {model_type!r}"
        )
    spec = hf_model_config(model)
    spec["config"] = {**copy.deepcopy(spec["config"]), **changes}
    with torch.no_grad():
        from hydra.utils import instantiate

        smaller = instantiate(spec)
        state = {}
        for name, tensor in model.state_dict().items():
            if name in slices:
                dim, index = slices[name]
                tensor = tensor.index_select(dim, index)
            state[name] = tensor.detach().clone()
        smaller.load_state_dict(state, strict=True)
    return smaller.train(model.training)
