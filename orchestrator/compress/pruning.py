"""Unstructured magnitude pruning with the gradual (cubic) schedule of Zhu & Gupta 2017.

Use::

    params = prunable_parameters(model)                     # Linear/Conv weights, heads excluded
    pruner = GradualPruning(params, final_sparsity=0.8, start_step=200, end_step=2000, frequency=100,
                            optimizer=engine.optimizer)     # build after deepspeed.initialize
    for step in range(1, max_steps + 1):
        ...; engine.step()
        if (s := pruner.on_step_end(step)) is not None:
            mlflow.log_metric("sparsity", s, step=step)
    engine.save_checkpoint(d, client_state={"pruning": pruner.state_dict()})
    _, client = engine.load_checkpoint(d); pruner.load_state_dict(client["pruning"])   # on the new engine

One-shot pruning is ``MaskEnforcer(params).update(magnitude_masks(params, 0.5, "layer"))`` followed by fine-tuning.

Suggested settings: final sparsity 0.5-0.9; start after warm-up (the loss should have stopped falling steeply);
end at ~60-80% of training so the last stretch recovers accuracy at fixed sparsity; frequency 1-5% of the pruning
window (many small steps beat few large ones). "layer" scope is the safe default; "global" reaches higher
sparsity for the same accuracy but may empty small layers, so check ``sparsity_table``. Keep embeddings and the
output head dense (the default selection does).

DeepSpeed ZeRO and precision: ZeRO 0-2 in fp32/bf16/fp16 are supported through ``MaskEnforcer`` (see
``mask_enforcer.py`` for why gradient hooks, master-copy zeroing and moment zeroing are all needed); ZeRO 3 raises
``NotImplementedError``. Masks are computed from the module's (low-precision) weights, identical on every rank.
Unstructured sparsity saves no memory or time by itself: the tensors stay dense. It pays off through compression
(zeros compress) or sparse kernels; use ``structured.py`` for a physically smaller model.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import Any, Callable, Literal

import torch
from torch import Tensor, nn

from orchestrator.compress.mask_enforcer import MaskEnforcer, reject_zero3

__all__ = [
    "DEFAULT_HEAD_NAMES",
    "GradualPruning",
    "MaskEnforcer",
    "cubic_sparsity",
    "magnitude_masks",
    "masks_from_scores",
    "prunable_parameters",
    "realized_sparsity",
    "sparsity_table",
]

Scope = Literal["layer", "global"]

DEFAULT_HEAD_NAMES = ("head", "lm_head", "classifier", "fc_out", "output_projection")


def _prunable_types() -> tuple[type, ...]:
    """Linear/Conv layers, and transformers' `Conv1D` (GPT-2's projections: a Linear with its weight transposed)."""
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, nn.Conv1d, nn.Conv2d, Conv1D)


def _matches(name: str, patterns: list[str] | None) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns or [])


def prunable_parameters(
    model: nn.Module, include: list[str] | None = None, exclude: list[str] | None = None
) -> dict[str, nn.Parameter]:
    """Select the weights worth pruning, keyed by ``named_parameters`` name.

    Default (``include=None``): the weights of Linear/Conv1d/Conv2d and GPT-2's Conv1D, except modules named like an output head
    (``DEFAULT_HEAD_NAMES``). Biases are tiny, and embeddings and heads are where pruning costs most accuracy, so
    they stay dense. ``include`` (fnmatch patterns on the parameter name, e.g. ``["*.mlp.*.weight",
    "lm_head.weight"]``) replaces the default selection with exactly the matching parameters of any module type,
    which is how a head or embedding is pruned deliberately. ``exclude`` patterns then remove names from either
    selection. A weight shared by several modules (tied embeddings) is listed once, under its first name: by
    default only if every sharing module qualifies, with ``include`` if any of its names matches.
    """
    first_name: dict[int, str] = {}
    params: dict[int, nn.Parameter] = {}
    votes: dict[int, list[bool | None]] = {}  # None = excluded
    prunable_types = _prunable_types()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            full_name = f"{module_name}.{param_name}" if module_name else param_name
            if include is None:
                is_head = module_name.rsplit(".", 1)[-1] in DEFAULT_HEAD_NAMES
                chosen = isinstance(module, prunable_types) and param_name == "weight" and not is_head
            else:
                chosen = _matches(full_name, include)
            first_name.setdefault(id(param), full_name)
            params[id(param)] = param
            votes.setdefault(id(param), []).append(None if _matches(full_name, exclude) else chosen)
    # Tied weights: by default every sharing module must qualify (an embedding tied to a head does not); an explicit
    # include of any of its names is enough; an exclude of any of its names always wins.
    decide = all if include is None else any
    return {
        first_name[key]: params[key]
        for key in first_name
        if None not in votes[key] and decide(votes[key])
    }


def _check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity!r} is outside the allowed range 0 <= sparsity < 1")


def _keep_mask_from_scores(scores: Tensor, num_pruned: int) -> Tensor:
    """Prune exactly ``num_pruned`` lowest-score entries (topk breaks ties, a threshold would not)."""
    flat_keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if num_pruned > 0:
        flat_keep[torch.topk(scores.reshape(-1), num_pruned, largest=False, sorted=False).indices] = False
    return flat_keep


def masks_from_scores(scores: Mapping[str, Tensor], sparsity: float, scope: Scope) -> dict[str, Tensor]:
    """Like ``magnitude_masks`` but on arbitrary importance scores (lower = pruned first)."""
    _check_sparsity(sparsity)
    if scope == "layer":
        return {
            name: _keep_mask_from_scores(s.detach().float(), round(sparsity * s.numel())).view(s.shape)
            for name, s in scores.items()
        }
    if scope == "global":
        if not scores:
            return {}
        flat = torch.cat([s.detach().float().reshape(-1) for s in scores.values()])
        flat_keep = _keep_mask_from_scores(flat, round(sparsity * flat.numel()))
        masks, offset = {}, 0
        for name, s in scores.items():
            masks[name] = flat_keep[offset : offset + s.numel()].view(s.shape)
            offset += s.numel()
        return masks
    raise ValueError(f"scope={scope!r} is not one of 'layer', 'global'")


def magnitude_masks(params: Mapping[str, Tensor], sparsity: float, scope: Scope = "layer") -> dict[str, Tensor]:
    """Boolean keep-masks pruning the smallest-|w| entries, exactly ``round(sparsity * n)`` of them.

    ``scope="layer"`` prunes each tensor to ``sparsity``; ``"global"`` ranks all entries together, so layers with
    small weights lose more. Global ranking concatenates all scores in fp32: budget 4 bytes per pruned weight.
    """
    return masks_from_scores({name: p.detach().abs() for name, p in params.items()}, sparsity, scope)


def cubic_sparsity(step: int, initial: float, final: float, start_step: int, end_step: int, frequency: int) -> float:
    """Zhu & Gupta 2017: s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n dt))^3, constant between updates.

    Prunes fast while there are many redundant weights and slowly near the target, so the network can recover.
    ``t`` only takes the values start_step + k*frequency; the result is ``initial`` before start_step and ``final``
    from end_step on (also when end_step is not on the frequency grid).
    """
    _check_sparsity(initial)
    _check_sparsity(final)
    if frequency <= 0:
        raise ValueError(f"frequency={frequency!r} must be a positive number of steps")
    if end_step <= start_step:
        raise ValueError(f"end_step={end_step!r} must be greater than start_step={start_step!r}")
    if step < start_step:
        return initial
    if step >= end_step:
        return final
    last_update = start_step + ((step - start_step) // frequency) * frequency
    progress = (last_update - start_step) / (end_step - start_step)
    return final + (initial - final) * (1.0 - progress) ** 3


def realized_sparsity(tensors: Mapping[str, Tensor]) -> float:
    """Fraction of exact zeros over all given tensors (what was really achieved, not what was asked)."""
    total = sum(t.numel() for t in tensors.values())
    zeros = sum(int((t == 0).sum()) for t in tensors.values())
    return zeros / total if total else 0.0


def sparsity_table(model: nn.Module) -> list[dict[str, Any]]:
    """One row per weight matrix/kernel (ndim >= 2), for ``mlflow.log_table`` or a quick print."""
    rows = []
    for name, param in model.named_parameters():
        if param.dim() < 2:
            continue
        numel = param.numel()
        nonzero = int(torch.count_nonzero(param.detach()))
        rows.append(
            {
                "layer": name,
                "shape": list(param.shape),
                "numel": numel,
                "nonzero": nonzero,
                "sparsity": 1.0 - nonzero / numel if numel else 0.0,
            }
        )
    return rows


class GradualPruning:
    """Hook: re-prunes at cubic-schedule points and keeps pruned weights at zero in between.

    Masks only grow: already-pruned entries rank below every live weight when masks are recomputed, so a weight
    never comes back after its optimizer state was cleared. Before ``start_step`` the model stays dense.
    """

    def __init__(
        self,
        params: Mapping[str, nn.Parameter],
        final_sparsity: float,
        start_step: int,
        end_step: int,
        frequency: int,
        initial_sparsity: float = 0.0,
        scope: Scope = "layer",
        optimizer: Any | None = None,
        scores: Callable[[str, Tensor], Tensor] | None = None,
        n_m: tuple[int, int] | None = None,
        input_dims: Mapping[str, int] | None = None,
    ) -> None:
        """`scores(name, weight)` ranks weights (default |w|; wanda passes |w| × input norm); `n_m=(N, M)` with
        `input_dims` prunes within groups of M along each weight's input dimension instead of per tensor."""
        reject_zero3(params)
        cubic_sparsity(start_step, initial_sparsity, final_sparsity, start_step, end_step, frequency)  # validates
        if scope not in ("layer", "global"):
            raise ValueError(f"scope={scope!r} is not one of 'layer', 'global'")
        self.params = dict(params)
        self.schedule = dict(
            initial=initial_sparsity,
            final=final_sparsity,
            start_step=start_step,
            end_step=end_step,
            frequency=frequency,
        )
        self.scope = scope
        self.score = scores or (lambda name, weight: weight.detach().abs().float())
        self.n_m, self.input_dims = n_m, dict(input_dims or {})
        self.sparsity = 0.0
        self.enforcer = MaskEnforcer(self.params, optimizer=optimizer)

    def target(self, step: int) -> float:
        """The sparsity the schedule asks for after ``step`` (0 before start_step: dense warm-up)."""
        if step < self.schedule["start_step"]:
            return 0.0
        return cubic_sparsity(step, **self.schedule)

    def on_step_end(self, step: int) -> float | None:
        """Call after every optimizer step; returns the new sparsity when masks changed, else None."""
        target = self.target(step)
        if target == self.sparsity:
            return None
        old = self.enforcer.masks
        scores = {}
        for name, param in self.params.items():
            score = self.score(name, param)
            if name in old:
                score = score.masked_fill(~old[name], -1.0)
            scores[name] = score
        if self.n_m:
            from orchestrator.compress.n_m_sparsity import n_m_masks

            n, m = self.n_m
            self.enforcer.update(n_m_masks(scores, n, m, self.input_dims, min(m - n, round(target * m))))
        else:
            self.enforcer.update(masks_from_scores(scores, target, self.scope))
        self.sparsity = target
        return target

    def state_dict(self) -> dict[str, Any]:
        """Masks (on CPU) and the applied sparsity: what a restored run needs to keep pruned weights pruned."""
        return {
            "sparsity": self.sparsity,
            "scope": self.scope,
            "schedule": dict(self.schedule),
            "masks": self.enforcer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sparsity = float(state["sparsity"])
        self.enforcer.load_state_dict(state["masks"])

    def remove(self) -> None:
        """Stop enforcing (e.g. before export); the weights keep their zeros."""
        self.enforcer.remove()
