"""One fp32 ZeRO-0 rank skips DeepSpeed's gradient all-reduce with itself, and trains to the same weights."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, os, socket, sys
with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0)); port = probe.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", DS_ACCELERATOR="cpu")
import torch
from orchestrator.train.engine import build_engine
precision, skip = sys.argv[1], sys.argv[2] == "skip"
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "gradient_clipping": 1.0,
          "zero_optimization": {"stage": 0}, "optimizer": {"type": "AdamW", "params": {"lr": 0.01, "torch_adam": True}}}
if precision == "bf16":
    config["bf16"] = {"enabled": True}
engine = build_engine(model, config, {"name": "adamw"}, precision_auto=False)
skipped = not engine.enable_backward_allreduce
if not skip:
    engine.enable_backward_allreduce = True
data = torch.randn(40, 8, generator=torch.Generator().manual_seed(1))
labels = torch.randint(0, 3, (40,), generator=torch.Generator().manual_seed(2))
for start in range(0, 40, 4):
    inputs = data[start:start + 4].to(next(engine.module.parameters()).dtype)
    loss = torch.nn.functional.cross_entropy(engine(inputs).float(), labels[start:start + 4])
    engine.backward(loss)
    engine.step()
print(json.dumps({"skipped": skipped, "weights": [p.detach().float().flatten().tolist() for p in engine.module.parameters()]}))
"""


def _train(precision: str, mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT, precision, mode], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_single_fp32_rank_skips_the_allreduce_and_trains_identically():
    skipped, reduced = _train("fp32", "skip"), _train("fp32", "reduce")
    assert skipped["skipped"] is True
    assert skipped["weights"] == reduced["weights"]  # bit for bit: the all-reduce over one rank is the identity


@pytest.mark.slow
def test_bf16_keeps_the_allreduce():
    assert _train("bf16", "skip")["skipped"] is False


def test_the_zero3_fp32_partition_fix_is_still_needed_and_leaves_deepspeed_as_it_was():
    """orchestrator.train.engine.zero3_shares_its_fp32_partition exists because DeepSpeed's stage-3 optimizer compares
    a tensor's torch.device with the accelerator's device name (a str). When this fails, DeepSpeed's check has
    changed: see whether the fix is still needed."""
    import inspect

    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3

    from orchestrator.train.engine import zero3_shares_its_fp32_partition

    assert ".device == self.device" in inspect.getsource(Stage3._create_fp32_partitions)
    assert "self.device = get_accelerator().current_device_name()" in inspect.getsource(Stage3.__init__)
    assert torch_device_equals_its_name() is False
    original = Stage3._create_fp32_partitions
    with zero3_shares_its_fp32_partition():
        assert Stage3._create_fp32_partitions is not original
    assert Stage3._create_fp32_partitions is original


def torch_device_equals_its_name() -> bool:
    import torch

    return torch.zeros(1).device == "cpu"
