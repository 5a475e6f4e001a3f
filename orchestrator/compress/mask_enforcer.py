"""Keep pruned weights exactly zero while an optimizer (plain, or wrapped by DeepSpeed) keeps training.

Use::

    enforcer = MaskEnforcer(prunable_parameters(engine.module), optimizer=engine.optimizer)
    enforcer.update(magnitude_masks(params, sparsity=0.5, scope="layer"))
    ...  # train as usual; call enforcer.update(new_masks) whenever the masks change
    enforcer.remove()  # detach the gradient hooks (the weights stay zero)

Why zeroing the module's weights is not enough: any optimizer with a master copy or moment buffers will put the
pruned entries back.

* Gradients: a ``grad.masked_fill(~mask, 0)`` tensor hook runs before gradients are accumulated into ``.grad`` (and
  before DeepSpeed's post-accumulate reduction hooks), so pruned entries receive exactly zero gradient on every rank.
* Master weights: under ZeRO 1/2, and with bf16/fp16 at ZeRO 0, DeepSpeed keeps an fp32 master copy that it copies
  back into the module after each step. ``update``/``apply`` zero the pruned entries of that copy too: through the
  ``param._hp_mapping`` fragment DeepSpeed links to every parameter (ZeRO 1/2, BF16_Optimizer; each rank zeroes only
  the partition it owns, no collective needed), or through the wrapper's ``fp32_groups`` (ZeRO-0 fp16/bf16, needs
  ``optimizer``).
* Moments: a weight pruned *mid-training* still has a non-zero Adam ``exp_avg``, which would move it off zero even
  with zero gradients. ``update`` zeroes every optimizer-state tensor shaped like the parameter at pruned entries;
  with zero gradients they then stay zero, so Adam/AdamW (decoupled or L2 weight decay), SGD with momentum and
  Lion leave pruned entries at exactly zero with no per-step work.

Interaction with DeepSpeed and precision:

* ZeRO 0, 1, 2, fp32/bf16/fp16: supported. Pass ``optimizer=engine.optimizer`` so ZeRO-0 optimizer state and the
  ZeRO-0 fp16/bf16 master copy are reached; ZeRO 1/2 need only the parameters.
* ZeRO 3: parameters are partitioned (``param.numel() == 0`` outside forward), so masks cannot be computed or applied
  per parameter; the constructor raises ``NotImplementedError``.
* Call ``update`` after ``deepspeed.initialize`` (the master copy must exist to be zeroed) and after
  ``engine.load_checkpoint`` (hooks live on the new engine's parameters, not in the checkpoint).
* Masks must be identical on every rank; ``magnitude_masks`` on replicated (ZeRO 0-2) weights is deterministic, so
  computing them on each rank is fine.
* CPU offload: the master fragment lives on CPU; masks are moved there. Not exercised by the tests.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

ZERO3_MESSAGE = (
    "Pruning supports DeepSpeed ZeRO stages 0-2 only: parameter(s) {names} are ZeRO-3 partitioned "
    "(param.ds_id is set and param.numel() == 0 outside forward), so masks cannot be computed or applied. "
    "Set trainer.zero_stage<=2."
)


def reject_zero3(params: Mapping[str, nn.Parameter]) -> None:
    """Fail early with an actionable message instead of producing empty masks on partitioned parameters."""
    partitioned = [name for name, p in params.items() if hasattr(p, "ds_id") or hasattr(p, "ds_numel")]
    if partitioned:
        shown = ", ".join(partitioned[:3]) + (" ..." if len(partitioned) > 3 else "")
        raise NotImplementedError(ZERO3_MESSAGE.format(names=shown))


class MaskEnforcer:
    """Hook object holding one boolean mask per parameter (True = keep)."""

    def __init__(self, params: Mapping[str, nn.Parameter], optimizer: Any | None = None) -> None:
        reject_zero3(params)
        self._params = dict(params)
        self._optimizer = optimizer
        self._masks: dict[str, Tensor] = {}
        self._handles: dict[str, RemovableHandle] = {}

    @property
    def masks(self) -> dict[str, Tensor]:
        """The enforced masks (True = kept), on the parameters' devices."""
        return dict(self._masks)

    def update(self, masks: Mapping[str, Tensor]) -> None:
        """Enforce exactly ``masks`` from now on: zero weights, master copies and optimizer moments at pruned entries.

        Parameters not in ``masks`` stop being masked (their hooks are removed).
        """
        unknown = sorted(set(masks) - set(self._params))
        if unknown:
            raise KeyError(f"masks for unknown parameters {unknown}; known: {sorted(self._params)[:5]} ...")
        new_masks: dict[str, Tensor] = {}
        for name, mask in masks.items():
            param = self._params[name]
            if tuple(mask.shape) != tuple(param.shape):
                raise ValueError(f"mask for {name} has shape {tuple(mask.shape)}, parameter has {tuple(param.shape)}")
            new_masks[name] = mask.detach().to(device=param.device, dtype=torch.bool)
        for name in list(self._handles):
            if name not in new_masks:
                self._handles.pop(name).remove()
        self._masks = new_masks
        for name, param in self._params.items():
            if name in self._masks and name not in self._handles and param.requires_grad:
                self._handles[name] = param.register_hook(self._gradient_hook(name))
        self.apply()

    def apply(self) -> None:
        """Re-zero pruned entries everywhere; cheap, and idempotent, so safe to call after loading weights."""
        with torch.no_grad():
            for name, mask in self._masks.items():
                param = self._params[name]
                param.masked_fill_(~mask, 0)
                for tensor, pruned in _master_and_state_views(param, ~mask, self._optimizer):
                    tensor.masked_fill_(pruned, 0)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The masks, on CPU: what a restored run needs to keep pruned weights pruned (hooks are not state)."""
        return {name: mask.cpu() for name, mask in self._masks.items()}

    def load_state_dict(self, masks: Mapping[str, torch.Tensor]) -> None:
        """Re-enforce saved masks on this (possibly new) model; hooks are re-registered on its parameters."""
        self.update(masks)

    def remove(self) -> None:
        """Detach the gradient hooks and forget the masks; already-zero weights stay zero until trained."""
        for handle in self._handles.values():
            handle.remove()
        self._handles.clear()
        self._masks = {}

    def _gradient_hook(self, name: str):
        def mask_gradient(grad: Tensor) -> Tensor:
            mask = self._masks.get(name)
            return grad if mask is None else grad.masked_fill(~mask, 0)

        return mask_gradient


def _master_and_state_views(
    param: nn.Parameter, pruned: Tensor, optimizer: Any | None
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (tensor, pruned-mask) pairs for every optimizer-held copy of ``param`` that must be zeroed."""
    if hasattr(param, "_hp_mapping"):  # ZeRO 1/2 and BF16_Optimizer: master partition linked per parameter
        mapping = param._hp_mapping
        if mapping is None:  # this rank owns no slice of this parameter
            return
        address = mapping.lp_fragment_address
        fragment = pruned.reshape(-1).narrow(0, address.start, address.numel)
        hp = mapping.hp_fragment
        yield hp.data, fragment.to(hp.device)
        for state in (mapping.optim_fragment or {}).values():  # linked after the first optimizer step
            yield state, fragment.to(state.device)
        return
    if optimizer is None:
        return
    master, state = _unflattened_master(param, optimizer)
    if master is not None:
        yield master, pruned.to(master.device)
    for tensor in state:
        yield tensor, pruned.to(tensor.device)


