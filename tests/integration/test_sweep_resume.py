"""`orch sweep resume=NAME` after the sweep's driver was SIGKILLed once its first trial had finished and the second
had saved a checkpoint: real Ray Tune, Ray Train, DeepSpeed and MLflow, through the command line as a user types it
(~2 min on 2 cores).

Three Optuna trials, one at a time, one worker each. The resume reads only data (MLflow, JSON, checkpoints): every
pickle Tune left in the first attempt's tune/ folder is replaced by one whose loading would create a marker file,
and the folder must come through byte for byte. The first finished trial must come through untouched, the trial
the kill interrupted must continue its own Ray Train run from its checkpoint in its own MLflow child (never a second
child, never one left RUNNING), and the searcher must continue: three trials in all, not three more.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

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


class BoobyTrap:
    """A pickle whose loading creates `marker`: proof that nothing unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def files_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def interrupted_and_resumed(tmp_path_factory, ray_instance):
    """The sweep's drivers run beside another Ray instance (the test session's), as on many users' machines."""
    from ray.util.state import list_actors

    actors_before = {actor.actor_id for actor in list_actors(limit=10_000, raise_on_missing_output=False)}
    cwd = tmp_path_factory.mktemp("sweep-resume")
    # every trial's rank 0 waits before step 25 until `go` exists: the first trial is let through, the second is
    # held there, with its checkpoints 10 and 20 complete, and the driver is killed then, whatever the machine's speed
    go = cwd / "go"
    reached, passed = Path(f"{go}.reached"), Path(f"{go}.passed")
    args = [*SWEEP_ARGS, f"trainer.callbacks=[{{_target_: orchestrator.train.callbacks.HoldAt, step: 25, until: '{go}'}}]"]
    client = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    output = cwd / "first-attempt-output.txt"  # what the driver printed, for the message if it ends on its own
    with open(output, "w") as sink:
        driver = subprocess.Popen([*ORCH, "sweep", *args], cwd=cwd, stdout=sink, stderr=subprocess.STDOUT,
                                  start_new_session=True)

    def wait_for(condition, what: str) -> None:
        deadline = time.time() + 600
        while not condition():
            assert driver.poll() is None, f"the sweep ended (rc {driver.returncode}) before {what}:\n" + \
                output.read_text()[-4000:]
            assert time.time() < deadline, f"not within 600 s: {what}"
            time.sleep(0.5)

    def finished_children() -> int:
        _, children = sweep_runs(client) if (cwd / "mlflow.db").exists() else (None, [])
        return sum(child.info.status == "FINISHED" for child in children)

    try:
        wait_for(reached.exists, "the first trial reached step 25")
        reached.unlink()
        go.touch()
        # `go` goes as soon as the first trial is past it, while that trial still runs: the next one starts only
        # after it ends, so it will be held (waiting for the first trial's MLflow child to be closed instead let the
        # second trial through on a loaded machine)
        wait_for(passed.exists, "the first trial passed step 25")
        go.unlink()
        wait_for(lambda: finished_children() == 1, "the first trial finished")
        wait_for(reached.exists, "the second trial reached step 25")
    finally:
        try:
            os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray it started die at once
        except ProcessLookupError:
            pass
        driver.wait(timeout=60)
    go.touch()  # the resumed attempt's trials are not held
    before_parent, before = sweep_runs(client)
    name = before_parent.data.tags["orch.run_name"]
    tune_dir = cwd / "orch_runs" / name / "tune"
    marker = cwd / "unpickled"
    pickles = sorted(tune_dir.rglob("*.pkl"))
    assert pickles, "Tune wrote no pickle: nothing to booby-trap"
    for path in pickles:
        path.write_bytes(pickle.dumps(BoobyTrap(marker)))
    tune_files = files_digest(tune_dir)
    resume_started_ms = int(time.time() * 1000)
    resumed = subprocess.run([*ORCH, "sweep", *args, f"resume={name}"], cwd=cwd, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    after_parent, after = sweep_runs(client)
    return {"before_parent": before_parent, "before": before, "after_parent": after_parent, "after": after, "client": client,
            "marker": marker, "tune_dir": tune_dir, "tune_files": tune_files, "resume_started_ms": resume_started_ms,
            "sweep_dir": cwd / "orch_runs" / name, "stdout": resumed.stdout, "actors_before": actors_before}


def test_the_resume_reads_no_pickle_and_leaves_the_first_attempt_as_it_was(interrupted_and_resumed):
    r = interrupted_and_resumed
    assert not r["marker"].exists(), "the resume unpickled a file of the interrupted sweep's tune/ folder"
    assert files_digest(r["tune_dir"]) == r["tune_files"]
    assert (r["sweep_dir"] / "tune-resume-1").is_dir()


def test_finished_trials_are_kept_and_the_searcher_continues(interrupted_and_resumed):
    r = interrupted_and_resumed
    before_parent, before, after_parent, after = r["before_parent"], r["before"], r["after_parent"], r["after"]
    assert after_parent.info.run_id == before_parent.info.run_id and after_parent.info.status == "FINISHED"
    assert after_parent.data.tags["orch.resumes"] == "1"
    assert len(after) == NUM_SAMPLES, "the searcher started again, or a trial has two children"
    assert len({run.data.tags["orch.trial_id"] for run in after}) == NUM_SAMPLES
    by_id = {run.info.run_id: run for run in after}
    finished = [run for run in before if run.info.status == "FINISHED"]
    assert finished
    # Tune's outcome was on the child before the kill (the driver tags it as Tune decides): data a resume can read
    assert all(run.data.tags.get("orch.trial_state") == "completed" for run in finished)
    for run in finished:  # the same child, closed at the same time, with the same results
        kept = by_id[run.info.run_id]
        assert kept.info.status == "FINISHED" and kept.info.end_time == run.info.end_time
        assert kept.data.metrics["val_accuracy"] == run.data.metrics["val_accuracy"]


def test_an_interrupted_trial_continues_from_its_checkpoint_in_its_child_and_none_stays_running(interrupted_and_resumed):
    r = interrupted_and_resumed
    before, after = r["before"], r["after"]
    assert all(run.info.status != "RUNNING" for run in after)
    assert all(run.data.tags.get("orch.trial_state") == "completed" for run in after)
    interrupted = [run for run in before if run.info.status == "RUNNING"]
    assert interrupted, "the kill interrupted no trial"
    by_id = {run.info.run_id: run for run in after}
    for run in interrupted:
        assert run.info.run_id in by_id, "the interrupted trial's child was replaced by another"
        assert by_id[run.info.run_id].data.tags.get("orch.resumes") == "1"
        assert by_id[run.info.run_id].data.tags["orch.trial_id"] == run.data.tags["orch.trial_id"]
        # it continued from its checkpoint of step 20 (it was held at 25): nothing it logged after the resume
        # started is from step 20 or before
        history = r["client"].get_metric_history(run.info.run_id, "loss")
        resumed_steps = [m.step for m in history if m.timestamp >= r["resume_started_ms"]]
        assert resumed_steps and min(resumed_steps) > 20, sorted((m.step, m.timestamp) for m in history)


def test_the_outcome_counts_every_trial_of_the_sweep(interrupted_and_resumed):
    r = interrupted_and_resumed
    parent = r["client"].get_run(r["after_parent"].info.run_id)
    assert parent.data.metrics["trials"] == NUM_SAMPLES and parent.data.metrics["trials_completed"] == NUM_SAMPLES
    best = parent.data.tags["orch.best_trial_run_id"]
    values = {run.info.run_id: run.data.metrics["val_accuracy"] for run in r["after"]}
    assert values[best] == max(values.values())


def test_the_sweep_beside_another_ray_instance_keeps_to_its_own_and_shows_its_trials(interrupted_and_resumed):
    from ray.util.state import list_actors

    r = interrupted_and_resumed
    log = (r["sweep_dir"] / "logs" / "driver.log").read_text()
    assert "(RayTrainWorker pid=" in log or "TrainController" in log  # Ray's output is there, so the next line can fail
    assert "multiple active Ray instances" not in log + r["stdout"]
    new_actors = [(actor.class_name, actor.actor_id) for actor in list_actors(limit=10_000, raise_on_missing_output=False)
                  if actor.actor_id not in r["actors_before"]]
    assert not new_actors, new_actors
    assert " started (1/" in r["stdout"] and " ended" in r["stdout"]  # the resumed attempt's trial lines
