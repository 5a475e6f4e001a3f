"""What the H200 run of benchmarks/gpu_check found, kept checkable on a CPU machine.

- `orch run trainer=gpu` on a machine with a GPU was refused: the local check counted 0 GPUs when cluster.num_gpus
  was null (its documented meaning: all of this machine's GPUs).
- NCCL reduces CUDA tensors only: the workers' own collectives (checkpoint votes, step agreements, the preemption
  flag, eval sums) made their tensors on the CPU and failed there, and eval sums mixed a CPU count into CUDA sums.
"""

from __future__ import annotations

import math
import stat
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from orchestrator.config import compose, validate
from orchestrator.config.validate import ConfigError
from orchestrator.plan import build_plan
from orchestrator.train.collectives import collective_device
from orchestrator.train.objective import eval_sums
from orchestrator.train.steps import step_is_finite

GPU_RUN = ["trainer=gpu", "trainer.num_workers=1", "trainer.cpus_per_worker=1", "cluster.num_cpus=2"]


@pytest.mark.parametrize(("visible", "count"), [("0", 1), ("0,1", 2), ("GPU-1a2b,GPU-3c4d", 2), ("", 0), ("NoDevFiles", 0)])
def test_cuda_visible_devices_is_counted_as_ray_counts_it(monkeypatch, visible, count):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert validate.local_gpu_count() == count


def fake_nvidia_smi(folder: Path) -> None:
    """An `nvidia-smi` on PATH that answers the two queries orch makes as the real one does: two GPUs of different
    sizes (CSV, no header, no units)."""
    script = folder / "nvidia-smi"
    script.write_text(
        "#!/bin/sh\n"
        'case "$1" in\n'
        "  --query-gpu=index) printf '0\\n1\\n' ;;\n"
        "  --query-gpu=index,uuid,memory.total) printf '0, GPU-aaa, 81559\\n1, GPU-bbb, 143771\\n' ;;\n"
        "  *) exit 2 ;;\n"
        "esac\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


def test_without_cuda_visible_devices_the_gpus_are_nvidia_smis_list(tmp_path, monkeypatch):
    from orchestrator.memory import local_gpu_memory

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert validate.local_gpu_count() == 0 and local_gpu_memory() is None  # no nvidia-smi: no GPU
    fake_nvidia_smi(tmp_path)
    assert validate.local_gpu_count() == 2
    assert local_gpu_memory() == 81559 * 2**20  # the smallest


@pytest.mark.parametrize(("visible", "mib"), [("1", 143771), ("GPU-bbb", 143771), ("0,1", 81559), ("", None)])
def test_the_memory_budget_is_that_of_the_visible_gpus(tmp_path, monkeypatch, visible, mib):
    from orchestrator.memory import local_gpu_memory

    monkeypatch.setenv("PATH", str(tmp_path))
    fake_nvidia_smi(tmp_path)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert local_gpu_memory() == (None if mib is None else mib * 2**20)


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


# --- what a read of the GPU path found next (not yet run on a GPU: the device time was spent) -------------------


@pytest.mark.parametrize(
    ("loss", "grad_norm", "overflow_skipped", "finite"),
    [
        (2.0, 1.0, False, True),
        (2.0, None, False, True),  # ZeRO-1/2 with the norm's computation off
        (2.0, math.inf, True, True),  # fp16: DeepSpeed skipped the step and lowered the loss scale
        (2.0, math.inf, False, False),  # bf16/fp32: an infinite norm is a divergence
        (2.0, math.nan, False, False),
        (math.nan, math.inf, True, False),  # a non-finite loss always is
        (math.inf, 1.0, False, False),
    ],
)
def test_an_fp16_overflow_is_a_skipped_step_not_a_divergence(loss, grad_norm, overflow_skipped, finite):
    assert step_is_finite(loss, grad_norm, overflow_skipped) is finite


@pytest.mark.parametrize("gpus", ["0.5", "2", "0", "-1"])
def test_a_gpu_worker_is_one_rank_on_one_gpu(gpus):
    with pytest.raises(ConfigError, match=rf"trainer.gpus_per_worker={gpus}(\.0)?: expected 1"):
        validate.validate_trainer(OmegaConf.to_container(compose(["trainer=gpu", f"trainer.gpus_per_worker={gpus}"]).cfg))


def test_gpu_workers_use_deepspeeds_cuda_accelerator_whatever_the_driver_set(monkeypatch):
    from orchestrator.launch.ray_session import worker_env

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # as benchmarks and tests set it for the driver's own DeepSpeed
    assert worker_env({}, use_gpu=True)["DS_ACCELERATOR"] == "cuda"
    assert worker_env({}, use_gpu=False)["DS_ACCELERATOR"] == "cpu"
    assert worker_env({"env": {"DS_ACCELERATOR": "xpu"}}, use_gpu=True)["DS_ACCELERATOR"] == "xpu"  # cluster.env wins


def test_int4_and_fp8_quantize_a_bf16_model():
    from orchestrator.compress.quantize import weight_dtype_for

    assert weight_dtype_for("int4_weight_only") == weight_dtype_for("fp8") == torch.bfloat16
    assert weight_dtype_for("int8_dynamic") == weight_dtype_for("int8_weight_only") == torch.float32


def test_a_bf16_model_is_evaluated_on_fp32_inputs_in_its_own_dtype():
    """fp8 leaves the layers it does not quantize in bf16 (a CNN's convolutions, a skipped head)."""
    from torch.utils.data import TensorDataset

    from orchestrator.train.objective import evaluate_module

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    data = TensorDataset(torch.randn(10, 4), torch.arange(10) % 3)
    fp32 = evaluate_module(model, data, "classification", 4)
    bf16 = evaluate_module(model.to(torch.bfloat16), data, "classification", 4)
    assert bf16["val_loss"] == pytest.approx(fp32["val_loss"], rel=0.05)


def test_a_stage_without_cpu_latency_is_shown_and_summarised_without_one():
    """A model quantized for CUDA (int4, fp8) has no one-thread CPU latency: a dash, no speed-up, a gate that fails."""
    from rich.console import Console

    from orchestrator.pipeline.promote import evaluate_gates
    from orchestrator.pipeline.report import print_report, summary_metrics

    rows = [
        {"stage": "train", "kind": "train", "run_id": "a", "size_bytes": 4096, "latency_ms": 2.0, "val_accuracy": 0.9},
        {"stage": "int4", "kind": "quantize", "run_id": "b", "size_bytes": 1024, "latency_ms": None, "val_accuracy": 0.89},
    ]
    summary = summary_metrics(rows)
    assert summary["size_ratio"] == 4.0 and "latency_speedup" not in summary and "final_latency_ms" not in summary
    console = Console(width=120, record=True)
    print_report(rows, console, "report")
    shown = console.export_text()
    assert "2.00 ms" in shown and " - " in shown
    (gate,) = evaluate_gates({"min_latency_ratio": {"min": 1.5, "vs": None}}, rows)
    assert gate.passed is False and math.isnan(gate.value)


def test_feature_distillation_compares_fp16_students_in_fp32():
    """A teacher feature beyond fp16's range (65504) became inf when cast to an fp16 student's dtype."""
    from orchestrator.compress import FeatureDistillation

    loss = FeatureDistillation(4, 4)(torch.zeros(2, 4, dtype=torch.float16), torch.full((2, 4), 7.0e4))
    assert torch.isfinite(loss) and float(loss) == pytest.approx(4.9e9)