def _unflattened_master(param: nn.Parameter, optimizer: Any) -> tuple[Tensor | None, list[Tensor]]:
    """Find the fp32 master view and the state views of ``param`` in a ZeRO-0 optimizer (wrapped or not)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    inner_state = getattr(inner, "state", {})
    for group_index, group in enumerate(getattr(optimizer, "fp16_groups", [])):
        offset = 0
        for low_precision in group:
            if low_precision is param:
                if hasattr(optimizer, "fp32_groups"):  # FP16_UnfusedOptimizer: one fp32 tensor per parameter
                    master = optimizer.fp32_groups[group_index][[id(p) for p in group].index(id(param))]
                    return master.data, _same_shape_states(inner_state.get(master, {}), master)
                flat = optimizer.fp32_groups_flat[group_index]  # FP16_Optimizer: one flat fp32 tensor per group
                view = flat.data.narrow(0, offset, param.numel()).view_as(param)
                states = [
                    s.narrow(0, offset, param.numel()).view_as(param)
                    for s in _same_shape_states(inner_state.get(flat, {}), flat)
                ]
                return view, states
            offset += low_precision.numel()
    return None, _same_shape_states(inner_state.get(param, {}), param)


def _same_shape_states(state: Mapping[str, Any], like: Tensor) -> list[Tensor]:
    return [v for v in state.values() if torch.is_tensor(v) and v.shape == like.shape]
