"""Sweep resume from data only (`orchestrator.sweep.resume`): which trials are finished or interrupted, what is left
to run, what the searcher is told, and that the resume path never opens a pickle. No Ray starts: the MLflow store
is a real sqlite one, Optuna and Tune's search algorithms run in this process."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import pytest
from mlflow import MlflowClient
from rich.console import Console

from orchestrator.sweep.plan import plan_sweep_from_overrides
from orchestrator.sweep.resume import (
    RecordedTrial,
    attempt_seed,
    evaluated_points,
    next_attempt,
    param_value,
    presets_first,
    remaining_samples,
    remaining_variant_points,
    resume_search,
    split_trials,
    unrun_user_points,
)
from orchestrator.sweep.space import parse_space
from orchestrator.sweep.trial import RESUMED_TRIAL_KEY, STATE_TAG, TRIAL_TAG
from orchestrator.track.mlflow_run import PARENT_TAG, flatten

SPACE = parse_space({"trainer.optimizer.lr": {"loguniform": [1e-4, 3e-2]}, "model.hidden_sizes": {"choice": [[32], [128, 128]]},
                     "trainer.micro_batch_size": {"choice": [16, 32]}})


def trial(trial_id: str, status: str, state=None, value=0.5, lr=1e-3, hidden=(32,), batch=16) -> RecordedTrial:
    params = {"trainer.optimizer.lr": lr, "model.hidden_sizes": list(hidden), "trainer.micro_batch_size": batch}
    return RecordedTrial(trial_id, f"run-{trial_id}", status, state, params, value, {} if value is None else {"val_accuracy": value})


def test_finished_trials_have_an_outcome_and_the_others_run_again():
    trials = [
        trial("a", "FINISHED", "completed"),
        trial("b", "KILLED", "early_stopped"),  # ASHA stopped it; Tune's callback tagged it
        trial("c", "FAILED", "failed", value=None),
        trial("d", "FINISHED"),  # its run ended, the driver died before Tune heard
        trial("e", "RUNNING"),  # the driver died while it trained
        trial("f", "FAILED"),  # closed as FAILED by the dying driver, no outcome from Tune
    ]
    finished, interrupted = split_trials(trials)
    assert [t.trial_id for t in finished] == ["a", "b", "c", "d"]
    assert [t.trial_id for t in interrupted] == ["e", "f"]
    assert [t.outcome for t in finished] == ["completed", "early_stopped", "failed", "completed"]
    assert remaining_samples(8, finished) == 4 and remaining_samples(4, finished) == 0
    points, rewards = evaluated_points(SPACE, finished)
    assert len(points) == 3 and rewards == [0.5, 0.5, 0.5]  # the failed trial has no value to learn from
    assert points[0]["model.hidden_sizes"] == "[32]"  # as Tune's space holds list options (JSON)


def test_params_are_read_back_from_what_mlflow_recorded():
    config = {"trainer": {"optimizer": {"lr": 0.0012345678901234567}, "micro_batch_size": 32}, "model": {"hidden_sizes": [128, 128]}}
    recorded = {key: str(value) for key, value in flatten(config).items()}  # how StageRun logs a trial's params
    assert {dim.key: param_value(dim, recorded[dim.key]) for dim in SPACE} == {
        "trainer.optimizer.lr": 0.0012345678901234567, "model.hidden_sizes": [128, 128], "trainer.micro_batch_size": 32}
    with pytest.raises(ValueError, match="none of the options"):
        param_value(SPACE[1], "[64]")


def test_attempts_are_numbered_and_seeded_apart(tmp_path):
    assert next_attempt(tmp_path) == 1
    (tmp_path / "tune").mkdir()
    (tmp_path / "tune-resume-1").mkdir()
    (tmp_path / "tune-resume-3").mkdir()
    assert next_attempt(tmp_path) == 4
    assert attempt_seed(0, 1) != attempt_seed(0, 2) and attempt_seed(0, 1) != 0 and attempt_seed(None, 1) is None
    assert attempt_seed(7, 2) == attempt_seed(7, 2)


def test_grid_and_random_leftovers():
    grid = parse_space({"trainer.zero_stage": {"grid": [0, 2]}, "trainer.optimizer.lr": {"uniform": [0.1, 0.2]}})
    done = [RecordedTrial("a", "r", "FINISHED", "completed", {"trainer.zero_stage": 0, "trainer.optimizer.lr": 0.15}, 1.0, {})]
    left = remaining_variant_points(grid, 2, done, [])
    assert sorted(p["trainer.zero_stage"] for p in left) == [0, 2, 2]  # each grid value twice in all, one 0 done
    assert all(set(p) == {"trainer.zero_stage"} for p in left)  # the rest is sampled
    assert remaining_variant_points(SPACE, 5, [trial("a", "FINISHED"), trial("b", "RUNNING")], [{}]) == [{}, {}]
    user = [{"trainer.optimizer.lr": 1e-3, "model.hidden_sizes": [32], "trainer.micro_batch_size": 16}, {"trainer.optimizer.lr": 2e-3, "model.hidden_sizes": [32], "trainer.micro_batch_size": 16}]
    assert unrun_user_points(user, [trial("a", "FINISHED")]) == [user[1]]


def test_presets_come_first_with_their_id_then_the_searcher_continues(tmp_path):
    from ray.tune.search.optuna import OptunaSearch

    from orchestrator.sweep.space import to_tune

    finished = [trial("a", "FINISHED", "completed", value=0.9, lr=2e-3)]
    points, rewards = evaluated_points(SPACE, finished)
    optuna = OptunaSearch(seed=attempt_seed(0, 1), points_to_evaluate=points, evaluated_rewards=rewards)
    preset = {"trainer.optimizer.lr": 5e-3, "model.hidden_sizes": "[32]", "trainer.micro_batch_size": 32, RESUMED_TRIAL_KEY: "x1"}
    searcher = presets_first(optuna, [preset], "val_accuracy")
    assert searcher.set_search_properties("val_accuracy", "max", to_tune(SPACE))
    assert searcher.suggest("t1") == preset
    suggested = searcher.suggest("t2")
    assert RESUMED_TRIAL_KEY not in suggested and set(suggested) == {d.key for d in SPACE}
    searcher.on_trial_complete("t1", {"val_accuracy": 0.7})
    values = sorted(t.value for t in optuna._ot_study.trials if t.value is not None)
    assert values == [0.7, 0.9]  # the finished trial and the resumed one, both known to Optuna
    from ray.tune.search import ConcurrencyLimiter, SearchGenerator

    # what Tune does with it at every experiment checkpoint (written for Tune; a resume never reads it back)
    SearchGenerator(ConcurrencyLimiter(searcher, max_concurrent=1)).save_to_dir(str(tmp_path), "now")
    assert list(tmp_path.iterdir())


class BoobyTrap:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_the_resume_path_opens_no_pickle(tmp_path, monkeypatch):
    """A sweep folder on a shared store may hold anyone's pickles: planning the resume (reading MLflow, building
    the searcher and the fresh Tuner) must never load one."""
    import ray.tune

    from orchestrator.sweep.runner import _resumed_tuner
    from orchestrator.sweep.tracking import SweepRun

    monkeypatch.chdir(tmp_path)
    args = ["trainer.num_workers=1", "sweep.num_samples=3", "sweep.max_concurrent_trials=1"]
    plan = plan_sweep_from_overrides(args, cwd=tmp_path)
    parent = SweepRun(plan.base_plan.tracking)
    parent.start_sweep(plan, 1)
    client: MlflowClient = parent.client
    for trial_id, status, value in (("aaa", "FINISHED", 0.8), ("bbb", "RUNNING", 0.4)):
        run = client.create_run(parent.experiment_id, tags={PARENT_TAG: parent.run_id, TRIAL_TAG: trial_id})
        for key, text in (("trainer.optimizer.lr", "0.002"), ("model.hidden_sizes", "[32]"), ("trainer.micro_batch_size", "16")):
            client.log_param(run.info.run_id, key, text)
        client.log_metric(run.info.run_id, "val_accuracy", value, step=10)
        if status == "FINISHED":
            client.set_terminated(run.info.run_id, "FINISHED")
    marker = tmp_path / "unpickled"
    tune = plan.sweep_dir / "tune"
    tune.mkdir(parents=True)
    for name in ("tuner.pkl", "searcher-state-2026-11-29_12-00-00.pkl", "trainable.pkl"):
        (tune / name).write_bytes(pickle.dumps(BoobyTrap(marker)))
    plan.resuming = True
    tuner, earlier = _resumed_tuner(plan, ray.tune.with_parameters(lambda config, spec: None, spec={}), 1, parent, Console(file=io.StringIO()))
    assert isinstance(tuner, ray.tune.Tuner)
    assert [t.trial_id for t in earlier] == ["aaa"] and earlier[0].params["trainer.optimizer.lr"] == 0.002
    assert not marker.exists()
    # the fresh attempt's search hands out the interrupted trial first, under its own id
    algorithm, num_samples = resume_search(plan, [*earlier, trial("bbb", "RUNNING", lr=0.002)], 1, 1)
    assert num_samples == 2
    from orchestrator.sweep.space import to_tune

    algorithm.set_search_properties(plan.metric, plan.mode, to_tune(plan.dimensions))
    assert algorithm.suggest("new-1")[RESUMED_TRIAL_KEY] == "bbb"
    assert STATE_TAG not in client.get_run(earlier[0].run_id).data.tags  # planning writes nothing to the runs
