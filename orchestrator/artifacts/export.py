"""Final model export: a consolidated fp32 state dict in safetensors plus the model's config, loadable without DeepSpeed.

Why from the checkpoint and not from a worker's module: under ZeRO the fp32 master weights are partitioned across
ranks and, with bf16, the module holds only bf16 copies. DeepSpeed's `zero_to_fp32` rebuilds the full fp32
weights from the merged checkpoint that Ray Train stored.

A checkpoint and a model folder are data (orchestrator.config.trust): their model configs are checked against the
allowlisted classes before anything is built, and every pickle in a checkpoint is read with
`torch.load(weights_only=True)`, DeepSpeed's own loads included.
"""

from __future__ import annotations

import pickle
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
import yaml
from torch import nn

from orchestrator.config.trust import BUILT_IN_MODEL_TARGETS, checked_model_config
from orchestrator.config.validate import ConfigError
from orchestrator.environment import environment

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model.yaml"
QUANTIZATION_FILE = "quantization.yaml"
QUANTIZED_FILE = "quantized.pt"  # torchao state dict, read with weights_only=True
# Written by the worker loop into each checkpoint: the architecture it holds and where in the state it lives.
MODEL_SPEC_FILE = "orch_model.yaml"


_FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_FORCE_NO_WEIGHTS_ONLY = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


def deepspeed_checkpoint_types() -> list[type]:
    """The non-tensor classes DeepSpeed 0.19 pickles into ZeRO optimizer states (found with
    `torch.serialization.get_unsafe_globals_in_checkpoint` over ZeRO 1-3 x fp32/bf16 x AdamW/SGD checkpoints; the
    dynamic scaler is fp16's, GPU only). Each is rebuilt from its pickled attributes; none runs code on load."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]


@contextmanager
def weights_only_loads(allowed: Iterable[type] = ()) -> Iterator[None]:
    """Every `torch.load` inside reads with weights_only=True, plus the `allowed` classes.

    Why torch's environment switch and not a `weights_only=True` argument: DeepSpeed's `zero_to_fp32` calls
    `torch.load(..., weights_only=False)` itself, and `TORCH_FORCE_WEIGHTS_ONLY_LOAD` is the one setting torch
    applies over an explicit False. It is process-wide while the block runs: export loads one checkpoint at a time.
    """
    from torch.serialization import safe_globals

    with environment({_FORCE_WEIGHTS_ONLY: "1", _FORCE_NO_WEIGHTS_ONLY: None}), safe_globals(list(allowed)):
        yield


def consolidated_state_dict(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    checkpoint_dir = Path(checkpoint_dir)
    tag = (checkpoint_dir / "latest").read_text().strip()
    try:
        if any((checkpoint_dir / tag).glob("*optim_states.pt")):  # ZeRO >= 1, or a bf16 optimizer: fp32 partitions
            from deepspeed.utils.zero_to_fp32 import (
                get_fp32_state_dict_from_zero_checkpoint,
            )

            with weights_only_loads(deepspeed_checkpoint_types()):
                return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
        # ZeRO-0: the module's own weights are the master copy. Its model states hold tensors and plain values only.
        states = torch.load(checkpoint_dir / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise _unsafe_checkpoint(checkpoint_dir / tag, error) from error
    return {name: tensor.float() for name, tensor in states["module"].items()}


def _unsafe_checkpoint(tag_dir: Path, error: pickle.UnpicklingError) -> ConfigError:
    """The refusal of a checkpoint whose pickles name more than tensors and DeepSpeed's checkpoint types; the
    offending names come from scanning the pickles' opcodes, which runs nothing."""
    from torch.serialization import get_unsafe_globals_in_checkpoint

    known = {f"{cls.__module__}.{cls.__qualname__}" for cls in deepspeed_checkpoint_types()}
    found = sorted({name for file in tag_dir.glob("*.pt") for name in get_unsafe_globals_in_checkpoint(file)} - known)
    if not found:
        return ConfigError(str(tag_dir), "unreadable", f"torch.load(weights_only=True) refused it: {str(error).splitlines()[0]}")
    return ConfigError(
        str(tag_dir), ", ".join(found),
        "the checkpoint's pickles name these Python objects, which orch does not load: it reads checkpoints with "
        "torch.load(weights_only=True), which builds tensors, plain values and DeepSpeed's own checkpoint types "
        "and runs no other code",
    )


