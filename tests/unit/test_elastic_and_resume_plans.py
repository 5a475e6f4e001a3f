"""Pure logic of issue 17's pieces, no Ray: the elastic worker range as planned, the preemption flag's agreement
(on a process group of one), and what `orch sweep resume=NAME` accepts."""

from __future__ import annotations

import json

import pytest

from orchestrator.config import compose
from orchestrator.config.validate import ConfigError, worker_range
from orchestrator.plan import build_plan


@pytest.mark.parametrize("value, expected", [(2, (2, 2)), ([1, 4], (1, 4)), ([3, 3], (3, 3))])
def test_worker_range_reads_an_int_or_a_min_max_pair(value, expected):
    assert worker_range(value) == expected


@pytest.mark.parametrize("value", [0, [0, 2], [3, 2], [1, 2, 3], [1.5, 2], "two", True])
def test_worker_range_refuses_what_is_not_a_count_or_a_range(value):
    with pytest.raises(ConfigError) as error:
        worker_range(value)
    assert error.value.key == "trainer.num_workers"


def test_an_elastic_range_is_planned_as_a_range_with_the_global_batch_of_its_max(tmp_path):
    [stage] = build_plan(compose(["trainer.num_workers=[1,2]", "trainer.micro_batch_size=8"]), cwd=tmp_path).stages
    assert stage.num_workers == (1, 2) and stage.min_workers == 1
    # the batch of 2 workers, which 1 worker makes by accumulating 2 micro-batches (start_worker)
    assert stage.deepspeed["train_batch_size"] == 16 and stage.deepspeed["gradient_accumulation_steps"] == 1


@pytest.mark.parametrize("workers, accum, ok", [([1, 2], 1, True), ([2, 4], 1, False), ([2, 4], 3, True),
                                                ([1, 4], 1, False), ([1, 4], 3, True), ([2, 2], 1, True)])
def test_every_size_of_an_elastic_group_must_make_its_global_batch(tmp_path, workers, accum, ok):
    overrides = [f"trainer.num_workers=[{workers[0]},{workers[1]}]", f"trainer.grad_accum_steps={accum}"]
    if ok:
        build_plan(compose(overrides), cwd=tmp_path)
        return
    with pytest.raises(ConfigError) as error:
        build_plan(compose(overrides), cwd=tmp_path)
    assert error.value.key == "trainer.num_workers" and "multiple of 3" in str(error.value)
    [fixed] = build_plan(compose(["trainer.num_workers=2"]), cwd=tmp_path).stages
    assert fixed.num_workers == 2 and fixed.deepspeed["train_batch_size"] == 2 * fixed.deepspeed["train_micro_batch_size_per_gpu"]


@pytest.mark.usefixtures("single_process_group")
def test_a_stop_request_is_agreed_one_step_after_it_arrives():
    from orchestrator.train.preemption import STOP_REQUESTED, StopAgreement

    stop = StopAgreement()
    try:
        assert stop.agreed() is False  # nothing asked: the flag (0) goes out with this step
        STOP_REQUESTED.set()  # as the SIGTERM handler does, between two steps
        assert stop.agreed() is False  # the reduction read now is the one started before the signal
        assert stop.agreed() is True
    finally:
        STOP_REQUESTED.clear()
        stop.close()


SWEEP = {
    "name": "resume",
    "overrides": ["model.hidden_sizes=[16]", "trainer.max_steps=20", "trainer.eval_every=10", "trainer.checkpoint_every=10"],
    "space": {"trainer.optimizer.lr": {"loguniform": [1e-4, 3e-2]}},
    "metric": "val_accuracy",
    "mode": "max",
    "num_samples": 3,
    "max_concurrent_trials": None,
    "search": "optuna",
    "seed": 0,
    "points_to_evaluate": [],
    "scheduler": {"name": "none"},
}


def test_sweep_resume_takes_an_existing_sweep_started_with_the_same_settings(tmp_path):
    from orchestrator.sweep.plan import IDENTITY_FILE, plan_sweep

    first = plan_sweep(SWEEP, [], cwd=tmp_path)
    with pytest.raises(ConfigError, match="no sweep named"):
        plan_sweep(SWEEP, [f"resume={first.run_name}"], cwd=tmp_path)
    (first.sweep_dir / "tune").mkdir(parents=True)
    (first.sweep_dir / IDENTITY_FILE).write_text(json.dumps(first.identity(), default=str))
    again = plan_sweep(SWEEP, [f"resume={first.run_name}"], cwd=tmp_path)
    assert again.resuming and again.run_name == first.run_name and "resume" not in " ".join(again.overrides)
    with pytest.raises(ConfigError, match="num_samples"):
        plan_sweep({**SWEEP, "num_samples": 5}, [f"resume={first.run_name}"], cwd=tmp_path)
    with pytest.raises(ConfigError, match="overrides"):
        plan_sweep(SWEEP, [f"resume={first.run_name}", "trainer.max_steps=30"], cwd=tmp_path)
