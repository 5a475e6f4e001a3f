"""Optimizer offload to CPU for real: DeepSpeed engines built from the config `trainer.offload.optimizer=cpu` generates
(ZeRO-Offload), single process, gloo, CPU. The offloaded engine keeps its optimizer states off the model's device
path and trains to the same weights as the engine without offload."""

from __future__ import annotations

import pytest
import torch

deepspeed = pytest.importorskip("deepspeed")

from omegaconf import OmegaConf  # noqa: E402

from orchestrator.config import compose  # noqa: E402
from orchestrator.models.mlp import MLP  # noqa: E402
from orchestrator.plan import deepspeed_config  # noqa: E402
from orchestrator.train.engine import build_engine  # noqa: E402

pytestmark = [
    pytest.mark.usefixtures("single_process_group"),
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning", "ignore::FutureWarning"),
]


def trained_weights(*overrides: str) -> tuple[torch.Tensor, object]:
    trainer = OmegaConf.to_container(
        compose(["trainer.num_workers=1", "trainer.micro_batch_size=4", "trainer.max_steps=5", *overrides]).cfg.trainer,
        resolve=True, enum_to_str=True,
    )
    torch.manual_seed(0)
    model = MLP(input_shape=[1, 8, 8], num_classes=10, hidden_sizes=[16])
    engine = build_engine(model, deepspeed_config(trainer, "fp32"), trainer["optimizer"], precision_auto=False)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(4, 1, 8, 8, generator=generator)
        engine.backward(engine(x).pow(2).mean())
        engine.step()
    return torch.cat([p.detach().flatten().clone() for p in engine.module.parameters()]), engine.optimizer


def test_optimizer_offload_to_cpu_trains_like_the_same_stage_without_it():
    offloaded, optimizer = trained_weights("trainer.zero_stage=2", "trainer.offload.optimizer=cpu")
    assert optimizer.cpu_offload is True  # DeepSpeed's ZeRO-Offload path, not a silent no-op
    reference, plain = trained_weights("trainer.zero_stage=2")
    assert plain.cpu_offload is False
    initial, _ = trained_weights("trainer.zero_stage=2", "trainer.max_steps=5", "trainer.optimizer.lr=1e-12")
    assert not torch.allclose(offloaded, initial, atol=1e-6)  # it trained
    assert torch.allclose(offloaded, reference, atol=1e-5)
