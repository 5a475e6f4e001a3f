"""Sweep planning: the shipped sweeps plan; every bad input is a ConfigError naming the key, before Ray starts."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.config import compose
from orchestrator.config.validate import ConfigError
from orchestrator.sweep.best import best_config
from orchestrator.sweep.plan import apply, plan_sweep, plan_sweep_from_overrides

CONF = Path(__file__).resolve().parents[2] / "conf"
RUN_ID = "0123456789abcdef0123456789abcdef"


def default_sweep() -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(compose(["sweep=default"]).cfg.sweep, resolve=True, enum_to_str=True)


def test_shipped_default_sweep_plans_with_asha_on_steps(tmp_path):
    plan = plan_sweep_from_overrides([], cwd=tmp_path)
    assert plan.search == "optuna" and plan.metric == "val_accuracy" and plan.mode == "max"
    assert {d.key for d in plan.dimensions} == {"trainer.optimizer.lr", "model.hidden_sizes", "trainer.micro_batch_size"}
    assert plan.scheduler == {"name": "asha", "grace_period": 20, "reduction_factor": 2.0, "max_t": 80}
    assert plan.base_plan.stages[0].recipe == "train"
    assert not (tmp_path / "orch_runs").exists()


def test_shipped_compression_sweep_plans_given_a_teacher(tmp_path):
    plan = plan_sweep_from_overrides(["sweep=digits_compress", f"recipe.distill.teacher={RUN_ID}"], cwd=tmp_path)
    assert plan.base_plan.stages[0].recipe == "distill"
    assert plan.search == "grid" and plan.choices["recipe"] == "distill"


def test_command_line_overrides_reach_the_base_recipe_and_win(tmp_path):
    plan = plan_sweep(default_sweep(), ["sweep=default", "trainer.max_steps=40", "trainer.seed=3"], cwd=tmp_path)
    trainer = plan.base_plan.stages[0].config["trainer"]
    assert trainer["max_steps"] == 40 and trainer["seed"] == 3
    assert plan.scheduler["max_t"] == 40


def with_changes(**changes) -> dict:
    sweep = copy.deepcopy(default_sweep())
    for key, value in changes.items():
        target = sweep
        *parents, leaf = key.split("__")
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    return sweep


@pytest.mark.parametrize(
    "sweep, command_line, key, expected",
    [
        (with_changes(space={"trainer.optimizer.lrr": {"loguniform": [1e-4, 1e-2]}}), [], "sweep.space.trainer.optimizer.lrr", "no such key"),
        (with_changes(space={"trainer.optimizer": {"choice": [1]}}), [], "sweep.space.trainer.optimizer", "config section"),
        (with_changes(space={"model.hidden_sizes": {"choice": []}}), [], "sweep.space.model.hidden_sizes.choice", "at least one value"),
        (with_changes(metric="val_f1"), [], "sweep.metric", "val_accuracy"),
        (with_changes(metric="val_perplexity"), [], "sweep.metric", "reports"),
        (with_changes(space={"trainer.zero_stage": {"choice": [0, 4]}}), [], "sweep.space.trainer.zero_stage", "0, 1, 2, 3"),
        (with_changes(space={"trainer.micro_batch_size": {"choice": [16, "big"]}}), [], "sweep.space.trainer.micro_batch_size", "does not fit"),
        (with_changes(space={"trainer.zero_stage": {"grid": [0, 2]}}), [], "sweep.search", "Optuna"),
        (with_changes(search="grid"), [], "sweep.search", "range"),
        (with_changes(scheduler__grace_period=500), [], "sweep.scheduler.grace_period", "max_steps"),
        (default_sweep(), ["trainer.eval_every=30"], "trainer.eval_every", "must divide"),
        (default_sweep(), ["trainer.checkpoint_every=0"], "trainer.checkpoint_every", "ASHA"),
        (with_changes(max_concurrent_trials=4), ["cluster.num_cpus=2"], "sweep.max_concurrent_trials", "at most 1"),
        (with_changes(points_to_evaluate=[{"trainer.optimizer.lr": 0.01}]), [], "sweep.points_to_evaluate[0]", "every key"),
        (with_changes(overrides=["recipe=quantize", f"recipe.input={RUN_ID}"]), [], "sweep.overrides", "training recipe"),
        (with_changes(objectives={"val_accuracy": "max"}, scheduler__name="none"), [], "sweep.objectives", "at least 2"),
        (with_changes(objectives=["val_accuracy", "loss"], scheduler__name="none"), [], "sweep.objectives", "mapping"),
        (with_changes(objectives={"val_accuracy": "max", "loss": "lowest"}, scheduler__name="none"), [], "sweep.objectives.loss", "max or min"),
        (with_changes(objectives={"val_accuracy": "max", "latency_ms": "min"}, scheduler__name="none"), [], "sweep.objectives.latency_ms", "val_loss"),
        (with_changes(objectives={"val_accuracy": "max", "loss": "min"}), [], "sweep.scheduler.name", "ASHA"),
    ],
)
def test_bad_sweeps_fail_before_ray_naming_the_key(tmp_path, sweep, command_line, key, expected):
    with pytest.raises(ConfigError) as error:
        plan_sweep(sweep, command_line, cwd=tmp_path)
    assert error.value.key == key
    assert expected in str(error.value)


def pareto_sweep() -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(compose(["sweep=digits_pareto"]).cfg.sweep, resolve=True, enum_to_str=True)


@pytest.mark.parametrize(
    "changes, key, expected",
    [
        ({"space": {"stages.studnt.model.hidden_sizes": {"choice": [[16]]}}}, "sweep.space.stages.studnt.model.hidden_sizes", "teacher, pruned"),
        ({"space": {"stages.student.recipe.distill.temp": {"choice": [1.0]}}}, "sweep.space.stages.student.recipe.distill.temp", "stage student"),
        ({"scheduler": {"name": "asha", "grace_period": None, "reduction_factor": 2.0}}, "sweep.scheduler.name", "reports once"),
        ({"objectives": None, "metric": "val_accuracy"}, "sweep.metric", "final_val_accuracy"),
    ],
)
def test_bad_pipeline_sweeps_fail_before_ray_naming_the_key(tmp_path, changes, key, expected):
    with pytest.raises(ConfigError) as error:
        plan_sweep({**pareto_sweep(), **changes}, [], cwd=tmp_path)
    assert error.value.key == key
    assert expected in str(error.value)


def test_pipeline_trial_values_reach_their_stage_and_only_untouched_stages_are_shared(tmp_path):
    sweep = {**pareto_sweep(), "space": {"stages.pruned.recipe.pruning.sparsity": {"choice": [0.5, 0.8]},
                                         "trainer.seed": {"choice": [0, 1]}}}
    plan = plan_sweep(sweep, [], cwd=tmp_path)
    assert plan.shared_stages == []  # trainer.seed is set on every stage, the teacher included
    plan = plan_sweep({**sweep, "space": {"stages.pruned.recipe.pruning.sparsity": {"choice": [0.5, 0.8]}}}, [], cwd=tmp_path)
    assert plan.shared_stages == ["teacher"]
    from orchestrator.sweep.pipeline_trials import plan_pipeline_trial

    trial = plan_pipeline_trial(plan.base, plan.choices, plan.overrides, {"stages.pruned.recipe.pruning.sparsity": 0.8,
                                                                            "trainer.seed": 7}, tmp_path)
    stages = {stage.name: stage.config for stage in trial.stages}
    assert stages["pruned"]["recipe"]["pruning"]["sparsity"] == 0.8
    assert {config["trainer"]["seed"] for config in stages.values()} == {7}
    assert stages["teacher"]["trainer"]["max_steps"] == 100  # the sweep's overrides still win over the stage's own


def test_trial_values_are_set_on_a_copy_and_type_checked():
    base = compose(["trainer.max_steps=40"]).cfg
    trial = apply(base, {"trainer.optimizer.lr": 0.01, "model.hidden_sizes": [32]}, name="t1")
    assert trial.trainer.optimizer.lr == 0.01 and list(trial.model.hidden_sizes) == [32] and trial.name == "t1"
    assert base.trainer.optimizer.lr != 0.01 and base.name is None
    from omegaconf.errors import ValidationError

    with pytest.raises(ValidationError):
        apply(base, {"trainer.max_steps": "many"})


def test_best_yaml_reruns_through_orch_plan(tmp_path):
    cfg = apply(compose(["recipe=distill", f"recipe.distill.teacher={RUN_ID}"]).cfg, {"recipe.distill.temperature": 7.5})
    choices = {"recipe": "distill", "model": "mlp", "data": "digits", "trainer": "default", "cluster": "local", "tracking": "local"}
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "best.yaml").write_text(yaml.safe_dump(best_config(cfg, choices), sort_keys=False))
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "plan", "--config-dir", str(tmp_path / "best"), "--config-name", "best"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "distill" in out.stdout and "7.5" in out.stdout


def test_orch_sweep_error_from_a_project_sweep_is_one_line_and_starts_nothing(tmp_path):
    (tmp_path / "conf" / "sweep").mkdir(parents=True)
    bad = yaml.safe_load((CONF / "sweep" / "default.yaml").read_text())
    bad["name"] = "bad"
    bad["space"] = {"trainer.optimizer.lr": {"loguniform": [1e-4, 1e-2]}, "trainer.warmup": {"choice": [1, 2]}}
    (tmp_path / "conf" / "sweep" / "bad.yaml").write_text("# orch sweep sweep=bad\n" + yaml.safe_dump(bad))
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "sweep", "sweep=bad"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2
    assert "sweep.space.trainer.warmup" in out.stderr and "no such key" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "orch_runs").exists()


def test_sweep_level_arguments_are_split_from_the_trials_overrides():
    from orchestrator.sweep.plan import split_sweep_overrides

    sweep_level, rest = split_sweep_overrides(
        ["sweep=digits_compress", "sweep.num_samples=8", "--config-dir", "/x", "recipe.distill.teacher=abc", "trainer.seed=1"]
    )
    assert sweep_level == ["sweep=digits_compress", "sweep.num_samples=8", "--config-dir", "/x"]
    assert rest == ["recipe.distill.teacher=abc", "trainer.seed=1"]
    assert split_sweep_overrides(["trainer.seed=1"]) == (["sweep=default"], ["trainer.seed=1"])


def test_a_submitted_sweep_runs_orch_sweep_on_the_cluster():
    from orchestrator.launch.jobs import entrypoint

    assert entrypoint(["sweep=default", "trainer.seed=1"], "sweep") == (
        "python -m orchestrator.cli sweep cluster=ray sweep=default trainer.seed=1"
    )
    assert entrypoint(["trainer.seed=1"]).startswith("python -m orchestrator.cli run cluster=ray")


def test_submit_validates_a_sweep_locally_first(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "submit", "--sweep", "--address", "http://127.0.0.1:1",
         "sweep.metric=val_f1", "trainer.storage_path=/tmp/x", "tracking.uri=http://mlflow:5000"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 2
    assert "sweep.metric='val_f1'" in out.stderr and "Traceback" not in out.stderr


def test_space_edits_on_the_command_line_reach_the_plan_and_bad_keys_are_named(tmp_path):
    plan = plan_sweep_from_overrides(
        ["sweep.space.trainer.optimizer.lr={uniform: [1e-3, 1e-2]}", "~sweep.space.model.hidden_sizes",
         "+sweep.space.trainer.optimizer.weight_decay={choice: [0.0, 0.01]}", "sweep.space={trainer.micro_batch_size: null}"],
        cwd=tmp_path,
    )
    assert [(d.key, d.describe()) for d in plan.dimensions] == [
        ("trainer.optimizer.lr", "uniform(0.001, 0.01)"), ("trainer.optimizer.weight_decay", "choice(0.0, 0.01)")
    ]
    assert plan.config["space"]["trainer.optimizer.lr"] == {"uniform": [1e-3, 1e-2]}  # what the parent run logs
    with pytest.raises(ConfigError) as error:
        plan_sweep_from_overrides(["sweep.space.trainer.optimizer.lrr={uniform: [1e-3, 1e-2]}"], cwd=tmp_path)
    assert error.value.key == "sweep.space.trainer.optimizer.lrr" and "no such key" in str(error.value)


def test_orch_sweep_plan_shows_command_line_space_edits(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "sweep", "--plan", "sweep.space.trainer.optimizer.lr={uniform: [1e-3, 1e-2]}",
         "~sweep.space.model.hidden_sizes"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "trainer.optimizer.lr: uniform(0.001, 0.01)" in out.stdout and "model.hidden_sizes" not in out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "sweep", "~sweep.space.model.hidden_size"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert bad.returncode == 2 and "sweep.space.model.hidden_size" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("path", sorted((CONF / "sweep").glob("*.yaml")), ids=lambda p: p.name)
def test_every_orch_sweep_command_in_a_sweep_header_plans(tmp_path, path):
    import shlex

    text = path.read_text().replace("<teacher run id>", RUN_ID).replace("<run id>", RUN_ID)
    header = [line.lstrip("# ") for line in text.splitlines() if line.startswith("#")]
    commands = [shlex.split(line, comments=True) for line in header if line.startswith("orch sweep")]
    assert commands
    for command in commands:
        arguments = command[2:]
        plan = plan_sweep_from_overrides(arguments, cwd=tmp_path)
        assert plan.name == path.stem, command


def test_the_outcome_table_in_a_log_keeps_whole_column_names(tmp_path):
    import io

    from rich.console import Console

    from orchestrator.sweep.runner import SweepOutcome, print_outcome

    row = {"trial_id": "444b3_00000", "run_id": RUN_ID, "state": "completed", "recipe.pruning.sparsity": 0.5,
           "recipe.distill.temperature": 2.0, "val_accuracy": 0.8056, "step": 40, "nonzero_parameters": 5514, "parameters": 9610}
    outcome = SweepOutcome("sweep-x", RUN_ID, "1", "sqlite:///x.db", [row], row, tmp_path, "orch run ...")
    out = io.StringIO()
    print_outcome(outcome, "val_accuracy", Console(file=out, width=80))
    assert "recipe.pruning.sparsity" in out.getvalue() and "444b3_00000" in out.getvalue()


def test_submit_verbose_reaches_the_jobs_run_wherever_it_is_written():
    from orchestrator.cli.jobs import parser_for
    from orchestrator.launch.jobs import entrypoint

    args = parser_for("submit").parse_intermixed_args(["trainer.seed=1", "-v", "--address", "http://h:8265", "x=2"])
    assert args.verbose and args.overrides == ["trainer.seed=1", "x=2"]
    assert not parser_for("submit").parse_intermixed_args(["trainer.seed=1"]).verbose
    assert entrypoint(args.overrides, "run", args.verbose) == "python -m orchestrator.cli run -v cluster=ray trainer.seed=1 x=2"
