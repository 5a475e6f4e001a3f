"""What the H200 run of benchmarks/gpu_check found, kept checkable on a CPU machine.

- `orch run trainer=gpu` on a machine with a GPU was refused: the local check counted 0 GPUs when cluster.num_gpus
  was null (its documented meaning: all of this machine's GPUs).
- NCCL reduces CUDA tensors only: the workers' own collectives (checkpoint votes, step agreements, the preemption
  flag, eval sums) made their tensors on the CPU and failed there, and eval sums mixed a CPU count into CUDA sums.
"""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import torch

from orchestrator.config import compose, validate
from orchestrator.config.validate import ConfigError
from orchestrator.plan import build_plan
from orchestrator.train.collectives import collective_device
from orchestrator.train.objective import eval_sums

GPU_RUN = ["trainer=gpu", "trainer.num_workers=1", "trainer.cpus_per_worker=1", "cluster.num_cpus=2"]


@pytest.mark.parametrize(("visible", "count"), [("0", 1), ("0,1", 2), ("GPU-1a2b,GPU-3c4d", 2), ("", 0), ("NoDevFiles", 0)])
def test_cuda_visible_devices_is_counted_as_ray_counts_it(monkeypatch, visible, count):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert validate.local_gpu_count() == count


def fake_nvidia_smi(folder: Path, listing: str) -> None:
    """An `nvidia-smi` on PATH that answers the index query as the real one does (one index per line)."""
    script = folder / "nvidia-smi"
    script.write_text(f"#!/bin/sh\nprintf '{listing}'\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


def test_without_cuda_visible_devices_the_gpus_are_nvidia_smis_list(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert validate.local_gpu_count() == 0  # no nvidia-smi: no GPU
    fake_nvidia_smi(tmp_path, "0\\n1\\n2\\n3\\n")
    assert validate.local_gpu_count() == 4


def test_a_gpu_run_plans_on_a_machine_with_a_gpu_when_num_gpus_is_null(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    plan = build_plan(compose(GPU_RUN), cwd=tmp_path)
    assert plan.stages[0].resources_per_worker == {"CPU": 1.0, "GPU": 1.0}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ConfigError, match=r"trainer.num_workers=1: .*need 1 GPUs but this machine has 0"):
        build_plan(compose(GPU_RUN), cwd=tmp_path)


def test_an_explicit_num_gpus_wins_over_the_machines_count(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(ConfigError, match="this machine has 0"):
        build_plan(compose([*GPU_RUN, "cluster.num_gpus=0"]), cwd=tmp_path)


def test_a_cpu_run_never_asks_for_the_gpus(tmp_path, monkeypatch):
    monkeypatch.setattr(validate, "local_gpu_count", lambda: pytest.fail("counted GPUs for a CPU run"))
    assert build_plan(compose(["trainer.num_workers=1", "cluster.num_cpus=2"]), cwd=tmp_path).stages[0].use_gpu is False


def test_eval_sums_stay_on_the_logits_device():
    """The meta device stands in for CUDA: a CPU tensor mixed into its sums fails the same way."""
    logits = torch.empty(4, 8, 16, device="meta")
    targets = torch.empty(4, 8, dtype=torch.long, device="meta")
    assert eval_sums(logits, targets).device.type == "meta"


def test_collectives_are_made_on_the_cpu_under_gloo_and_without_a_group():
    import torch.distributed as dist

    created = not dist.is_initialized()  # an in-process engine test before this one may have left its gloo group
    if created:
        assert collective_device() == torch.device("cpu")
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert dist.get_backend() == "gloo" and collective_device() == torch.device("cpu")
        if created:  # our own one-rank group: gloo reduces the tensor where it was made
            vote = torch.ones(1, dtype=torch.int32, device=collective_device())
            dist.all_reduce(vote, op=dist.ReduceOp.MIN)
            assert int(vote.item()) == 1
    finally:
        if created:
            dist.destroy_process_group()


def test_under_nccl_collectives_are_made_on_the_current_cuda_device(monkeypatch):
    """NCCL cannot start without a GPU; the choice itself is checked here, the NCCL run by benchmarks/gpu_check."""
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda *a: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert collective_device() == torch.device("cuda", 3)
