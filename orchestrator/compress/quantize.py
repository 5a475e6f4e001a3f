"""Post-training weight quantization through torchao (`quantize_` with one of its configs), for inference.

Methods (``QUANT_METHODS``), each a torchao config applied to every ``nn.Linear`` (GPT-2's ``Conv1D`` layers are
turned into the equivalent ``nn.Linear`` first, so Hugging Face GPT-2 is quantized too):

  int8_dynamic      int8 weights (per-channel), activations quantized per token at run time; CPU and GPU
  int8_weight_only  int8 weights, fp32/bf16 activations (the matmul dequantizes); CPU and GPU
  int4_weight_only  int4 weights in groups of 128 (tinygemm kernels): CUDA only
  fp8               float8 weights and activations (per-row scales): CUDA only (SM 8.9+)

Use::

    small = quantize_model(model, "int8_weight_only", skip=["lm_head"])   # a quantized copy; `model` is untouched
    save_quantized(small, "quantized.pt")                                  # torchao tensor subclasses, no pickle
    again = load_quantized(fp32_rebuilt_model, "int8_weight_only", [], "quantized.pt")

Saving: ``torch.save(state_dict)`` of torchao's tensor subclasses; reloading uses ``torch.load(weights_only=True)``,
which accepts them because torchao registers its tensor classes with ``torch.serialization.add_safe_globals`` on
import, so nothing in the file can name code to run. The structure (which layers are quantized how) is rebuilt
from the model config and the method, then the stored tensors are assigned into it.

Suggested settings: int8_weight_only is the safe default for LMs (memory-bound decoding, ~4x smaller Linear
weights, small perplexity cost); int8_dynamic also speeds up compute-bound CPU inference; keep the output head in
full precision (``skip=["lm_head"]``) if the quality drop matters.

DeepSpeed ZeRO and precision: this is an export step, not a training technique. Consolidate the weights first
(``engine.module`` under ZeRO 0-2, or ``zero_to_fp32`` for ZeRO-3 checkpoints); the copy is quantized from fp32.
The result cannot be trained or wrapped by DeepSpeed. This module replaces the deprecated ``torch.ao`` eager
``quantize_dynamic`` path.
"""

from __future__ import annotations

import copy
import io
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

__all__ = [
    "CUDA_ONLY_METHODS",
    "QUANT_METHODS",
    "load_quantized",
    "method_device_problem",
    "one_thread_latency_ms",
    "quantize_dynamic_int8",
    "quantize_model",
    "save_quantized",
    "serialized_size_bytes",
]

QUANT_METHODS = ("int8_dynamic", "int8_weight_only", "int4_weight_only", "fp8")
CUDA_ONLY_METHODS = ("int4_weight_only", "fp8")
LEGACY_METHODS = {"dynamic_int8": "int8_dynamic"}  # quantization.yaml written before torchao


def method_device_problem(method: str, device: str) -> Optional[str]:
    """Why `method` cannot run on `device` ("cpu" or "cuda"), or None: torchao ships int4/fp8 kernels for CUDA only."""
    if method not in QUANT_METHODS:
        return f"expected one of {', '.join(QUANT_METHODS)}"
    if method in CUDA_ONLY_METHODS and device != "cuda":
        return (
            f"torchao has {method} kernels for CUDA only, and the device is {device}; use recipe.device=cuda on a GPU "
            "machine, or int8_weight_only / int8_dynamic on CPU"
        )
    return None


def _torchao_config(method: str) -> Any:
    import torchao.quantization as tq

    if method == "int8_dynamic":
        return tq.Int8DynamicActivationInt8WeightConfig()
    if method == "int8_weight_only":
        return tq.Int8WeightOnlyConfig()
    if method == "int4_weight_only":
        return tq.Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d")
    if method == "fp8":
        from torchao.quantization.granularity import PerRow

        return tq.Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    raise ValueError(f"quantization method {method!r}: expected one of {', '.join(QUANT_METHODS)}")


def _conv1d_as_linear(model: nn.Module) -> None:
    """Replace transformers' `Conv1D` (weight [in, out]) by the same `nn.Linear` (weight [out, in]), in place:
    torchao quantizes nn.Linear only, and GPT-2's projections are all Conv1D."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                linear = nn.Linear(child.weight.shape[0], child.weight.shape[1], device=child.weight.device)
                with torch.no_grad():
                    linear.weight.copy_(child.weight.t())
                    linear.bias.copy_(child.bias)
                setattr(parent, name, linear)


def _resolve(method: str) -> str:
    return LEGACY_METHODS.get(method, method)


def weight_dtype_for(method: str) -> torch.dtype:
    """The precision a model is put in before `method` quantizes it: float8 matmuls take bf16 activations, and
    torchao's int4 tile packing accepts bf16 weights only (an fp32 model fails its assertion)."""
    return torch.bfloat16 if _resolve(method) in ("fp8", "int4_weight_only") else torch.float32


def quantize_model(model: nn.Module, method: str = "int8_dynamic", skip: Sequence[str] = (), device: str = "cpu") -> nn.Module:
    """A quantized copy of `model` on `device` (the original is untouched); Linear modules named in `skip` stay in
    full precision. Raises ValueError for an unknown method, skip name, or a method the device has no kernels for."""
    method = _resolve(method)
    problem = method_device_problem(method, device)
    if problem:
        raise ValueError(f"quantization method {method!r}: {problem}")
    from torchao.quantization import quantize_

    float_model = copy.deepcopy(model).float().eval().to(device)
    skipped = set(skip)
    unknown = skipped - {name for name, _ in float_model.named_modules()}
    if unknown:
        raise ValueError(f"skip names {sorted(unknown)} are not submodules of the model")
    _conv1d_as_linear(float_model)
    float_model = float_model.to(weight_dtype_for(method))
    quantize_(
        float_model,
        _torchao_config(method),
        filter_fn=lambda module, name: isinstance(module, nn.Linear) and name not in skipped,
    )
    return float_model


def quantize_dynamic_int8(model: nn.Module, skip: Sequence[str] = ()) -> nn.Module:
    """`quantize_model(model, "int8_dynamic", skip)` on CPU: the name earlier releases exported."""
    return quantize_model(model, "int8_dynamic", skip)


def save_quantized(model: nn.Module, path: str | Path) -> None:
    """The quantized state dict (torchao tensor subclasses) in torch's zip format, loadable with weights_only=True."""
    torch.save(model.state_dict(), str(path))


def load_quantized(model: nn.Module, method: str, skip: Sequence[str], path: str | Path, device: str = "cpu") -> nn.Module:
    """The quantized model saved at `path`, on the architecture of `model` (fp32, rebuilt from its config): the same
    layers are quantized to get the structure, then the stored tensors replace theirs. Only tensors are read."""
    quantized = quantize_model(model, method, skip, device)
    import torchao  # noqa: F401  registers the tensor subclasses as safe globals for weights_only loading

    state = torch.load(str(path), map_location=device, weights_only=True)
    quantized.load_state_dict(state, assign=True)
    return quantized.eval()


def serialized_size_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``: the checkpoint size a user would ship."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def one_thread_latency_ms(model: nn.Module, example: torch.Tensor, repeats: int = 10) -> float:
    """Median milliseconds of one forward pass on CPU with one intra-op thread (what a small CPU server sees),
    after one warm-up pass; the process's thread setting is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = []
        with torch.inference_mode():
            model(example)
            for _ in range(repeats):
                start = time.perf_counter()
                model(example)
                times.append((time.perf_counter() - start) * 1000.0)
    finally:
        torch.set_num_threads(threads)
    return sorted(times)[len(times) // 2]
