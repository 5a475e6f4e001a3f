"""Any Hugging Face `transformers` causal language model, as a module whose forward returns logits [B, L, V].

Two ways to get one:
- from a config: `model_type` ("gpt2", "llama", ... anything `AutoConfig.for_model` knows) plus `config` (that
  architecture's own keys, e.g. n_layer/n_head/n_embd for GPT-2), randomly initialised;
- from a local directory of pretrained weights (`pretrained_path`), with `local_files_only=True`: orch never
  downloads at run time, so a missing directory is an error naming the key rather than a hub request.

Why a wrapper: the worker loop, evaluation, distillation and the compression report all call `model(tokens)` and
expect a logits tensor; transformers models return an output object and take keyword arguments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from orchestrator.config.validate import missing_pretrained_reason

# keys of a config's to_dict() that describe the file, not the architecture
_BOOKKEEPING = ("transformers_version", "model_type", "architectures", "dtype", "torch_dtype", "_name_or_path")


def _plain(config: Any) -> dict[str, Any]:
    """hydra.utils.instantiate hands nested dicts over as DictConfig; transformers' typed configs want plain ones."""
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else dict(config)  # type: ignore[return-value]


class HFCausalLM(nn.Module):
    def __init__(
        self,
        model_type: Optional[str] = "gpt2",
        config: Optional[dict[str, Any]] = None,
        vocab_size: Optional[int] = None,
        block_size: Optional[int] = None,
        pretrained_path: Optional[str] = None,
    ) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one bar per load per worker per stage floods the run's logs

        if pretrained_path:
            reason = missing_pretrained_reason(pretrained_path)
            if reason:
                raise FileNotFoundError(f"model.pretrained_path={pretrained_path}: {reason}")
            directory = str(Path(pretrained_path).expanduser())
            if torch.empty(0).device.type == "meta":  # sizing (orch plan): the architecture, without its weights
                self.hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory, local_files_only=True))
            else:
                self.hf = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True)
        else:
            if not model_type:
                raise ValueError("model.model_type is required when model.pretrained_path is not set")
            settings = _plain(config or {})
            if vocab_size is not None:
                settings["vocab_size"] = vocab_size
            if block_size is not None:
                settings["max_position_embeddings"] = block_size  # GPT-2's attribute_map turns it into n_positions
            hf_config = AutoConfig.for_model(model_type, **settings)
            for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # defaults from a bigger vocabulary
                token = getattr(hf_config, key, None)
                if isinstance(token, int) and token >= hf_config.vocab_size:
                    setattr(hf_config, key, None)
            self.hf = AutoModelForCausalLM.from_config(hf_config)
        self.block_size = int(getattr(self.hf.config, "max_position_embeddings", 0) or 0) or None

    def forward(self, idx: Tensor) -> Tensor:
        return self.hf(input_ids=idx, use_cache=False).logits

    def enable_activation_checkpointing(self) -> None:
        """transformers' activation (formerly "gradient") checkpointing: each decoder layer's activations are
        recomputed in the backward pass (non-reentrant, so gradients and ZeRO-3's gather hooks behave as without it)."""
        self.hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

    @property
    def vocab_size(self) -> int:
        return int(self.hf.config.vocab_size)


def hf_model_config(model: HFCausalLM) -> dict[str, Any]:
    """The orch model config that rebuilds `model`'s architecture exactly (after pruning too), without the
    pretrained directory it may have come from: what export writes to model.yaml."""
    settings = {k: v for k, v in model.hf.config.to_diff_dict().items() if k not in _BOOKKEEPING}
    return {
        "_target_": f"{HFCausalLM.__module__}.{HFCausalLM.__qualname__}",
        "model_type": model.hf.config.model_type,
        "config": settings,
        "vocab_size": None,
        "block_size": None,
        "pretrained_path": None,
    }
