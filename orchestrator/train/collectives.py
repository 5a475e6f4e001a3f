"""Where the workers' own small collectives (agreements, votes, eval sums) put their tensors.

NCCL reduces CUDA tensors only and gloo CPU tensors only, so a tensor made with torch's default device works on a CPU
worker group and fails on a GPU one ("No backend type associated with device type cpu"). Every such tensor is made
on `collective_device()`."""

from __future__ import annotations

import torch
import torch.distributed as dist


def collective_device() -> torch.device:
    """The current CUDA device under NCCL (DeepSpeed sets it to the worker's GPU), else the CPU."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
