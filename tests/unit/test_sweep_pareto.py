"""A multi-objective sweep's outcome: the Pareto front of finished trials, its files, and the plan's objectives."""

from __future__ import annotations

from pathlib import Path

import yaml

from orchestrator.sweep.pareto import front_table, front_yaml, pareto_front, pareto_plot
from orchestrator.sweep.plan import plan_sweep_from_overrides

OBJECTIVES = {"val_accuracy": "max", "nonzero_parameters": "min"}


def trial(trial_id: str, accuracy, nonzero, state: str = "completed") -> dict:
    return {"trial_id": trial_id, "run_id": f"run-{trial_id}", "state": state, "val_accuracy": accuracy,
            "nonzero_parameters": nonzero, "recipe.pruning.sparsity": 0.5}


def test_the_front_keeps_exactly_the_trials_no_other_beats_on_every_objective():
    rows = [
        trial("big", 0.97, 10_000),
        trial("small", 0.90, 1_000),
        trial("worse", 0.89, 2_000),  # beaten by "small" on both
        trial("middle", 0.95, 5_000),
        trial("tie", 0.95, 5_000),  # equal to "middle": neither beats the other
        trial("same_size_less_accurate", 0.93, 5_000),  # beaten by "middle" on accuracy, equal on size
    ]
    front = pareto_front(rows, OBJECTIVES)
    assert [row["trial_id"] for row in front] == ["big", "small", "middle", "tie"]


def test_the_direction_of_each_objective_decides():
    rows = [trial("a", 0.9, 100), trial("b", 0.8, 200)]
    assert [r["trial_id"] for r in pareto_front(rows, OBJECTIVES)] == ["a"]
    assert [r["trial_id"] for r in pareto_front(rows, {"val_accuracy": "min", "nonzero_parameters": "max"})] == ["b"]
    assert len(pareto_front(rows, {"val_accuracy": "max", "nonzero_parameters": "max"})) == 2


def test_unfinished_trials_and_trials_missing_an_objective_are_not_on_the_front():
    rows = [trial("stopped", 0.99, 10, state="early_stopped"), trial("failed", None, None, state="failed"),
            trial("no_size", 0.99, None), trial("done", 0.5, 10_000)]
    assert [r["trial_id"] for r in pareto_front(rows, OBJECTIVES)] == ["done"]
    assert pareto_front([], OBJECTIVES) == []


def test_front_files_are_data_a_user_can_read_back(tmp_path: Path):
    rows = [trial("a", 0.9, 100), trial("b", 0.95, 300), trial("c", 0.8, 300)]
    front = pareto_front(rows, OBJECTIVES)
    table = front_table(front, OBJECTIVES, ["recipe.pruning.sparsity"])
    assert [list(row) for row in table][0] == ["trial_id", "run_id", "val_accuracy", "nonzero_parameters", "recipe.pruning.sparsity"]
    entries = [{"trial_id": r["trial_id"], "values": {m: r[m] for m in OBJECTIVES}, "overrides": ["recipe=prune"]} for r in front]
    loaded = yaml.safe_load(front_yaml(entries, OBJECTIVES, "sweep-x"))
    assert loaded["objectives"] == OBJECTIVES
    assert [entry["trial_id"] for entry in loaded["front"]] == ["a", "b"]
    figure = pareto_plot(rows, front, OBJECTIVES)
    figure.savefig(tmp_path / "front.png")
    assert (tmp_path / "front.png").stat().st_size > 1000
    assert figure.axes[0].get_xlabel() == "val_accuracy (max)"


def test_objectives_plan_with_the_first_as_the_lead_metric_and_reach_optunas_multi_objective_study(tmp_path: Path):
    plan = plan_sweep_from_overrides(
        ["sweep.objectives={val_loss: min, val_accuracy: max}", "sweep.scheduler.name=none"], cwd=tmp_path)
    assert plan.objectives == {"val_loss": "min", "val_accuracy": "max"}
    assert (plan.metric, plan.mode) == ("val_loss", "min")
    assert plan.identity()["objectives"] == plan.objectives
    from orchestrator.sweep.runner import _search_algorithm

    searcher = _search_algorithm(plan, 1)
    assert searcher.metric == ["val_loss", "val_accuracy"] and searcher.mode == ["min", "max"]
    # a single-objective sweep's identity is unchanged, so sweeps started before objectives existed still resume
    assert "objectives" not in plan_sweep_from_overrides([], cwd=tmp_path).identity()
