"""A 3-trial Optuna + ASHA sweep on a tiny MLP, run once for the module: real Ray Tune, Ray Train, DeepSpeed, MLflow.

The first two trials are fixed with points_to_evaluate: a good learning rate, then one so small that the model has
barely moved at the first rung. The trials run one at a time (max_concurrent_trials=1; one worker each, the
cheapest fit), so when the second reaches step 10, ASHA compares it with the first one's step-10 accuracy and stops
it: an early stop that does not depend on what Optuna samples for the third.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

GOOD_LR, BAD_LR = 0.03, 1e-6
MAX_STEPS = 30
SWEEP = {
    "name": "e2e",
    "overrides": [
        "model.hidden_sizes=[16]",
        "trainer.num_workers=1",
        "trainer.precision=fp32",
        f"trainer.max_steps={MAX_STEPS}",
        "trainer.eval_every=10",
        "trainer.checkpoint_every=10",
        "trainer.log_every=10",
        "trainer.micro_batch_size=32",
        "tracking.system_metrics=false",
    ],
    "space": {"trainer.optimizer.lr": {"loguniform": [1e-6, 3e-2]}},
    "metric": "val_accuracy",
    "mode": "max",
    "num_samples": 3,
    "max_concurrent_trials": 1,
    "search": "optuna",
    "seed": 0,
    "points_to_evaluate": [{"trainer.optimizer.lr": GOOD_LR}, {"trainer.optimizer.lr": BAD_LR}],
    "scheduler": {"name": "asha", "grace_period": 10, "reduction_factor": 2.0},
}


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sweep")


@pytest.fixture(scope="module")
def console_output() -> io.StringIO:
    return io.StringIO()


@pytest.fixture(scope="module")
def outcome(ray_instance, sweep_dir, console_output):
    from rich.console import Console

    from orchestrator.sweep.plan import plan_sweep
    from orchestrator.sweep.runner import run_sweep

    plan = plan_sweep(SWEEP, [], cwd=sweep_dir)
    return run_sweep(plan, console=Console(file=console_output, width=200), cwd=sweep_dir)


@pytest.fixture(scope="module")
def client(outcome):
    from mlflow import MlflowClient

    return MlflowClient(outcome.tracking_uri)


@pytest.fixture(scope="module")
def children(outcome, client):
    runs = client.search_runs([outcome.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{outcome.parent_run_id}'")
    return {run.info.run_id: run for run in runs}


def test_parent_run_holds_the_search_space_and_algorithm(outcome, client):
    parent = client.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["space.trainer.optimizer.lr"] == "loguniform(1e-06, 0.03)"
    assert parent.data.params["search"] == "optuna" and parent.data.params["scheduler"] == "asha"
    assert parent.data.params["metric"] == "val_accuracy" and parent.data.params["asha.grace_period"] == "10"
    assert parent.data.tags["orch.recipe"] == "sweep"


def test_one_child_run_per_trial_with_its_params_and_metric_history(outcome, client, children):
    assert len(outcome.trials) == 3 and len(children) == 3
    for row in outcome.trials:
        run = children[row["run_id"]]
        assert float(run.data.params["trainer.optimizer.lr"]) == pytest.approx(row["trainer.optimizer.lr"])
        assert run.data.tags["orch.sweep_run"] == outcome.run_name
        history = client.get_metric_history(run.info.run_id, "val_accuracy")
        assert history and history[0].step == 10
    lrs = sorted(row["trainer.optimizer.lr"] for row in outcome.trials)
    assert BAD_LR in lrs and GOOD_LR in lrs


def test_asha_stopped_the_bad_trial_early_and_it_is_recorded(outcome, client, children):
    bad = next(row for row in outcome.trials if row["trainer.optimizer.lr"] == BAD_LR)
    assert bad["state"] == "early_stopped" and bad["step"] < MAX_STEPS
    run = children[bad["run_id"]]
    assert run.data.tags["orch.trial_state"] == "early_stopped"
    assert run.info.status == "KILLED"
    # (its workers may still log a few steps to MLflow while Tune tears the trial down: the stop is Tune's record)
    assert bad["trial_wall_s"] is None  # it never sent the final report, which only a finished trial sends
    assert client.get_run(outcome.parent_run_id).data.metrics["trials_early_stopped"] >= 1


def test_the_console_shows_each_trial_start_and_end_as_it_happens(outcome, console_output):
    text = console_output.getvalue()
    for row in outcome.trials:
        assert f"trial {row['trial_id']} started (" in text
        ended = "completed:" if row["state"] == "completed" else f"stopped early at step {row['step']}:"
        assert f"trial {row['trial_id']} {ended}" in text
    assert f"{len(outcome.trials)}/{len(outcome.trials)} ended" in text
    assert text.index("started (1/") < text.index(" ended")  # printed as trials ran, before the summary table


def test_completed_trials_are_finished_and_the_best_is_tagged(outcome, client, children):
    completed = [row for row in outcome.trials if row["state"] == "completed"]
    assert completed
    for row in completed:
        assert children[row["run_id"]].info.status == "FINISHED"
    best = max(completed, key=lambda row: row["val_accuracy"])
    tagged = [run_id for run_id, run in children.items() if run.data.tags.get("orch.best_trial") == "true"]
    assert tagged == [best["run_id"]] == [outcome.best["run_id"]]
    parent = client.get_run(outcome.parent_run_id)
    assert parent.data.tags["orch.best_trial_run_id"] == best["run_id"]
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(best["val_accuracy"])


def test_parent_artifacts_trials_table_and_plots(outcome, client, tmp_path):
    from mlflow.artifacts import download_artifacts

    listed = {a.path for folder in ("sweep", "plots", "best") for a in client.list_artifacts(outcome.parent_run_id, folder)}
    assert {"sweep/trials.csv", "plots/parallel_coordinates.png", "plots/val_accuracy_vs_trainer.optimizer.lr.png", "best/best.yaml"} <= listed
    table = Path(download_artifacts(run_id=outcome.parent_run_id, artifact_path="sweep/trials.csv", dst_path=str(tmp_path), tracking_uri=outcome.tracking_uri))
    lines = table.read_text().splitlines()
    assert lines[0].startswith("trial_id,run_id,state,trainer.optimizer.lr,val_accuracy,step") and len(lines) == 4


def test_best_config_is_accepted_by_orch_and_reruns(outcome, sweep_dir, client, monkeypatch):
    from orchestrator import cli

    best_dir = outcome.best_config_dir
    assert (best_dir / "best.yaml").is_file()
    assert outcome.rerun_command == f"orch run --config-dir {best_dir} --config-name best"
    # the printed command, run in this process (on the session's Ray), from where the sweep ran
    monkeypatch.chdir(sweep_dir)
    cli.main(["run", "--config-dir", str(best_dir), "--config-name", "best", "name=best-rerun"])
    [run] = client.search_runs([outcome.experiment_id], filter_string="tags.`orch.run_name` = 'best-rerun'")
    assert run.info.status == "FINISHED"
    assert float(run.data.params["trainer.optimizer.lr"]) == pytest.approx(outcome.best["trainer.optimizer.lr"])
    assert run.data.metrics["val_accuracy"] == pytest.approx(outcome.best["val_accuracy"], abs=0.05)


# --- sweep=digits_compress, shrunk: 2 grid points, the sweep above's best trial as the teacher ---------------------
SPARSITIES = (0.5, 0.9)
TEMPERATURES = (2.0, 6.0)


@pytest.fixture(scope="module")
def compress_outcome(outcome, sweep_dir):
    """The shipped compression sweep through the same entry as `orch sweep`, with the space edited as a user would
    on the command line. One worker per trial, so both trials run at once on 2 CPUs."""
    from orchestrator.sweep.plan import plan_sweep_from_overrides
    from orchestrator.sweep.runner import run_sweep

    plan = plan_sweep_from_overrides(
        [
            "sweep=digits_compress",
            f"sweep.space.recipe.pruning.sparsity={{grid: [{SPARSITIES[0]}, {SPARSITIES[1]}]}}",
            f"sweep.space.recipe.distill.temperature={{choice: [{TEMPERATURES[0]}, {TEMPERATURES[1]}]}}",
            f"recipe.distill.teacher={outcome.best['run_id']}",
            "trainer.num_workers=1",
            "trainer.max_steps=20",
            "trainer.eval_every=10",
            "trainer.checkpoint_every=10",
            "trainer.log_every=10",
            "recipe.pruning.updates=4",
        ],
        cwd=sweep_dir,
    )
    return run_sweep(plan, cwd=sweep_dir)


def test_compression_sweep_children_are_as_sparse_as_their_trial_asked(compress_outcome, outcome, client):
    teacher = outcome.best["run_id"]
    outcome = compress_outcome
    parent = client.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["orch.sweep"] == "digits_compress"
    runs = client.search_runs([outcome.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{outcome.parent_run_id}'")
    assert len(runs) == 2 and all(run.info.status == "FINISHED" for run in runs)
    by_sparsity = {}
    for run in runs:
        params, metrics = run.data.params, run.data.metrics
        assert float(params["recipe.distill.temperature"]) in TEMPERATURES
        assert params["recipe.distill.teacher"] == teacher
        sparsity = float(params["recipe.pruning.sparsity"])
        assert metrics["final_sparsity"] == pytest.approx(sparsity, abs=0.01)  # reached by the end of the schedule
        assert metrics["nonzero_parameters"] < metrics["parameters"]
        by_sparsity[sparsity] = metrics["nonzero_parameters"]
    assert sorted(by_sparsity) == list(SPARSITIES)
    assert by_sparsity[SPARSITIES[1]] < by_sparsity[SPARSITIES[0]]  # sparser trial, fewer non-zero weights
    assert all(row["nonzero_parameters"] == by_sparsity[row["recipe.pruning.sparsity"]] for row in outcome.trials)


def test_compression_sweep_parent_has_the_size_plot_and_the_best_trial(compress_outcome, client):
    outcome = compress_outcome
    listed = {a.path for a in client.list_artifacts(outcome.parent_run_id, "plots")}
    assert "plots/accuracy_vs_size.png" in listed
    assert outcome.best is not None
    [tagged] = client.search_runs(
        [outcome.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{outcome.parent_run_id}' and tags.`orch.best_trial` = 'true'",
    )
    assert tagged.info.run_id == outcome.best["run_id"] == client.get_run(outcome.parent_run_id).data.tags["orch.best_trial_run_id"]
    assert outcome.best["val_accuracy"] == max(row["val_accuracy"] for row in outcome.trials)
