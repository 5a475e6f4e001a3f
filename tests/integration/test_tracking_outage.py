"""A tracking outage in the middle of a run: the MLflow server stops while training goes on (a checkpoint included)
and comes back later on the same port and database. Training never fails or waits for it, and every metric point
logged during the outage is in MLflow afterwards, in a run closed FINISHED.

A real `mlflow server` (sqlite backend in tmp) and a real `orch run` (its own Ray, 1 worker). `HoldAt` callbacks
pause rank 0 at known steps, so the outage happens at a known point: the server stops at step 10, training runs
steps 10-30 (checkpoint at 20) against no server, and the server is back before step 30.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from orchestrator.cli import mlflow_server_environment
from orchestrator.launch.ray_session import free_port

pytestmark = pytest.mark.slow

MAX_STEPS = 40


def _start_server(root: Path, port: int) -> subprocess.Popen:
    log = open(root / "server.log", "a")  # noqa: SIM115 - closed with the process
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        # as `orch ui` starts one: no GenAI job runner and its seven Huey consumers (~27 CPU-s per start)
        env=mlflow_server_environment(os.environ),
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
            return server
        except OSError:
            assert server.poll() is None, (root / "server.log").read_text()[-2000:]
            time.sleep(0.5)
    raise AssertionError("mlflow server did not start: " + (root / "server.log").read_text()[-2000:])


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)  # its own session: the server and its uvicorn worker
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _wait_for(path: Path, run: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if run.poll() is not None:
            output = run.stdout.read() if run.stdout else ""
            raise AssertionError(f"orch run ended before {path.name}: rc={run.returncode}\n{output[-4000:]}")
        assert time.monotonic() < deadline, f"{path.name} not reached"
        time.sleep(0.2)


def test_metrics_logged_during_an_outage_reach_mlflow_when_it_returns(tmp_path):
    root, work = tmp_path / "server", tmp_path / "work"
    root.mkdir()
    work.mkdir()
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    holds = "[" + ", ".join(
        f"{{_target_: orchestrator.train.callbacks.HoldAt, step: {step}, until: '{tmp_path / f'go_{step}'}'}}"
        for step in (10, 30)
    ) + "]"
    server = _start_server(root, port)
    # MLflow's own client retries once, so the sender's attempts are seen quickly (a user setting too). A stopped server
    # refuses at once: the timeout only bounds a slow answer, and on a loaded machine (two test modules on 2 cores)
    # the server can take more than a few seconds; so can Ray Train's worker group, past its 60 s default.
    env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
           "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300"}
    run = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "run", "name=outage", f"tracking.uri={uri}",
         f"trainer.max_steps={MAX_STEPS}", "trainer.num_workers=1", "trainer.log_every=1", "trainer.eval_every=0",
         "trainer.checkpoint_every=20", "tracking.system_metrics=false", "tracking.log_model=false",
         f"trainer.callbacks={holds}"],
        cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        _wait_for(tmp_path / "go_10.reached", run)
        _stop(server)  # the outage: nothing listens on the port
        (tmp_path / "go_10").touch()
        _wait_for(tmp_path / "go_30.reached", run)  # steps 10-30 and the checkpoint at 20, without a server
        assert not list((work / "orch_runs" / "outage").glob("checkpoint_step_00000030"))
        assert list((work / "orch_runs" / "outage").glob("checkpoint_step_00000020"))
        server = _start_server(root, port)  # back, same port and database
        (tmp_path / "go_30").touch()
        output, _ = run.communicate(timeout=600)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
        _stop(server)
    assert run.returncode == 0, output[-4000:]
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")  # the server's own database, read after it stopped
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    [found] = client.search_runs(experiments, filter_string="tags.`orch.run_name` = 'outage'")
    assert found.info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(found.info.run_id, "loss"))
    assert steps == list(range(1, MAX_STEPS + 1)), steps  # every point, the outage's included, once
    assert "orch.precision" in found.data.tags  # a tag written through the same sender
