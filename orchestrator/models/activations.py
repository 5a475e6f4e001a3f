"""Activation memory of one micro-batch of the built-in models, from their config (no torch import).

Why: model states are only part of a worker's memory; what autograd keeps between the forward and the backward pass
grows with the micro-batch and the sequence, and is what activation checkpointing trades for recomputation. `orch
plan` adds this to the model states to say whether a run fits before it starts.

The GPT count follows Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", §4)
for this module's layers: per token and layer autograd keeps the block input and the first LayerNorm's output (d
each), q, k and v (3d, one tensor), the attention output (d; its transpose back is contiguous, so the reshape is a
view), the residual sum and the second LayerNorm's output (2d), and the MLP's hidden activations before and after
GELU (2·mlp): 16d per token and layer for mlp = 4d, checked against autograd's saved tensors in tests/unit. Fused
scaled-dot-product attention keeps one log-sum-exp per head instead of the s×s scores. With dropout 0 no masks are
kept. The logits and the log-softmax of the loss are kept once per token (2·vocab), and one more vocab-wide tensor
lives while the loss gradient is formed. With checkpointing each block keeps only its input, and one block's full
set lives again while it is recomputed during the backward pass.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

# vocab-wide tensors per token at the loss: logits, log-softmax output, and the gradient formed from them
LOGIT_COPIES = 3


def gpt_activation_elements(cfg: Mapping[str, Any], micro_batch: int, seq_len: int, checkpointing: bool) -> int:
    """Elements autograd holds at the peak of one micro-batch's forward and backward pass."""
    d, vocab, layers = cfg.get("n_embd", 64), cfg["vocab_size"], cfg.get("n_layer", 2)
    head_dim = cfg.get("head_dim") or d // cfg.get("n_head", 4)
    heads = cfg.get("n_heads") or [cfg.get("n_head", 4)] * layers
    hidden = cfg.get("mlp_hidden") or [4 * d] * layers
    # x, ln1 out, residual, ln2 out; q, k, v (one qkv tensor); attention out; MLP before and after GELU; lse per head
    per_layer = [4 * d + 3 * h * head_dim + h * head_dim + 2 * m + h for h, m in zip(heads, hidden)]
    tokens = micro_batch * seq_len
    head = 2 * d + LOGIT_COPIES * vocab  # final LayerNorm in/out, logits and loss
    if checkpointing:
        kept = layers * d + max(per_layer, default=0)  # each block's input, one block recomputed at a time
    else:
        kept = sum(per_layer)
    return tokens * (kept + head)


def mlp_activation_elements(cfg: Mapping[str, Any], micro_batch: int) -> int:
    """Each Linear's input and each ReLU's output (the classifier's logits and their gradient at the end)."""
    widths = [math.prod(cfg["input_shape"]), *cfg.get("hidden_sizes", (128, 128))]
    return micro_batch * (sum(2 * w for w in widths) + 2 * cfg["num_classes"])


def cnn_activation_elements(cfg: Mapping[str, Any], micro_batch: int) -> int:
    """Per conv layer: its input, its output and the ReLU output at full resolution (pooling halves it after)."""
    channels, height, width = cfg["input_shape"]
    total = 0
    for out_channels in cfg.get("channels", (16, 32)):
        total += channels * height * width + 2 * out_channels * height * width
        channels, height, width = out_channels, max(height // 2, 1), max(width // 2, 1)
    hidden = cfg.get("hidden_size", 64)
    return micro_batch * (total + 3 * hidden + 2 * cfg["num_classes"])


def activation_elements(model_cfg: Mapping[str, Any], micro_batch: int, seq_len: int, checkpointing: bool) -> Optional[int]:
    """Activation elements of one micro-batch for a built-in model; None for a model without a formula."""
    target = model_cfg.get("_target_")
    if target == "orchestrator.models.gpt.GPT":
        return gpt_activation_elements(model_cfg, micro_batch, seq_len, checkpointing)
    if target == "orchestrator.models.mlp.MLP":
        return mlp_activation_elements(model_cfg, micro_batch)
    if target == "orchestrator.models.cnn.CNN":
        return cnn_activation_elements(model_cfg, micro_batch)
    return None