def export_model(
    checkpoint_dir: str | Path,
    model_cfg: Mapping[str, Any],
    out_dir: str | Path,
    allowed: Iterable[str] = BUILT_IN_MODEL_TARGETS,
) -> Path:
    """Consolidate a checkpoint into `out_dir`. The checkpoint's own model spec (orch_model.yaml, written by the
    worker loop) wins over `model_cfg`: a structured-pruning stage changes the architecture, and a distillation
    stage trains the student inside a wrapper whose extra weights are not part of the model. The spec is data: its
    class must be one of `allowed` (`orchestrator.config.trust.trusted_model_targets` of the run's config)."""
    from hydra.utils import instantiate
    from safetensors.torch import save_model

    prefix = ""
    spec_file = Path(checkpoint_dir) / MODEL_SPEC_FILE
    if spec_file.is_file():
        spec = yaml.safe_load(spec_file.read_text())
        spec = spec if isinstance(spec, dict) else {}
        model_cfg = checked_model_config(spec.get("model"), str(spec_file), allowed)
        prefix = spec.get("state_prefix") or ""
        if not isinstance(prefix, str):
            raise ConfigError(str(spec_file), prefix, "expected state_prefix to be a string")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = consolidated_state_dict(checkpoint_dir)
    if prefix:
        state = {name[len(prefix):]: tensor for name, tensor in state.items() if name.startswith(prefix)}
    model: nn.Module = instantiate(dict(model_cfg))
    model.load_state_dict(state)
    save_model(model, str(out_dir / WEIGHTS_FILE))  # handles tied weights (GPT's lm_head ↔ tok_emb)
    if is_hf_model(model):
        model_cfg = export_hf_model(model, model_cfg, out_dir)
    (out_dir / CONFIG_FILE).write_text(yaml.safe_dump(dict(model_cfg), sort_keys=False))
    return out_dir


HF_DIR = "hf"  # beside model.safetensors: the same weights as a Hugging Face model directory


def is_hf_model(model: nn.Module) -> bool:
    from orchestrator.models.hf_causal_lm import HFCausalLM

    return isinstance(model, HFCausalLM)


def export_hf_model(model: nn.Module, model_cfg: Mapping[str, Any], out_dir: Path) -> dict[str, Any]:
    """Hugging Face LMs also go out as `save_pretrained` (plus the tokenizer of a pretrained source), so that
    `AutoModelForCausalLM.from_pretrained(<model>/hf)` loads them anywhere (their MLflow Model, like every model's,
    is written by `orchestrator.artifacts.mlflow_model`). Returns the model.yaml to write: the full
    architecture, independent of the pretrained directory it may have started from."""
    from orchestrator.models.hf_causal_lm import hf_model_config

    hf_dir = out_dir / HF_DIR
    model.hf.save_pretrained(str(hf_dir))  # type: ignore[union-attr, operator]
    source = model_cfg.get("pretrained_path")
    if source and any(Path(source, name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(source, local_files_only=True).save_pretrained(str(hf_dir))
    return hf_model_config(model)  # type: ignore[arg-type]


def mark_quantized(model_dir: str | Path, skip: list[str], method: str = "int8_dynamic", device: str = "cpu") -> None:
    """Record that the model in `model_dir` is served quantized (`load_exported` returns it quantized).

    The fp32 safetensors stay beside it (the source of any later stage, and of the MLflow Model); the quantized
    tensors, when a stage saved them (`QUANTIZED_FILE`, torchao's tensor subclasses), are read back with
    `torch.load(weights_only=True)`; without that file (folders from before torchao) the deterministic
    quantization is applied again to the fp32 weights.
    """
    record = {"method": method, "skip": list(skip), "device": device}
    (Path(model_dir) / QUANTIZATION_FILE).write_text(yaml.safe_dump(record))


def load_exported(model_dir: str | Path, quantized: bool = True, allowed: Iterable[str] = BUILT_IN_MODEL_TARGETS) -> nn.Module:
    """Rebuild the model from its config and load the weights with safetensors (no pickle is ever executed).

    The config must name one of the `allowed` classes (orch's own, unless the caller's config trusts more).
    A model its stage quantized comes back quantized (recipe.method) unless `quantized=False` (its fp32 source weights)."""
    from hydra.utils import instantiate
    from safetensors.torch import load_model

    model_dir = Path(model_dir)
    config_file = model_dir / CONFIG_FILE
    model_cfg = checked_model_config(yaml.safe_load(config_file.read_text()), str(config_file), allowed)
    model: nn.Module = instantiate(model_cfg)
    load_model(model, str(model_dir / WEIGHTS_FILE))
    quantization = model_dir / QUANTIZATION_FILE
    if quantized and quantization.is_file():
        from orchestrator.compress.quantize import load_quantized, quantize_model

        record = yaml.safe_load(quantization.read_text())
        method, skip = str(record["method"]), list(record["skip"])
        device = str(record.get("device", "cpu"))
        if (model_dir / QUANTIZED_FILE).is_file():
            return load_quantized(model, method, skip, model_dir / QUANTIZED_FILE, device)
        return quantize_model(model, method, skip, device).eval()
    return model.eval()
