"""A quiet terminal, as a user sees it: `orch run` in a terminal (a pseudo-terminal here) shows orch's own lines only;
Ray's, DeepSpeed's and MLflow's output, the driver's and the workers', is in the run's log file and in MLflow."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

pytestmark = pytest.mark.slow

ORCH = [sys.executable, "-m", "orchestrator.cli"]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")
# what a library line looks like on the console: a level word, or Ray's prefix of a forwarded worker line
LIBRARY_LINE = re.compile(r"\b(INFO|WARNING|WARN)\b|\[(INFO|WARNING)\]|\((RayTrainWorker|TrainController|PlacementGroupCleaner)")
CHATTER = (  # lines the libraries print in every such run (seen on the console before this was quiet)
    "Reporting training result",  # Ray Train, every rank at every checkpoint
    "Creating initial MLflow database tables",  # MLflow, driver and rank 0
    "mlflow.system_metrics",  # MLflow's system-metrics monitor on rank 0
    "Attempting to get learning rate from scheduler before it has started",  # DeepSpeed
    "Token authentication is enabled",  # Ray
)


def _run_in_terminal(args: list[str], cwd: Path, timeout_s: float = 600) -> tuple[int, str]:
    """Run `args` with stdout and stderr on a 120x40 pseudo-terminal; return its exit code and what it showed."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "40"}
    process = subprocess.Popen(args, cwd=cwd, stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal, env=env,
                               start_new_session=True)
    os.close(terminal)
    shown = bytearray()
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(controller, 65536)
                except OSError:  # EIO: every process holding the terminal has exited
                    break
                if not chunk:
                    break
                shown += chunk
            elif process.poll() is not None:
                break
        code = process.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if process.poll() is None:
            process.kill()
        os.close(controller)
    return code, ANSI.sub("", shown.decode("utf-8", errors="replace")).replace("\r", "\n")


def test_orch_run_in_a_terminal_shows_orchs_lines_and_logs_the_rest(tmp_path):
    code, console = _run_in_terminal(
        [*ORCH, "run", "name=quiet", "trainer.max_steps=30", "trainer.checkpoint_every=10", "trainer.eval_every=15"], tmp_path
    )
    assert code == 0, console[-4000:]
    log_file = tmp_path / "orch_runs" / "quiet" / "logs" / "driver.log"
    # orch's own lines: the start line with the log's path, the progress bar, the summary
    assert "orch run quiet" in console and re.search(r"logs: \S*/orch_runs/quiet/logs/driver\.log", console)
    assert "30/30" in console and "val_accuracy" in console
    assert "MLflow run:" in console and "checkpoint:" in console
    # no library line on the console
    library_lines = [line for line in console.splitlines() if LIBRARY_LINE.search(line) or "TrainingReport(" in line]
    assert not library_lines, "\n".join(library_lines[:20])
    # ... they are in the log file, the workers' included, and the log is an artifact of the run
    log = log_file.read_text()
    assert "TrainingReport(" in log and "(RayTrainWorker pid=" in log, log[-3000:]
    assert [line for line in CHATTER if line in log]
    assert "\x1b[" not in log  # RAY_COLOR_PREFIX=0: no colour codes in the file
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs(["1"])
    assert [artifact.path for artifact in client.list_artifacts(run.info.run_id, "logs")] == ["logs/driver.log"]


def test_orch_run_verbose_shows_the_libraries_live(tmp_path):
    code, console = _run_in_terminal(
        [*ORCH, "run", "-v", "name=loud", "trainer.max_steps=10", "trainer.checkpoint_every=10", "trainer.eval_every=10"], tmp_path
    )
    assert code == 0, console[-4000:]
    assert "TrainingReport(" in console and "logs:" not in console
    assert not (tmp_path / "orch_runs" / "loud" / "logs").exists()
