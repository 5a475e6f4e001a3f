"""Model FLOPs utilisation (MFU): achieved training FLOP/s over the accelerators' peak, as in the PaLM paper.

Training FLOPs per token or sample come from the model when it knows them (`estimate_flops_per_token`, the GPT),
else from the usual 6·N rule (forward + backward ≈ 6 FLOPs per parameter per token or sample). The peak is dense
bf16/fp16 tensor-core throughput, from `trainer.peak_tflops` when set, else from a small table looked up by the
CUDA device name. CPU runs have no meaningful peak here and report no MFU.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from orchestrator.models.sizes import parameter_count

# Dense (no sparsity) bf16 tensor-core TFLOP/s per device, from the vendors' data sheets. Longest name first wins.
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,  # SXM
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "V100": 125.0,  # fp16 (no bf16 on Volta)
    "T4": 65.0,  # fp16
}


def peak_flops_for(device_name: str, override_tflops: Optional[float] = None) -> Optional[float]:
    """Peak FLOP/s of one device, or None when the device is unknown and no override is given."""
    if override_tflops:
        return override_tflops * 1e12
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key.lower() in device_name.lower():
            return PEAK_BF16_TFLOPS[key] * 1e12
    return None


def flops_per_sample(model: nn.Module, tokens_per_sample: int = 1) -> float:
    """Training FLOPs for one sample (a sequence of `tokens_per_sample` tokens for a language model)."""
    estimate = getattr(model, "estimate_flops_per_token", None)
    per_token = float(estimate()) if callable(estimate) else 6.0 * parameter_count(model)
    return per_token * tokens_per_sample


def mfu(samples_per_s: float, flops_per_sample_: float, num_devices: int, peak_flops_per_device: float) -> float:
    """Fraction (0-1) of the devices' combined peak that the measured throughput achieves."""
    return samples_per_s * flops_per_sample_ / (num_devices * peak_flops_per_device)
