"""Export reads real DeepSpeed checkpoints of every ZeRO stage and precision with weights_only=True, and gets the same
fp32 weights as DeepSpeed's own loader (which unpickles anything). Single process, gloo, CPU."""

from __future__ import annotations

import os

import pytest
import torch
import yaml

deepspeed = pytest.importorskip("deepspeed")

from orchestrator.artifacts.export import export_model, load_exported  # noqa: E402
from orchestrator.models.mlp import MLP  # noqa: E402

pytestmark = [
    pytest.mark.usefixtures("single_process_group"),
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning", "ignore::FutureWarning"),
]
MODEL = {"_target_": "orchestrator.models.mlp.MLP", "input_shape": [1, 8, 8], "num_classes": 10, "hidden_sizes": [16]}


def checkpoint(tmp_path, stage: int, precision: str, optimizer: str):
    """A checkpoint laid out as orch's loop writes it: DeepSpeed's files, `latest`, orch_model.yaml."""
    torch.manual_seed(0)
    model = MLP(input_shape=[1, 8, 8], num_classes=10, hidden_sizes=[16])
    config = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": stage}, "gradient_clipping": 1.0}
    client = None
    if optimizer == "adamw":
        config["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}
    else:
        client, config["zero_allow_untested_optimizer"] = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9), True
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=client, model_parameters=None if client else model.parameters(), config=config)
    for _ in range(2):
        x = torch.randn(4, 1, 8, 8, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
        engine.backward(engine(x).float().pow(2).mean())
        engine.step()
    directory = tmp_path / "checkpoint"
    engine.save_checkpoint(str(directory), tag="step_00000002", client_state={"step": 2, "hooks": {"sparsity": {"step": 2}}})
    (directory / "orch_model.yaml").write_text(yaml.safe_dump({"model": MODEL}))
    return directory


def reference_weights(directory) -> dict[str, torch.Tensor]:
    """What export read before it refused pickles: DeepSpeed's loader and torch.load(weights_only=False)."""
    tag = (directory / "latest").read_text().strip()
    if any((directory / tag).glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import (
            get_fp32_state_dict_from_zero_checkpoint,
        )

        return get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=tag)
    states = torch.load(directory / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return {name: tensor.float() for name, tensor in states["module"].items()}


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_export_reads_every_zero_stage_weights_only(tmp_path, stage, precision, optimizer):
    directory = checkpoint(tmp_path, stage, precision, optimizer)
    exported = load_exported(export_model(directory, {}, tmp_path / "model"))
    expected = reference_weights(directory)
    state = exported.state_dict()
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(state[name], tensor.float(), rtol=0, atol=0)
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ
