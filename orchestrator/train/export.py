"""Final model export: a consolidated fp32 state dict in safetensors plus the model's config, loadable without DeepSpeed.

Why from the checkpoint and not from a worker's module: under ZeRO the fp32 master weights are partitioned across
ranks and, with bf16, the module holds only bf16 copies. DeepSpeed's `zero_to_fp32` rebuilds the full fp32
weights from the merged checkpoint that Ray Train stored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
import yaml
from torch import nn

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model.yaml"


def consolidated_state_dict(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    checkpoint_dir = Path(checkpoint_dir)
    tag = (checkpoint_dir / "latest").read_text().strip()
    if any((checkpoint_dir / tag).glob("*optim_states.pt")):  # ZeRO >= 1, or a bf16 optimizer: fp32 partitions
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
    # ZeRO-0 in fp32: the module's own weights are the master copy. A DeepSpeed checkpoint is a pickle that this
    # run wrote itself (it also holds non-tensor engine state), hence weights_only=False.
    states = torch.load(checkpoint_dir / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return {name: tensor.float() for name, tensor in states["module"].items()}


def export_model(checkpoint_dir: str | Path, model_cfg: Mapping[str, Any], out_dir: str | Path) -> Path:
    from hydra.utils import instantiate
    from safetensors.torch import save_model

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model: nn.Module = instantiate(dict(model_cfg))
    model.load_state_dict(consolidated_state_dict(checkpoint_dir))
    save_model(model, str(out_dir / WEIGHTS_FILE))  # handles tied weights (GPT's lm_head ↔ tok_emb)
    (out_dir / CONFIG_FILE).write_text(yaml.safe_dump(dict(model_cfg), sort_keys=False))
    return out_dir


def load_exported(model_dir: str | Path) -> nn.Module:
    """Rebuild the model from its config and load the weights with safetensors (no pickle is ever executed)."""
    from hydra.utils import instantiate
    from safetensors.torch import load_model

    model_dir = Path(model_dir)
    model: nn.Module = instantiate(yaml.safe_load((model_dir / CONFIG_FILE).read_text()))
    load_model(model, str(model_dir / WEIGHTS_FILE))
    return model.eval()
