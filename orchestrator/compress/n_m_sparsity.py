"""N:M semi-structured sparsity: in every group of M consecutive weights along a layer's input dimension, at most N
are non-zero (2:4 is what NVIDIA Ampere+ sparse tensor cores run at up to 2x matmul throughput).

Use::

    dims = weight_input_dims(model, params)                 # 1 for nn.Linear, 0 for GPT-2's Conv1D ([in, out])
    masks = n_m_masks({k: p.abs() for k, p in params.items()}, 2, 4, dims)    # or wanda_scores(...)

Suggested settings: 2:4 (50%) with wanda scores, then fine-tune at fixed masks (the pattern holds: masks never
change). A gradual schedule prunes `round(s * M)` weights per group at sparsity s, ending at M - N. The input
dimension of every pruned layer must be a multiple of M.

DeepSpeed ZeRO and precision: the masks are ordinary keep-masks, held by ``MaskEnforcer`` like unstructured ones
(ZeRO 0-2). The tensors stay dense here; exporting to a 2:4 sparse kernel (``torch.sparse.to_sparse_semi_structured``)
is a deployment step on a GPU.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import torch
from torch import Tensor

__all__ = ["n_m_masks", "parse_pattern"]


def parse_pattern(pattern: str) -> Optional[tuple[int, int]]:
    """None for "unstructured", (N, M) for "N:M" with 0 < N < M; anything else raises ValueError."""
    if pattern == "unstructured":
        return None
    parts = pattern.split(":")
    if len(parts) == 2 and all(part.isdigit() for part in parts):
        n, m = int(parts[0]), int(parts[1])
        if 0 < n < m:
            return n, m
    raise ValueError(f"recipe.pruning.pattern={pattern!r}: expected 'unstructured' or 'N:M' with 0 < N < M, e.g. '2:4'")


def n_m_masks(
    scores: Mapping[str, Tensor], n: int, m: int, input_dims: Mapping[str, int], pruned_per_group: Optional[int] = None
) -> dict[str, Tensor]:
    """Keep-masks pruning the `pruned_per_group` (default M - N) lowest scores of every M consecutive entries along
    each tensor's input dimension (`input_dims[name]`); topk breaks ties, so the count per group is exact."""
    prune = m - n if pruned_per_group is None else pruned_per_group
    if not 0 <= prune <= m - n:
        raise ValueError(f"pruned_per_group={prune}: expected 0..{m - n} for {n}:{m}")
    masks = {}
    for name, score in scores.items():
        moved = score.detach().float().movedim(input_dims[name], -1)
        if moved.shape[-1] % m:
            raise ValueError(
                f"recipe.pruning.pattern={n}:{m}: {name} has input dimension {moved.shape[-1]}, not a multiple of {m}; "
                f"exclude it (recipe.pruning.exclude) or choose M dividing it"
            )
        groups = moved.reshape(-1, m)
        keep = torch.ones_like(groups, dtype=torch.bool)
        if prune:
            keep.scatter_(1, torch.topk(groups, prune, dim=1, largest=False).indices, False)
        masks[name] = keep.reshape(moved.shape).movedim(-1, input_dims[name]).contiguous()
    return masks
