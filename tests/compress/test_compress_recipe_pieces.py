"""The pieces the compression recipes add on top of the building blocks: fixed-mask hooks, the pruning hook built
from config, the config of a structurally pruned model, feature capture for distillation, self-describing exports,
model sources, and the report's measurements. No Ray, no DeepSpeed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_model
from torch import nn

from orchestrator.compress import (
    FeatureDistillation,
    FixedMasks,
    GradualPruning,
    HiddenState,
    StepEndHook,
    StudentWithProjection,
    prunable_parameters,
    prune_structured,
    pruned_model_config,
    realized_sparsity,
)
from orchestrator.models.cnn import CNN
from orchestrator.models.mlp import MLP
from orchestrator.train.compression import pruning_hook
from orchestrator.artifacts.export import load_exported, mark_quantized

MLP_CFG = {"_target_": "orchestrator.models.mlp.MLP", "input_shape": [1, 8, 8], "num_classes": 10, "hidden_sizes": [32, 32]}
PRUNING = {"schedule": "none", "sparsity": 0.5, "initial_sparsity": 0.0, "scope": "layer", "include": None,
           "exclude": [], "start_fraction": 0.0, "end_fraction": 0.5, "updates": 5, "method": "magnitude",
           "pattern": "unstructured", "calibration_batches": 8}


def mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP([1, 8, 8], 10, [32, 32])


def train_steps(model: nn.Module, optimizer, hook, steps: int) -> None:
    generator = torch.Generator().manual_seed(0)
    for step in range(1, steps + 1):
        x, y = torch.randn(16, 1, 8, 8, generator=generator), torch.randint(0, 10, (16,), generator=generator)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        hook.on_step_end(step)


def test_one_shot_prunes_now_and_the_zeros_hold_through_training():
    model = mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    hook = FixedMasks.one_shot(prunable_parameters(model), 0.75, optimizer=optimizer)
    assert isinstance(hook, StepEndHook)
    assert realized_sparsity(prunable_parameters(model)) == pytest.approx(0.75, abs=0.01)
    zeros = {n: p.detach() == 0 for n, p in prunable_parameters(model).items()}
    assert hook.on_step_end(1) == pytest.approx(0.75, abs=0.01) and hook.on_step_end(2) is None
    train_steps(model, optimizer, hook, 5)
    assert all(torch.equal(p.detach() == 0, zeros[n]) for n, p in prunable_parameters(model).items())


def test_from_zeros_holds_a_pruned_models_zeros_and_restores_from_its_state():
    source = mlp()
    FixedMasks.one_shot(prunable_parameters(source), 0.5)
    fresh = mlp(1)
    fresh.load_state_dict(source.state_dict())
    optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    hook = FixedMasks.from_zeros(prunable_parameters(fresh), optimizer=optimizer)
    train_steps(fresh, optimizer, hook, 4)
    assert realized_sparsity(prunable_parameters(fresh)) == pytest.approx(0.5, abs=0.01)
    # restore into a new model whose weights are dense again: the saved masks win
    restored = mlp(2)
    other = FixedMasks.from_zeros(prunable_parameters(restored))
    other.load_state_dict(hook.state_dict())
    assert realized_sparsity(prunable_parameters(restored)) == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("schedule, expected", [("none", type(None)), ("one_shot", FixedMasks), ("hold", FixedMasks),
                                                ("gradual", GradualPruning)])
def test_the_pruning_config_picks_the_hook(schedule, expected):
    model = mlp()
    hook = pruning_hook(model, {**PRUNING, "schedule": schedule}, max_steps=100, optimizer=None)
    assert isinstance(hook, expected)
    if schedule == "gradual":
        assert hook.schedule == {"initial": 0.0, "final": 0.5, "start_step": 0, "end_step": 50, "frequency": 10}


def test_a_pruning_config_that_selects_nothing_is_an_error():
    with pytest.raises(ValueError, match="selects no parameters"):
        pruning_hook(mlp(), {**PRUNING, "schedule": "one_shot", "include": ["nothing.*"]}, 100, None)


def test_pruned_config_rebuilds_the_smaller_mlp_and_cnn():
    small = prune_structured(mlp(), torch.randn(2, 1, 8, 8), 0.5)
    config = pruned_model_config(MLP_CFG, small)
    assert config["hidden_sizes"] == [16, 16]
    rebuilt = MLP(config["input_shape"], config["num_classes"], config["hidden_sizes"])
    rebuilt.load_state_dict(small.state_dict())
    cnn_cfg = {"_target_": "orchestrator.models.cnn.CNN", "input_shape": [1, 8, 8], "num_classes": 10,
               "channels": [8, 16], "hidden_size": 32}
    cnn = prune_structured(CNN([1, 8, 8], 10, [8, 16], 32), torch.randn(2, 1, 8, 8), 0.5)
    config = pruned_model_config(cnn_cfg, cnn)
    assert config["channels"] == [4, 8] and config["hidden_size"] == 16
    CNN(config["input_shape"], 10, config["channels"], config["hidden_size"]).load_state_dict(cnn.state_dict())
    with pytest.raises(ValueError, match="no config"):
        pruned_model_config({"_target_": "my.Model"}, cnn)


def test_hidden_state_capture_and_the_student_wrapper():
    teacher, student = MLP([1, 8, 8], 10, [64]), mlp()
    seen_t, seen_s = HiddenState(teacher, "head"), HiddenState(student, "head")
    x = torch.randn(4, 1, 8, 8)
    teacher(x)
    wrapper = StudentWithProjection(student, FeatureDistillation(32, 64))
    assert torch.equal(wrapper(x), student(x))
    assert seen_t.value.shape == (4, 64) and seen_s.value.shape == (4, 32)
    loss = wrapper.features(seen_s.value, seen_t.value)
    loss.backward()
    assert wrapper.features.projection.weight.grad is not None
    assert {k for k in wrapper.state_dict() if k.startswith(StudentWithProjection.STATE_PREFIX)} == {
        f"student.{k}" for k in student.state_dict()
    }


def export_dir(tmp_path: Path, model: nn.Module, config: dict) -> Path:
    out = tmp_path / "model"
    out.mkdir()
    save_model(model, str(out / "model.safetensors"))
    (out / "model.yaml").write_text(yaml.safe_dump(config))
    return out


def test_a_quantized_export_loads_int8_or_its_fp32_source(tmp_path):
    model = mlp()
    out = export_dir(tmp_path, model, MLP_CFG)
    mark_quantized(out, ["head"])
    quantized, source = load_exported(out), load_exported(out, quantized=False)
    assert isinstance(source.head, nn.Linear) and isinstance(quantized.head, nn.Linear)  # skipped: stays fp32
    assert type(quantized.body[1].weight).__module__.startswith("torchao")  # re-quantized: no quantized.pt here
    x = torch.randn(8, 1, 8, 8)
    assert (quantized(x).argmax(-1) == model.eval()(x).argmax(-1)).float().mean() >= 0.75


def test_model_sources_from_references(tmp_path):
    from orchestrator.artifacts.source import fetch_model_dir, load_model, model_source

    run_id = "0123456789abcdef0123456789abcdef"
    assert model_source("teacher", "sqlite:///x.db", {"teacher": run_id}) == {
        "run_id": run_id, "artifact_path": "model", "tracking_uri": "sqlite:///x.db", "stage": "teacher"}
    assert model_source(f"runs:/{run_id}/exported", "u", {})["artifact_path"] == "exported"
    assert model_source(run_id, "u", {})["artifact_path"] == "model"
    out = export_dir(tmp_path, mlp(), MLP_CFG)
    source = model_source(str(out), "u", {})
    assert fetch_model_dir(source, tmp_path / "scratch") == out
    model, config = load_model(source)
    assert config == MLP_CFG and not model.training
    with pytest.raises(FileNotFoundError, match="neither an exported model"):
        fetch_model_dir({"path": str(tmp_path / "scratch")}, tmp_path)


def test_report_measures_sizes_sparsity_latency_and_accuracy(tmp_path):
    from orchestrator.data.digits import load_digits_splits
    from orchestrator.pipeline.report import measure, write_report

    data = load_digits_splits()
    model = mlp()
    FixedMasks.one_shot(prunable_parameters(model), 0.9)
    row = measure(model, model, data, batch_size=64)
    assert row["parameters"] == sum(p.numel() for p in model.parameters())
    assert row["nonzero_parameters"] < 0.3 * row["parameters"] and row["sparsity"] > 0.7  # head and biases stay
    assert row["size_gzip_bytes"] < row["size_bytes"] and row["latency_ms"] > 0 and 0 <= row["val_accuracy"] <= 1
    paths = write_report([{"stage": "a", "kind": "train", **row}], tmp_path, "t")
    assert [p.name for p in paths if p.stat().st_size > 0] == [
        "compression_report.csv", "compression_report.md", "accuracy_vs_size.png"]
