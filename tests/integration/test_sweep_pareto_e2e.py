"""The shipped multi-objective pipeline sweep (conf/sweep/digits_pareto.yaml), 3 trials with tiny stages, run once
for the module: real Ray Tune, Ray Train, DeepSpeed, MLflow.

Each trial is a pipeline run whose student width / KD temperature Optuna picks; the teacher does not depend on them,
so the sweep's driver trains it once and every trial reuses it through the stage cache. The parent run holds the
Pareto front of (final_val_accuracy max, final_nonzero_parameters min). The pipeline is the shipped sweep's own
teacher -> student, from the project's ./conf (`pipeline=` on the command line wins): digits_compress's pruned and
finetuned stages would be two more shared fits (~90 s on a loaded 2-core machine) that prove nothing more; the
shipped sweep on digits_compress is planned by tests/unit/test_documented_commands.py.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

STEPS = 20
OBJECTIVES = {"final_val_accuracy": "max", "final_nonzero_parameters": "min"}
SHARED = ["teacher"]
TINY_PIPELINE = """\
defaults:
  - /schema/pipeline@_here_: pipeline
  - _self_
name: pareto_tiny
overrides: [data=digits, model=mlp, trainer.precision=fp32]
stages:
  - {name: teacher, kind: train, overrides: ["model.hidden_sizes=[64]"]}
  - {name: student, kind: distill, teacher: teacher, overrides: ["model.hidden_sizes=[32]", recipe.distill.temperature=4.0]}
"""


@pytest.fixture(scope="module")
def outcome(ray_instance, tmp_path_factory):
    from rich.console import Console

    from orchestrator.sweep.plan import plan_sweep_from_overrides
    from orchestrator.sweep.runner import run_sweep

    cwd = tmp_path_factory.mktemp("pareto")
    (cwd / "conf" / "pipeline").mkdir(parents=True)
    (cwd / "conf" / "pipeline" / "pareto_tiny.yaml").write_text(TINY_PIPELINE)
    plan = plan_sweep_from_overrides(
        ["sweep=digits_pareto", "pipeline=pareto_tiny", "sweep.num_samples=3", f"trainer.max_steps={STEPS}", f"trainer.eval_every={STEPS}",
         f"trainer.checkpoint_every={STEPS}", "trainer.num_workers=1", "trainer.precision=fp32",
         "trainer.cpus_per_worker=0.6",  # the 3 trials at once on the test's 2-CPU Ray: one round of student fits
         "tracking.system_metrics=false"], cwd=cwd)
    assert plan.pipeline and plan.shared_stages == SHARED and plan.objectives == OBJECTIVES
    return run_sweep(plan, console=Console(file=io.StringIO(), width=200), cwd=cwd)


@pytest.fixture(scope="module")
def client(outcome):
    from mlflow import MlflowClient

    return MlflowClient(outcome.tracking_uri)


@pytest.fixture(scope="module")
def trial_runs(outcome, client):
    assert len(outcome.trials) == 3 and all(row["state"] == "completed" for row in outcome.trials), outcome.trials
    return {row["trial_id"]: client.get_run(row["run_id"]) for row in outcome.trials}


def test_shared_stages_train_once_and_every_trial_reuses_them(outcome, client, trial_runs):
    parent = client.get_run(outcome.parent_run_id)
    for stage in SHARED:
        used = {run.data.tags[f"orch.stage.{stage}.run_id"] for run in trial_runs.values()}
        assert used == {parent.data.tags[f"orch.shared_stage.{stage}.run_id"]}, stage  # one run id across all trials
        [shared_id] = used
        shared = client.get_run(shared_id)
        assert shared.data.tags["mlflow.parentRunId"] == outcome.parent_run_id
        key = shared.data.tags["orch.cache_key"]
        trained = client.search_runs([outcome.experiment_id], filter_string=f"tags.`orch.cache_key` = '{key}'")
        assert [run.info.run_id for run in trained] == [shared_id]  # the stage trained once in the whole sweep
    # the searched stage is each trial's own: a child of the trial's pipeline run, trained for it
    students = {run.data.tags["orch.stage.student.run_id"] for run in trial_runs.values()}
    params = {(str(row["stages.student.model.hidden_sizes"]), row["stages.student.recipe.distill.temperature"])
              for row in outcome.trials}
    assert len(students) == len(params)
    for run in trial_runs.values():
        assert run.data.tags["mlflow.parentRunId"] == outcome.parent_run_id and run.data.tags["orch.recipe"] == "pipeline"


def test_every_trial_logs_its_objectives_and_reports_them(outcome, trial_runs):
    for row in outcome.trials:
        logged = trial_runs[row["trial_id"]].data.metrics
        for metric in OBJECTIVES:
            assert row[metric] == pytest.approx(logged[metric])
        assert 0.0 <= row["final_val_accuracy"] <= 1.0 and row["final_nonzero_parameters"] > 0


def _non_dominated(rows: list[dict]) -> set[str]:
    def beats(a, b):
        no_worse = a["final_val_accuracy"] >= b["final_val_accuracy"] and a["final_nonzero_parameters"] <= b["final_nonzero_parameters"]
        return no_worse and (a["final_val_accuracy"] > b["final_val_accuracy"] or a["final_nonzero_parameters"] < b["final_nonzero_parameters"])

    return {row["trial_id"] for row in rows if not any(beats(other, row) for other in rows if other is not row)}


def test_parent_holds_the_pareto_front_as_table_plot_and_configs(outcome, client, trial_runs, tmp_path: Path):
    expected = _non_dominated(outcome.trials)
    assert {row["trial_id"] for row in outcome.front} == expected
    local = Path(client.download_artifacts(outcome.parent_run_id, "pareto", str(tmp_path)))
    assert sorted(os.listdir(local)) == ["pareto_front.csv", "pareto_front.md", "pareto_front.png", "pareto_front.yaml"]
    csv_ids = {line.split(",")[0] for line in (local / "pareto_front.csv").read_text().splitlines()[1:]}
    assert csv_ids == expected
    assert (local / "pareto_front.png").stat().st_size > 1000
    front = yaml.safe_load((local / "pareto_front.yaml").read_text())
    assert front["objectives"] == OBJECTIVES
    assert {entry["trial_id"] for entry in front["front"]} == expected
    for entry in front["front"]:
        row = next(r for r in outcome.trials if r["trial_id"] == entry["trial_id"])
        assert entry["values"] == {m: pytest.approx(row[m]) for m in OBJECTIVES}
        width = f"model.hidden_sizes={row['stages.student.model.hidden_sizes']}".replace(" ", "")
        assert "pipeline=pareto_tiny" in entry["overrides"] and width in entry["stage_overrides"]["student"]
    tagged = {trial_id for trial_id, run in trial_runs.items() if run.data.tags.get("orch.pareto") == "true"}
    assert tagged == expected
    assert client.get_run(outcome.parent_run_id).data.metrics["pareto_front_size"] == len(expected)
