"""Parameter counts of the built-in models computed from their config, without importing torch.

Why: `orch plan` prints a per-worker memory estimate and must answer in well under two seconds; importing torch
alone takes about two. A test checks each formula against the instantiated model, so they cannot drift apart.
User models (any other `_target_`) are counted by instantiating them on torch's meta device.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping


def _mlp(cfg: Mapping[str, Any]) -> int:
    widths = [math.prod(cfg["input_shape"]), *cfg.get("hidden_sizes", (128, 128)), cfg["num_classes"]]
    return sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))


def _cnn(cfg: Mapping[str, Any]) -> int:
    total, in_channels = 0, cfg["input_shape"][0]
    for out_channels in cfg.get("channels", (16, 32)):
        total += in_channels * out_channels * 9 + out_channels
        in_channels = out_channels
    hidden = cfg.get("hidden_size", 64)
    return total + in_channels * 4 * hidden + hidden + hidden * cfg["num_classes"] + cfg["num_classes"]


def _gpt(cfg: Mapping[str, Any]) -> int:
    d, vocab, block, layers = cfg.get("n_embd", 64), cfg["vocab_size"], cfg["block_size"], cfg.get("n_layer", 2)
    head_dim = cfg.get("head_dim") or d // cfg.get("n_head", 4)
    heads = cfg.get("n_heads") or [cfg.get("n_head", 4)] * layers
    hidden = cfg.get("mlp_hidden") or [4 * d] * layers
    total = vocab * d + block * d + 2 * d  # embeddings (lm_head is tied to tok_emb) and the final LayerNorm
    for h, m in zip(heads, hidden):
        attention = h * head_dim
        total += 2 * 2 * d + (3 * attention * d + 3 * attention) + (attention * d + d) + (m * d + m) + (m * d + d)
    return total


_FORMULAS: dict[str, Callable[[Mapping[str, Any]], int]] = {
    "orchestrator.models.mlp.MLP": _mlp,
    "orchestrator.models.cnn.CNN": _cnn,
    "orchestrator.models.gpt.GPT": _gpt,
}


def parameter_count(model: Any, trainable_only: bool = False) -> int:
    """Parameter elements of a built module: tied tensors count once, and a ZeRO-3 partitioned parameter (an empty
    placeholder in the module) counts its full size (`ds_numel`)."""
    unique = {id(p): p for p in model.parameters() if p.requires_grad or not trainable_only}
    return sum(int(getattr(p, "ds_numel", p.numel())) for p in unique.values())


def count_parameters(model_cfg: Mapping[str, Any]) -> int:
    """Parameters of the model a config describes, without building it where a formula is known."""
    formula = _FORMULAS.get(model_cfg["_target_"])
    if formula is not None:
        return formula(model_cfg)
    import torch
    from hydra.utils import instantiate

    with torch.device("meta"), _hf_zero3_suspended():
        model = instantiate(dict(model_cfg))
    return parameter_count(model)


@contextmanager
def _hf_zero3_suspended() -> Iterator[None]:
    """A ZeRO-3 worker keeps transformers' DeepSpeed config alive on its model (`train/construction.py`), and
    transformers then builds every HF model inside `deepspeed.zero.Init`, whose broadcasts wait for every rank. A
    count made on one rank (the memory log is rank 0's) would hang the run: it builds plain, on meta."""
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:
        yield
        return
    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved
