"""The generated DeepSpeed config and the memory estimate, from the trainer group alone."""

from __future__ import annotations

import pytest

from orchestrator.config import compose
from orchestrator.plan import build_plan, deepspeed_config, estimate_memory


def trainer(*overrides: str) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(compose(list(overrides)).cfg.trainer, resolve=True, enum_to_str=True)


def test_generated_deepspeed_config_follows_the_trainer_group():
    config = deepspeed_config(
        trainer("trainer.zero_stage=2", "trainer.micro_batch_size=16", "trainer.grad_accum_steps=4", "trainer.num_workers=2"),
        "bf16",
    )
    assert config["zero_optimization"] == {"stage": 2}
    assert config["train_batch_size"] == 16 * 4 * 2
    assert config["bf16"] == {"enabled": True} and "fp16" not in config
    assert config["optimizer"]["type"] == "AdamW" and config["optimizer"]["params"]["torch_adam"] is True
    assert config["scheduler"]["type"] == "WarmupCosineLR"
    assert config["gradient_clipping"] == 1.0


def test_fp16_has_dynamic_loss_scaling_and_sgd_is_a_client_optimizer():
    config = deepspeed_config(trainer("trainer.optimizer.name=sgd", "trainer.scheduler.name=linear", "trainer.grad_clip=0"), "fp16")
    assert config["fp16"]["enabled"] and config["fp16"]["loss_scale"] == 0
    assert "optimizer" not in config and config["zero_allow_untested_optimizer"] is True
    assert config["scheduler"]["type"] == "WarmupDecayLR"
    assert "gradient_clipping" not in config


def test_raw_deepspeed_json_overlays_the_generated_config():
    config = deepspeed_config(
        trainer("+trainer.deepspeed.zero_optimization.overlap_comm=true", "+trainer.deepspeed.wall_clock_breakdown=true"),
        "fp32",
    )
    assert config["zero_optimization"] == {"stage": 0, "overlap_comm": True}
    assert config["wall_clock_breakdown"] is True


@pytest.mark.parametrize(
    "stage, expected",
    [
        (0, (2_000, 2_000, 12_000)),
        (1, (2_000, 2_000, 3_000)),
        (2, (2_000, 500, 3_000)),
        (3, (500, 500, 3_000)),
    ],
)
def test_memory_estimate_partitions_by_zero_stage(stage, expected):
    memory = estimate_memory(1_000, stage, "bf16", 4, "adamw")
    assert (memory.weights, memory.gradients, memory.optimizer) == expected
    assert memory.total == sum(expected)


def test_auto_precision_resolves_to_bf16_and_default_run_names_are_unique(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    first = build_plan(compose([]), cwd=tmp_path)
    second = build_plan(compose([]), cwd=tmp_path)
    assert first.stages[0].precision == "bf16"
    assert first.run_name != second.run_name
    assert first.tracking.uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert first.tracking.artifact_location == (tmp_path / "mlartifacts").as_uri()


def test_a_transfer_set_is_resolved_into_the_stage_config_the_workers_instantiate(tmp_path):
    """recipe.distill.transfer_data -> recipe.distill.transfer: all_inputs lifts the label limit of the stage's own
    data; a data option is composed as `data=<option>` would be; none leaves it empty."""
    teacher = ["recipe=distill", "recipe.distill.teacher=0123456789abcdef0123456789abcdef", "data.limit_train=300"]

    def distill_settings(*overrides: str) -> dict:
        return build_plan(compose([*teacher, *overrides]), cwd=tmp_path).stages[0].config["recipe"]["distill"]

    all_inputs = distill_settings("recipe.distill.transfer_data=all_inputs")["transfer"]
    assert all_inputs["_target_"].endswith("load_digits_splits") and all_inputs["limit_train"] is None
    option = distill_settings("recipe.distill.transfer_data=digits")["transfer"]
    assert option["limit_train"] is None and option["split_seed"] == 0  # the option as shipped
    assert distill_settings()["transfer"] is None
