"""A small GPT-style causal language model, self-contained (no downloads, no transformers dependency).

Pre-norm transformer blocks with fused QKV projection and PyTorch's scaled_dot_product_attention (causal), tied
input/output embeddings. Sized by n_layer/n_head/n_embd; `estimate_flops_per_token` feeds MFU reporting.

`n_heads` and `mlp_hidden` (one entry per layer) and `head_dim` describe non-uniform widths. Nobody writes those by
hand: structured pruning removes attention heads and MLP units layer by layer (orchestrator.compress.structured),
and the exported smaller model is rebuilt from its config, so the config must be able to say what each layer kept.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint


class CausalSelfAttention(nn.Module):
    """`n_head` heads of width `head_dim`; q, k and v lie side by side in `qkv`'s output, each head-major."""

    def __init__(self, n_embd: int, n_head: int, head_dim: int, dropout: float) -> None:
        super().__init__()
        self.n_head, self.head_dim = n_head, head_dim
        self.qkv = nn.Linear(n_embd, 3 * n_head * head_dim)
        self.proj = nn.Linear(n_head * head_dim, n_embd)
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        batch, length, _ = x.shape
        qkv = self.qkv(x).reshape(batch, length, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (batch, head, position, head_dim)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(batch, length, self.n_head * self.head_dim))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, head_dim: int, mlp_hidden: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, head_dim, dropout)
        self.ln2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, mlp_hidden), nn.GELU(), nn.Linear(mlp_hidden, n_embd), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        block_size: int,
        n_layer: int = 2,
        n_head: int = 4,
        n_embd: int = 64,
        dropout: float = 0.0,
        head_dim: Optional[int] = None,
        n_heads: Optional[Sequence[int]] = None,
        mlp_hidden: Optional[Sequence[int]] = None,
    ) -> None:
        super().__init__()
        if head_dim is None:
            if n_embd % n_head:
                raise ValueError(f"model.n_embd ({n_embd}) must be divisible by model.n_head ({n_head})")
            head_dim = n_embd // n_head
        n_heads = list(n_heads) if n_heads is not None else [n_head] * n_layer
        mlp_hidden = list(mlp_hidden) if mlp_hidden is not None else [4 * n_embd] * n_layer
        for key, values in (("model.n_heads", n_heads), ("model.mlp_hidden", mlp_hidden)):
            if len(values) != n_layer or min(values, default=1) < 1:
                raise ValueError(f"{key}={values} must hold n_layer={n_layer} positive widths, one per layer")
        self.block_size = block_size
        self.n_layer, self.n_head, self.n_embd, self.head_dim = n_layer, n_head, n_embd, head_dim
        self.tok_emb = nn.Embedding(vocab_size, n_embd)
        self.pos_emb = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, heads, head_dim, hidden, dropout) for heads, hidden in zip(n_heads, mlp_hidden))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # weight tying: fewer parameters, better small-data perplexity
        self.activation_checkpointing = False
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            return
        params = list(module.parameters(recurse=False))
        # Built inside deepspeed.zero.Init (ZeRO-3), each submodule's parameters were partitioned when its
        # constructor returned: gather them to initialise, rank 0's values win (every rank draws the same anyway).
        with _gathered(params):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def enable_activation_checkpointing(self) -> None:
        """Keep only each block's input in the forward pass and recompute its activations in the backward one:
        activation memory per block drops to one [batch, length, n_embd] tensor, for about one more forward."""
        self.activation_checkpointing = True

    def forward(self, idx: Tensor) -> Tensor:
        length = idx.shape[1]
        if length > self.block_size:
            raise ValueError(f"sequence length {length} exceeds model.block_size={self.block_size}")
        pos = torch.arange(length, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                # non-reentrant: gradients reach parameters (and ZeRO-3's gather hooks run) as in a plain forward
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.lm_head(self.ln_f(x))

    def estimate_flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward), as in the PaLM paper's appendix: 6N + 12·L·H·Q·T."""
        non_embedding = sum(_numel(p) for p in self.parameters()) - _numel(self.pos_emb.weight)
        attention_width = sum(block.attn.n_head * block.attn.head_dim for block in self.blocks)
        return 6 * non_embedding + 12 * attention_width * self.block_size


def _numel(param: Tensor) -> int:
    """Full size of a parameter, also of a ZeRO-3 partitioned one (an empty placeholder outside forward)."""
    return int(getattr(param, "ds_numel", param.numel()))


def _gathered(params: list[nn.Parameter]):
    """Full parameters for in-place initialisation: deepspeed's GatheredParameters for ZeRO-3 partitions, else a no-op."""
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)
