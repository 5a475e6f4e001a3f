"""Pipelines plan without Ray: stages composed from conf/, ordered by their references, keyed for the cache, and
every bad input refused before anything starts, naming the key to change."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from orchestrator.config import compose
from orchestrator.config.schema import PipelineStageConfig
from orchestrator.config.validate import ConfigError
from orchestrator.pipeline.plan import build_pipeline_plan
from orchestrator.plan import build_plan


def pipeline_plan(tmp_path: Path, stages=None, *overrides: str, command_line=()):
    composed = compose(["recipe=pipeline", *overrides])
    if stages is not None:
        composed.cfg.pipeline.stages = [OmegaConf.merge(OmegaConf.structured(PipelineStageConfig), s) for s in stages]
    return build_pipeline_plan(composed, list(command_line), cwd=tmp_path)


def stage(name, kind, *overrides, **references):
    return {"name": name, "kind": kind, "overrides": list(overrides), **references}


def test_shipped_pipeline_plans_every_stage_in_order_with_its_own_config(tmp_path):
    plan = pipeline_plan(tmp_path)
    assert [(s.name, s.kind, s.recipe) for s in plan.stages] == [
        ("teacher", "train", "train"),
        ("pruned", "prune", "prune"),
        ("finetuned", "finetune", "prune"),
        ("student", "distill", "distill"),
        ("quantized", "quantize", "quantize"),
    ]
    by_name = {s.name: s for s in plan.stages}
    assert by_name["teacher"].config["model"]["hidden_sizes"] == [512, 512]
    # a prune/finetune stage keeps the architecture of the model it reads; the student has its own
    assert by_name["pruned"].config["model"] == by_name["teacher"].config["model"]
    assert by_name["finetuned"].config["recipe"]["pruning"]["schedule"] == "hold"
    assert by_name["student"].config["model"]["hidden_sizes"] == [64]
    assert by_name["student"].inputs == {"teacher": "finetuned"}
    assert by_name["student"].config["recipe"]["distill"]["teacher"] == "finetuned"
    assert by_name["quantized"].config["model"] == by_name["student"].config["model"]
    assert len({s.key for s in plan.stages}) == 5
    assert all(s.storage_path == str(tmp_path / "orch_runs" / plan.run_name) for s in plan.stages)
    assert plan.name == "digits_compress"


def test_command_line_overrides_apply_to_every_stage_and_win(tmp_path):
    plan = pipeline_plan(tmp_path, None, command_line=["trainer.max_steps=7", "recipe=pipeline", "name=x"])
    assert {s.config["trainer"]["max_steps"] for s in plan.stages} == {7}


def test_cache_keys_are_stable_and_change_downstream_of_an_edit_only(tmp_path):
    first = {s.name: s.key for s in pipeline_plan(tmp_path).stages}
    again = {s.name: s.key for s in pipeline_plan(tmp_path, None, "name=other-name").stages}
    assert first == again, "the run name must not be part of a stage's identity"
    cfg = compose(["recipe=pipeline"]).cfg
    stages = OmegaConf.to_container(cfg.pipeline.stages, enum_to_str=True)
    stages[2]["overrides"].append("trainer.optimizer.lr=1e-4")  # edit the finetune stage only
    edited = {s.name: s.key for s in pipeline_plan(tmp_path, stages).stages}
    assert [name for name in first if first[name] != edited[name]] == ["finetuned", "student", "quantized"]


def test_stages_are_ordered_by_their_references_not_their_listing(tmp_path):
    plan = pipeline_plan(tmp_path, [stage("tuned", "finetune", input="base"), stage("base", "train")])
    assert [s.name for s in plan.stages] == ["base", "tuned"]


@pytest.mark.parametrize(
    "stages, key, message",
    [
        (
            [stage("teacher", "train"), stage("pruned", "prune", input="teachr")],
            "pipeline.stages[pruned].input",
            "no stage of this pipeline is named 'teachr'",
        ),
        (
            [stage("a", "finetune", input="b"), stage("b", "finetune", input="a")],
            "pipeline.stages[b].input",
            "cycle",
        ),
        (
            [stage("teacher", "train"), stage("student", "distill", "data.num_classes=5", teacher="teacher")],
            "pipeline.stages[student].teacher",
            "teacher's output has 10 classes/tokens but the student's has 5",
        ),
        (
            [stage("teacher", "train"), stage("pruned", "prune", "recipe.pruning.sparsity=1.0", input="teacher")],
            "pipeline.stages[pruned].recipe.pruning.sparsity",
            "0 <= sparsity < 1",
        ),
        (
            [stage("teacher", "train"), stage("pruned", "prune", "recipe.pruning.sparsity=-0.1", input="teacher")],
            "pipeline.stages[pruned].recipe.pruning.sparsity",
            "0 <= sparsity < 1",
        ),
        ([stage("pruned", "prune")], "pipeline.stages[pruned].input", "needs a input"),
        ([stage("student", "distill")], "pipeline.stages[student].teacher", "needs a teacher"),
        (
            [stage("a", "train"), stage("b", "train", input="a")],
            "pipeline.stages[b].input",
            "kind=finetune",
        ),
        ([stage("a", "train"), stage("a", "train")], "pipeline.stages[1].name", "unique"),
        (
            [stage("a", "train"), stage("p", "prune", "trainer.zero_stage=3", input="a")],
            "pipeline.stages[p].trainer.zero_stage",
            "ZeRO-3",
        ),
    ],
)
def test_bad_pipelines_fail_before_anything_runs_naming_the_key(tmp_path, stages, key, message):
    with pytest.raises(ConfigError) as error:
        pipeline_plan(tmp_path, stages)
    assert error.value.key == key
    assert message in str(error.value)
    assert not (tmp_path / "orch_runs").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize(
    "overrides, key, message",
    [
        (["recipe=prune"], "recipe.input", "needs a model"),
        (["recipe=prune", "recipe.input=/no/such/dir"], "recipe.input", "MLflow run id"),
        (["recipe=distill"], "recipe.distill.teacher", "needs a model"),
        (["recipe=train", "recipe.pruning.schedule=gradual", "recipe.pruning.sparsity=1.5"], "recipe.pruning.sparsity", "< 1"),
        (["recipe=train", "recipe.pruning.schedule=gradual", "recipe.pruning.start_fraction=0.8",
          "recipe.pruning.end_fraction=0.5"], "recipe.pruning.end_fraction", "window is empty"),
        (["recipe=train", "recipe.pruning.scope=model"], "recipe.pruning.scope", "'layer' or 'global'"),
        (["recipe=distill", "recipe.distill.teacher=0123456789abcdef0123456789abcdef", "recipe.distill.alpha=2"],
         "recipe.distill.alpha", "alpha"),
        (["recipe=prune", "recipe.input=0123456789abcdef0123456789abcdef", "model=gpt", "data=text",
          "recipe.structured.ratio=0.8"], "recipe.structured.ratio", "each layer keeps a head"),
    ],
)
def test_bad_standalone_compression_configs_name_the_key(tmp_path, overrides, key, message):
    with pytest.raises(ConfigError) as error:
        build_plan(compose(overrides), cwd=tmp_path)
    assert error.value.key == key
    assert message in str(error.value)


def test_a_teacher_directory_is_checked_against_the_student(tmp_path):
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "model.yaml").write_text("_target_: orchestrator.models.mlp.MLP\ninput_shape: [64]\nnum_classes: 4\n")
    with pytest.raises(ConfigError, match="4 classes/tokens but the student's has 10"):
        build_plan(compose(["recipe=distill", f"recipe.distill.teacher={teacher}"]), cwd=tmp_path)
