"""`orch sweep resume=NAME` after the sweep's driver was SIGKILLed once its first trial had finished: real Ray Tune
(Tuner.restore), Ray Train, DeepSpeed and MLflow, through the command line as a user types it (~2 min on 2 cores).

Three Optuna trials, one at a time, one worker each. The first finished trial must come through untouched, the
trial the kill interrupted must reuse its MLflow child (never a second child, never one left RUNNING), and the
searcher must continue: three trials in all, not three more.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from mlflow import MlflowClient

pytestmark = pytest.mark.slow

ORCH = [sys.executable, "-m", "orchestrator.cli"]
NUM_SAMPLES = 3
SWEEP_ARGS = [
    f"sweep.num_samples={NUM_SAMPLES}",
    "sweep.scheduler.name=none",
    "sweep.max_concurrent_trials=1",
    "~sweep.space.model.hidden_sizes",
    "~sweep.space.trainer.micro_batch_size",
    "trainer.num_workers=1",
    "trainer.max_steps=40",
    "trainer.eval_every=10",
    "trainer.checkpoint_every=10",
    "trainer.log_every=10",
    "tracking.log_model=false",
]


def sweep_runs(client: MlflowClient):
    """(parent, children) of the one sweep in the store, or (None, [])."""
    runs = [run for exp in client.search_experiments() for run in client.search_runs([exp.experiment_id])]
    parents = [run for run in runs if run.data.tags.get("orch.recipe") == "sweep"]
    if not parents:
        return None, []
    [parent] = parents
    return parent, [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id]


@pytest.fixture(scope="module")
def interrupted_and_resumed(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("sweep-resume")
    client = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    driver = subprocess.Popen(
        [*ORCH, "sweep", *SWEEP_ARGS], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.time() + 600
        while True:
            assert driver.poll() is None, "the sweep ended before the driver was killed"
            assert time.time() < deadline, "no trial finished within 600 s"
            parent, children = sweep_runs(client) if (cwd / "mlflow.db").exists() else (None, [])
            if any(child.info.status == "FINISHED" for child in children):
                break
            time.sleep(0.5)
    finally:
        try:
            os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray it started die at once
        except ProcessLookupError:
            pass
        driver.wait(timeout=60)
    before_parent, before = sweep_runs(client)
    name = before_parent.data.tags["orch.run_name"]
    resumed = subprocess.run([*ORCH, "sweep", *SWEEP_ARGS, f"resume={name}"], cwd=cwd, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    after_parent, after = sweep_runs(client)
    return before_parent, before, after_parent, after


def test_finished_trials_are_kept_and_the_searcher_continues(interrupted_and_resumed):
    before_parent, before, after_parent, after = interrupted_and_resumed
    assert after_parent.info.run_id == before_parent.info.run_id and after_parent.info.status == "FINISHED"
    assert after_parent.data.tags["orch.resumes"] == "1"
    assert len(after) == NUM_SAMPLES, "the searcher started again, or a trial has two children"
    assert len({run.data.tags["orch.trial_id"] for run in after}) == NUM_SAMPLES
    by_id = {run.info.run_id: run for run in after}
    finished = [run for run in before if run.info.status == "FINISHED"]
    assert finished
    for run in finished:  # the same child, closed at the same time, with the same results
        kept = by_id[run.info.run_id]
        assert kept.info.status == "FINISHED" and kept.info.end_time == run.info.end_time
        assert kept.data.metrics["val_accuracy"] == run.data.metrics["val_accuracy"]


def test_an_interrupted_trial_reuses_its_child_and_none_stays_running(interrupted_and_resumed):
    _, before, _, after = interrupted_and_resumed
    assert all(run.info.status != "RUNNING" for run in after)
    assert all(run.data.tags.get("orch.trial_state") == "completed" for run in after)
    interrupted = [run for run in before if run.info.status == "RUNNING"]
    by_id = {run.info.run_id: run for run in after}
    for run in interrupted:
        assert run.info.run_id in by_id, "the interrupted trial's child was replaced by another"
        assert by_id[run.info.run_id].data.tags.get("orch.resumes") == "1"
