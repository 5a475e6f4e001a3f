"""A whole pipeline on real Ray workers, DeepSpeed engines and an MLflow store, on tiny settings.

teacher (train) → pruned (structured 50% of neurons + gradual unstructured 50%, ZeRO-2 bf16, 2 workers) → finetuned
(masks held) → student (distill on 300 labels with a transfer set and feature matching, ZeRO-1) → quantized (int8). Four
fits, made once per module, whose final model passes a promotion gate; then the same pipeline again (everything
reused, no fit) under a gate it fails, a run that fails at its last stage, and the fixed run, which starts at that
stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import pytest
import torch
import yaml
from mlflow import MlflowClient
from omegaconf import OmegaConf

from orchestrator.compress import prunable_parameters, realized_sparsity
from orchestrator.config import compose
from orchestrator.config.schema import PipelineStageConfig, PromoteConfig
from orchestrator.pipeline import runner as pipeline_runner
from orchestrator.pipeline.plan import build_pipeline_plan
from orchestrator.plan import build_plan
from orchestrator.stage_runner import run_plan
from orchestrator.artifacts.export import load_exported

pytestmark = pytest.mark.slow

COMMAND_LINE = [
    "trainer.log_every=5",
    "trainer.eval_every=0",
    "trainer.checkpoint_every=0",
    "tracking.system_metrics=false",
    "tracking.experiment=pipeline-e2e",
]


# every rank's weight digest in the stage's final report (the suite's ZeRO-2 bf16 run on 2 workers is the pruned stage)
DIGESTS = "{_target_: orchestrator.train.callbacks.WeightDigests}"
# the other training stages: one worker, the cheapest fit (the suite's time is mostly fits)
ONE_WORKER = "trainer.num_workers=1"


def stages(quantize_skip: str = "[]") -> list[dict]:
    return [
        {"name": "teacher", "kind": "train",
         "overrides": ["model.hidden_sizes=[64,64]", "trainer.max_steps=80", "trainer.optimizer.lr=5e-3", ONE_WORKER]},
        {"name": "pruned", "kind": "prune", "input": "teacher",
         "overrides": ["recipe.structured.ratio=0.5", "recipe.pruning.sparsity=0.5", "recipe.pruning.updates=4",
                       "trainer.max_steps=30", "trainer.zero_stage=2", "trainer.precision=bf16", f"trainer.callbacks=[{DIGESTS}]"]},
        {"name": "finetuned", "kind": "finetune", "input": "pruned", "overrides": ["trainer.max_steps=20", ONE_WORKER]},
        {"name": "student", "kind": "distill", "teacher": "finetuned",
         "overrides": ["model.hidden_sizes=[16]", "recipe.distill.feature_weight=0.1", "recipe.distill.temperature=2",
                       "recipe.distill.alpha=0.5", "trainer.max_steps=100", "trainer.optimizer.lr=1e-2",
                       "trainer.zero_stage=1", "data.limit_train=300", "recipe.distill.transfer_data=all_inputs", ONE_WORKER]},
        {"name": "quantized", "kind": "quantize", "input": "student", "overrides": [f"recipe.skip={quantize_skip}"]},
    ]


# the quantized student is far smaller than the teacher, and may lose anything but all of its accuracy
PASSING_GATE = {"register_as": "pipe-e2e", "max_quality_drop": {"vs": "teacher", "max_drop": 1.0},
                "min_size_ratio": {"vs": "teacher", "min": 1.0}}
FAILING_GATE = {"register_as": "pipe-e2e", "min_size_ratio": {"vs": "teacher", "min": 1000.0}}


def run_pipeline(workdir: Path, name: str, quantize_skip: str = "[]", promote: Optional[dict] = None):
    composed = compose(["recipe=pipeline", f"name={name}", *COMMAND_LINE])
    composed.cfg.pipeline.stages = [OmegaConf.merge(OmegaConf.structured(PipelineStageConfig), s) for s in stages(quantize_skip)]
    if promote:
        composed.cfg.pipeline.promote = OmegaConf.merge(OmegaConf.structured(PromoteConfig), promote)
    plan = build_pipeline_plan(composed, COMMAND_LINE, cwd=workdir)
    return plan, pipeline_runner.run_pipeline(plan)


@pytest.fixture(scope="module")
def client(workdir) -> MlflowClient:
    return MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")


@pytest.fixture(scope="module")
def first(ray_instance, workdir):
    return run_pipeline(workdir, "pipe-1", promote=PASSING_GATE)


@pytest.fixture(scope="module")
def second(first, workdir):
    return run_pipeline(workdir, "pipe-2", promote=FAILING_GATE)


def parent_of(client: MlflowClient, run_name: str):
    [parent] = client.search_runs(
        [client.get_experiment_by_name("pipeline-e2e").experiment_id],
        filter_string=f"tags.`orch.run_name` = '{run_name}'",
    )
    return parent


def children_of(client: MlflowClient, parent) -> dict[str, object]:
    runs = client.search_runs([parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return {run.data.tags["orch.stage"]: run for run in runs}


def model_of(client: MlflowClient, run_id: str, tmp_path: Path, quantized: bool = True):
    local = client.download_artifacts(run_id, "model", str(tmp_path / run_id))
    return load_exported(local, quantized=quantized), yaml.safe_load(Path(local, "model.yaml").read_text())


def test_parent_run_with_one_nested_child_per_stage_and_lineage_tags(first, client):
    plan, results = first
    parent = parent_of(client, plan.run_name)
    assert parent.info.status == "FINISHED" and parent.data.tags["orch.recipe"] == "pipeline"
    children = children_of(client, parent)
    assert sorted(children) == ["finetuned", "pruned", "quantized", "student", "teacher"]
    ids = {result.stage: result.run_id for result in results}
    assert {stage: run.info.run_id for stage, run in children.items()} == ids
    assert all(run.info.status == "FINISHED" for run in children.values())
    assert children["pruned"].data.tags["orch.input_run_id"] == ids["teacher"]
    assert children["pruned"].data.tags["orch.input_stage"] == "teacher"
    assert children["finetuned"].data.tags["orch.input_run_id"] == ids["pruned"]
    assert children["student"].data.tags["orch.teacher_run_id"] == ids["finetuned"]
    assert children["quantized"].data.tags["orch.input_run_id"] == ids["student"]
    assert children["quantized"].data.tags["orch.kind"] == "quantize"
    for stage, run_id in ids.items():
        assert parent.data.tags[f"orch.stage.{stage}.run_id"] == run_id
        assert "model/model.safetensors" in {a.path for a in client.list_artifacts(run_id, "model")}
    report = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert report == {"report/compression_report.csv", "report/compression_report.md", "report/accuracy_vs_size.png"}
    assert "sparsity/table.json" in {a.path for a in client.list_artifacts(ids["pruned"], "sparsity")}
    # every stage's model is an MLflow Model too (the quantized one as its fp32 weights), and the parent summarizes
    for run_id in ids.values():
        assert "model/mlflow_model/MLmodel" in {a.path for a in client.list_artifacts(run_id, "model/mlflow_model")}
    summary = parent.data.metrics
    assert 0 < summary["final_val_accuracy"] <= 1 and summary["size_ratio"] > 1 and summary["nonzero_parameters_ratio"] > 1


def test_structured_pruning_shrinks_the_model_masks_hold_and_accuracy_is_measured(first, client, tmp_path):
    from orchestrator.data.digits import load_digits_splits

    _, results = first
    ids = {result.stage: result.run_id for result in results}
    teacher, teacher_cfg = model_of(client, ids["teacher"], tmp_path)
    pruned, pruned_cfg = model_of(client, ids["pruned"], tmp_path)
    finetuned, _ = model_of(client, ids["finetuned"], tmp_path)
    assert teacher_cfg["hidden_sizes"] == [64, 64] and pruned_cfg["hidden_sizes"] == [32, 32]
    assert [tuple(m.weight.shape) for m in pruned.modules() if isinstance(m, torch.nn.Linear)] == [(32, 64), (32, 32), (10, 32)]
    # a plain module: no masks, no hooks, and half its (non-head) weights exactly zero, even after bf16 ZeRO-2
    assert realized_sparsity(prunable_parameters(pruned)) == pytest.approx(0.5, abs=0.01)
    # fine-tuning kept exactly those zeros
    for name, weight in prunable_parameters(pruned).items():
        assert torch.equal(prunable_parameters(finetuned)[name] == 0, weight == 0), name
    inputs, targets = load_digits_splits().val.tensors
    with torch.no_grad():
        accuracy = {name: (model(inputs).argmax(-1) == targets).float().mean().item()
                    for name, model in (("teacher", teacher), ("pruned", pruned), ("finetuned", finetuned))}
    assert accuracy["teacher"] > 0.85 and accuracy["finetuned"] > 0.7, accuracy
    client_report = client.download_artifacts(parent_of(client, first[0].run_name).info.run_id, "report", str(tmp_path))
    csv = Path(client_report, "compression_report.csv").read_text().splitlines()
    assert csv[0].startswith("stage,kind,run_id,parameters,nonzero_parameters,sparsity,size_bytes,size_gzip_bytes,latency_ms,val_accuracy")
    rows = {line.split(",")[0]: line.split(",") for line in csv[1:]}
    assert float(rows["finetuned"][-1]) == pytest.approx(accuracy["finetuned"], abs=1e-6)
    assert int(rows["pruned"][3]) < int(rows["teacher"][3])  # parameters
    assert int(rows["quantized"][6]) < int(rows["student"][6])  # size_bytes: int8 weights


def test_the_zero2_bf16_stage_ends_with_the_same_weights_on_every_rank_and_learns(first, client):
    """Data parallelism under ZeRO-2 with bf16 (bf16 weights, fp32 master partitions, gradients reduced in
    partitions) and pruning masks: both ranks end with bit-identical weights, and the model still classifies."""
    plan, results = first
    stage = next(stage for stage in plan.stages if stage.name == "pruned")
    assert stage.deepspeed["bf16"] == {"enabled": True} and stage.deepspeed["zero_optimization"]["stage"] == 2
    assert stage.config["trainer"]["num_workers"] == 2
    pruned = next(result for result in results if result.stage == "pruned")
    digests = pruned.metrics["rank_weight_digests"].split(",")
    assert len(digests) == 2 and len(set(digests)) == 1
    # half its neurons and half the remaining weights gone, 30 bf16 steps: most of the teacher's accuracy (chance 0.1)
    assert client.get_run(pruned.run_id).data.metrics["val_accuracy"] > 0.7


def test_distilled_student_and_its_int8_version_predict(first, client, tmp_path):
    from orchestrator.data.digits import load_digits_splits

    _, results = first
    ids = {result.stage: result.run_id for result in results}
    student, student_cfg = model_of(client, ids["student"], tmp_path)
    quantized, _ = model_of(client, ids["quantized"], tmp_path)
    assert student_cfg["hidden_sizes"] == [16]  # exported without the feature projection it trained with
    inputs, targets = load_digits_splits().val.tensors
    with torch.no_grad():
        accuracy = (student(inputs).argmax(-1) == targets).float().mean().item()
        agreement = (quantized(inputs).argmax(-1) == student(inputs).argmax(-1)).float().mean().item()
    assert accuracy > 0.6 and agreement > 0.95


def test_the_student_trained_on_300_labels_with_every_training_input_as_its_transfer_set(first):
    plan, _ = first
    student = next(stage for stage in plan.stages if stage.name == "student")
    assert student.config["data"]["limit_train"] == 300
    transfer = student.config["recipe"]["distill"]["transfer"]
    assert transfer["limit_train"] is None and transfer["_target_"] == student.config["data"]["_target_"]


def test_the_promotion_gate_registers_a_passing_pipeline_and_refuses_a_failing_one(first, second, client):
    _, first_results = first
    assert first_results[-1].registered_model_uri == "models:/pipe-e2e/1"
    champion = client.get_model_version_by_alias("pipe-e2e", "champion")
    assert champion.run_id == first_results[-1].run_id
    assert parent_of(client, "pipe-1").data.tags["orch.promote.status"] == "promoted"
    # the same models under a size gate they fail: nothing registered, the alias stays, the parent says why
    plan, second_results = second
    assert second_results[-1].registered_model_uri is None
    assert [str(v.version) for v in client.search_model_versions("name='pipe-e2e'")] == ["1"]
    assert str(client.get_model_version_by_alias("pipe-e2e", "champion").version) == "1"
    refused = parent_of(client, plan.run_name).data
    assert refused.tags["orch.promote.status"] == "refused" and refused.tags["orch.promote.failed"] == "min_size_ratio"
    assert refused.metrics["promote.min_size_ratio.margin"] < 0


def test_running_the_same_pipeline_again_reuses_every_finished_stage(first, second, client):
    _, first_results = first
    plan, second_results = second
    assert [r.run_id for r in second_results] == [r.run_id for r in first_results]
    assert all(r.reused for r in second_results)
    parent = parent_of(client, plan.run_name)
    assert parent.info.status == "FINISHED" and parent.info.run_id != parent_of(client, first[0].run_name).info.run_id
    stubs = children_of(client, parent)
    assert {stage: run.data.tags["orch.reused_run_id"] for stage, run in stubs.items()} == {
        r.stage: r.run_id for r in first_results
    }


def test_a_pipeline_that_failed_at_a_stage_resumes_at_that_stage(first, second, client, workdir):
    _, first_results = first
    with pytest.raises(ValueError, match="not submodules"):
        run_pipeline(workdir, "pipe-3", quantize_skip="[no_such_layer]")
    failed = parent_of(client, "pipe-3")
    assert failed.info.status == "FAILED"
    assert children_of(client, failed)["quantized"].info.status == "FAILED"

    plan, results = run_pipeline(workdir, "pipe-4", quantize_skip="[head]")
    by_stage = {r.stage: r for r in results}
    first_ids = {r.stage: r.run_id for r in first_results}
    assert all(by_stage[s].reused and by_stage[s].run_id == first_ids[s] for s in ("teacher", "pruned", "finetuned", "student"))
    assert not by_stage["quantized"].reused and by_stage["quantized"].run_id != first_ids["quantized"]
    assert parent_of(client, plan.run_name).info.status == "FINISHED"



def test_a_standalone_recipe_reads_a_pipeline_stage_by_run_id(first, client, workdir):
    """recipe=quantize outside a pipeline: its input is an MLflow run id; it needs no Ray workers."""
    _, results = first
    student = next(r for r in results if r.stage == "student")
    plan = build_plan(compose(["recipe=quantize", f"recipe.input={student.run_id}", "name=quantize-alone", *COMMAND_LINE]),
                      cwd=workdir)
    [result] = run_plan(plan)
    assert result.metrics["size_bytes_int8"] < result.metrics["size_bytes_fp32"]
    assert result.metrics["val_accuracy"] == pytest.approx(student.metrics["val_accuracy"], abs=0.02)
    run = client.get_run(result.run_id)
    assert run.data.tags["orch.run_name"] == "quantize-alone" and "mlflow.parentRunId" not in run.data.tags
