"""Preemption on real Ray workers: a SIGTERM to one worker process of a 2-worker fit (as a spot node's reclaim sends)
makes every rank save the step it is at and stop; `resume=` then continues from the next step, losing none.

One fit, stopped by the signal, and its resume, shared by the assertions (~40 s on 2 cores).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from orchestrator.config import compose
from orchestrator.plan import build_plan
from orchestrator.stage_runner import run_plan

pytestmark = pytest.mark.slow

MAX_STEPS = 120  # the signal comes at step 20: ample steps left to stop at, few to resume
COMMON = [
    f"trainer.max_steps={MAX_STEPS}",
    "trainer.log_every=1",
    "trainer.eval_every=0",
    "trainer.checkpoint_every=0",
    "trainer.max_failures=0",  # the run ends at the preemption; resume= continues it
    "trainer.zero_stage=0",
    "trainer.precision=fp32",
    "tracking.system_metrics=false",
    "tracking.log_model=false",
]


def signal_when_reported(pid_file: Path, outcome: dict) -> None:
    """SIGTERM the worker whose PID the worker itself reported, then wait for that process to exit."""
    deadline = time.monotonic() + 600
    while not pid_file.exists():
        if time.monotonic() > deadline:
            return
        time.sleep(0.02)
    pid = int(pid_file.read_text())
    sent = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    outcome["pid"] = pid
    while Path(f"/proc/{pid}").exists():
        time.sleep(0.05)
    outcome["seconds_to_exit"] = time.monotonic() - sent


@pytest.fixture(scope="module")
def preempted(ray_instance, workdir):
    pid_file = workdir / "preempt-pid"
    report = f"{{_target_: orchestrator.train.callbacks.ReportPid, step: 20, rank: 1, path: '{pid_file}'}}"
    plan = build_plan(compose([*COMMON, "name=preempted", f"trainer.callbacks=[{report}]"]), cwd=workdir)
    outcome: dict = {}
    sender = threading.Thread(target=signal_when_reported, args=(pid_file, outcome), daemon=True)
    sender.start()
    with pytest.raises(Exception) as error:
        run_plan(plan)
    sender.join(timeout=120)
    assert "pid" in outcome, "the worker never reported its PID: the test would prove nothing"
    print(f"preemption: SIGTERM to exit of the signalled worker {outcome.get('seconds_to_exit', float('nan')):.2f} s")
    resumed_plan = build_plan(compose([*COMMON, "resume=preempted"]), cwd=workdir)
    [result] = run_plan(resumed_plan)
    return error.value, outcome, result


@pytest.fixture(scope="module")
def client(workdir) -> MlflowClient:
    return MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")


def test_sigterm_saves_the_current_step_on_every_rank_and_stops_the_run(preempted, client, workdir):
    error, outcome, result = preempted
    run = client.get_run(result.run_id)
    step = int(run.data.tags["orch.preempted_at_step"])
    assert 20 <= step < MAX_STEPS
    assert f"step {step}" in str(error) and "SIGTERM" in str(error)
    assert "seconds_to_exit" in outcome, "the signalled worker process never exited"
    saved = workdir / "orch_runs" / "preempted" / f"checkpoint_step_{step:08d}"
    assert {p.name for p in saved.glob(".orch_complete_rank*")} == {".orch_complete_rank0", ".orch_complete_rank1"}


def test_resume_continues_at_the_next_step_and_logs_every_step_once(preempted, client):
    _, _, result = preempted
    run = client.get_run(result.run_id)
    step = int(run.data.tags["orch.preempted_at_step"])
    assert run.info.status == "FINISHED" and run.data.tags["orch.resumes"] == "1"
    assert run.data.tags["orch.resumed_at_step"] == str(step)
    history = sorted(client.get_metric_history(result.run_id, "loss"), key=lambda m: (m.timestamp, m.step))
    steps = [m.step for m in history]  # in the order they were logged: the preempted attempt's, then the resumed one's
    assert sorted(steps) == list(range(1, MAX_STEPS + 1)), "a step was lost or logged twice"
    assert steps.index(step) == step - 1 and steps[step] == step + 1  # the first resumed step is the next one
