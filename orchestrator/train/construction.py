"""Building the model a worker trains: partitioned from the start under ZeRO-3, with activation checkpointing on request.

Why not `instantiate(cfg.model)` and let `deepspeed.initialize` partition it: under ZeRO-3 that builds the whole
model on every rank first, so the largest model a run can hold is bounded by one rank's memory, not N ranks'.
DeepSpeed's answer is `deepspeed.zero.Init`: each module's parameters are created, initialised and partitioned as
soon as that module's constructor returns, so a rank never holds more than one module's full parameters.

- Built-in models (and any `_target_` that is not a Hugging Face LM) are built inside `deepspeed.zero.Init` with the
  run's DeepSpeed config (its precision decides the dtype of the partitions).
- Hugging Face LMs are built the way transformers' DeepSpeed integration does it: a `HfDeepSpeedConfig` alive while
  `from_config`/`from_pretrained` runs makes transformers enter `zero.Init` itself (and initialise weights inside
  `GatheredParameters`). transformers holds it through a weak reference only, so it is kept on the model.
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol, runtime_checkable

from hydra.utils import instantiate
from torch import nn

HF_CAUSAL_LM_TARGET = "orchestrator.models.hf_causal_lm.HFCausalLM"


@runtime_checkable
class ActivationCheckpointable(Protocol):
    """A model that can recompute its blocks' activations in the backward pass instead of storing them."""

    def enable_activation_checkpointing(self) -> None: ...


def zero3(ds_config: Mapping[str, Any]) -> bool:
    return int((ds_config.get("zero_optimization") or {}).get("stage", 0)) == 3


def build_model(model_cfg: Mapping[str, Any], ds_config: Mapping[str, Any], activation_checkpointing: bool = False) -> nn.Module:
    """The model `model_cfg` describes, ZeRO-3-partitioned as it is built when `ds_config` says stage 3.

    `ds_config` must be the config the engine will be initialised with (precision already resolved): zero.Init
    creates the partitions in its dtype, and `deepspeed.initialize` must find the same layout."""
    model = _partitioned(dict(model_cfg), ds_config) if zero3(ds_config) else instantiate(dict(model_cfg))
    if activation_checkpointing:
        enable_activation_checkpointing(model)
    return model


def _partitioned(model_cfg: dict[str, Any], ds_config: Mapping[str, Any]) -> nn.Module:
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from orchestrator.train.engine import skip_shm_allreduce_build

    # zero.Init partitions over deepspeed.comm's world, which deepspeed.initialize would only set up later (on the
    # process group Ray Train made): the same call, made first
    skip_shm_allreduce_build()
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    if model_cfg.get("_target_") != HF_CAUSAL_LM_TARGET:
        with deepspeed.zero.Init(config_dict_or_path=dict(ds_config)):
            return instantiate(model_cfg)
    from transformers.integrations import HfDeepSpeedConfig

    hf_ds_config = HfDeepSpeedConfig(dict(ds_config))
    model = instantiate(model_cfg)
    # transformers looks the config up through a weak reference (is_deepspeed_zero3_enabled), also after
    # construction (e.g. in activation_checkpointing_enable and generate): it lives as long as the model
    model.hf_deepspeed_config = hf_ds_config
    return model


def enable_activation_checkpointing(model: nn.Module) -> None:
    if not isinstance(model, ActivationCheckpointable):
        # the plan refuses this before Ray starts (orchestrator.config.validate); a model loaded from a run may not
        raise ValueError(
            f"trainer.activation_checkpointing=true: {type(model).__name__} has no blocks to checkpoint "
            "(no enable_activation_checkpointing method)"
        )
    model.enable_activation_checkpointing()


def local_parameter_elements(model: nn.Module) -> int:
    """Parameter elements this rank holds: its ZeRO-3 partitions (`ds_tensor`), or whole parameters otherwise."""
    unique = {id(p): p for p in model.parameters()}
    return sum(int(p.ds_tensor.numel()) if hasattr(p, "ds_tensor") else p.numel() for p in unique.values())
