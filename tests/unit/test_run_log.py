"""A quiet terminal (orchestrator.launch.run_log): libraries' output goes to the run's log file, orch's stays on the
terminal, and everything is put back afterwards. The end-to-end check (a real `orch run` under a pseudo-terminal) is
tests/integration/test_cli_e2e.py."""

from __future__ import annotations

import io
import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from orchestrator.launch.run_log import QUIET_ENV, quiet_terminal, run_log_path
from orchestrator.track.mlflow_run import log_file_attached


@pytest.fixture
def terminal(monkeypatch):
    """A root logger configured like Hydra's job logging (to stdout) and none of Ray's switches set; the test enters
    `_fake_terminal()` itself (pytest puts its own sys.stdout back between a fixture and the test)."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    for key in QUIET_ENV:
        monkeypatch.delenv(key, raising=False)
    yield
    root.handlers, _ = saved
    root.setLevel(saved[1])


@contextmanager
def _fake_terminal():
    out, err = io.StringIO(), io.StringIO()
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    root = logging.getLogger()
    root.handlers = [logging.StreamHandler(out)]
    root.setLevel(logging.INFO)
    try:
        yield out, err
    finally:
        sys.stdout, sys.stderr = saved


def test_libraries_output_goes_to_the_file_and_orchs_own_to_the_terminal(terminal, tmp_path):
    with _fake_terminal() as (out, err):
        _route_every_kind_of_output(tmp_path / "run" / "logs" / "driver.log")
    log = (tmp_path / "run" / "logs" / "driver.log").read_text()
    for line in ("TrainingReport(", "Token authentication", "Creating initial MLflow database tables", "a library warning",
                 "before it has started", "skipping checkpoint_step_10", "could not reach the tracking server"):
        assert line in log, line
    terminal_text = out.getvalue() + err.getvalue()
    assert "skipping checkpoint_step_10" in terminal_text and "could not reach the tracking server" in terminal_text
    for chatter in ("TrainingReport(", "Token authentication", "Creating initial", "a library warning", "before it has started"):
        assert chatter not in terminal_text, chatter


def _route_every_kind_of_output(path: Path) -> None:
    # DeepSpeed's logger: its own handler, bound to stdout when it was imported, not propagating
    deepspeed = logging.getLogger("test_run_log.DeepSpeed")
    deepspeed.propagate = False
    deepspeed.addHandler(logging.StreamHandler(sys.stdout))
    try:
        with quiet_terminal(path):
            print("(RayTrainWorker pid=946) Reporting training result 1: TrainingReport(checkpoint=...)")
            print("Token authentication is enabled for this Ray cluster", file=sys.stderr)
            logging.getLogger("mlflow.store.db.utils").info("Creating initial MLflow database tables...")
            logging.getLogger("test_run_log.a_library").warning("a library warning")  # propagates to the root
            deepspeed.warning("Attempting to get learning rate from scheduler before it has started")
            logging.getLogger("orchestrator.train.checkpoints").warning("skipping checkpoint_step_10")
            logging.getLogger("mlflow.tracking").error("could not reach the tracking server")
            assert os.environ["RAY_COLOR_PREFIX"] == "0" and os.environ["RAY_DEDUP_LOGS"] == "0"
    finally:
        deepspeed.handlers.clear()


def test_everything_is_put_back_after_the_block(terminal, tmp_path):
    root = logging.getLogger()
    with _fake_terminal() as (out, err):
        handlers = root.handlers[:]
        root.setLevel(logging.WARNING)
        with quiet_terminal(tmp_path / "driver.log"):
            assert root.level == logging.INFO  # libraries' INFO records reach the file
            late = logging.getLogger("test_run_log.imported_during_the_run")
            late.propagate = False
            late.addHandler(logging.StreamHandler(sys.stdout))  # bound to the log file
        assert sys.stdout is out and sys.stderr is err
        assert root.handlers == handlers and root.level == logging.WARNING and root.handlers[0].stream is out
        assert not any(key in os.environ for key in QUIET_ENV)
        late.warning("after the run")  # its stream is no longer the closed log file
        late.handlers.clear()
    assert "after the run" in err.getvalue()


def test_a_users_own_ray_settings_win(terminal, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_DEDUP_LOGS", "1")
    with _fake_terminal(), quiet_terminal(tmp_path / "driver.log"):
        assert os.environ["RAY_DEDUP_LOGS"] == "1"
    assert os.environ["RAY_DEDUP_LOGS"] == "1"


def test_orchs_settings_for_its_own_local_ray_leave_a_users_own_in_place(monkeypatch):
    from orchestrator.launch.ray_session import LOCAL_INSTANCE_ENV, local_instance_env

    for name in LOCAL_INSTANCE_ENV:
        monkeypatch.delenv(name, raising=False)
    assert local_instance_env() == {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2")
    assert local_instance_env()["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "2"
    assert local_instance_env()["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"


def test_an_error_in_the_block_restores_the_terminal_before_it_is_reported(terminal, tmp_path):
    with _fake_terminal() as (out, err):
        with pytest.raises(RuntimeError):
            with quiet_terminal(tmp_path / "driver.log"):
                raise RuntimeError("training failed")
        assert sys.stdout is out and sys.stderr is err


def test_a_resumed_run_appends_to_its_log(terminal, tmp_path):
    path = tmp_path / "driver.log"
    for attempt in ("first", "resumed"):
        with _fake_terminal(), quiet_terminal(path):
            print(attempt)
    assert path.read_text().split() == ["first", "resumed"]


def test_workers_lines_forwarded_by_ray_land_in_the_file_without_colour_codes(terminal, tmp_path):
    worker = pytest.importorskip("ray._private.worker")
    path = tmp_path / "driver.log"
    batch = {"pid": 946, "actor_name": "RayTrainWorker", "ip": "10.0.0.1", "localhost": "10.0.0.1", "is_err": False,
             "lines": ["Reporting training result 1: TrainingReport(metrics={'step': 10})"]}
    with _fake_terminal() as (out, err):
        with quiet_terminal(path):
            worker.print_worker_logs(batch, sys.stdout)  # what Ray's driver does with every forwarded batch
    log = path.read_text()
    assert "(RayTrainWorker pid=946) Reporting training result 1" in log and "\x1b[" not in log
    assert "TrainingReport" not in out.getvalue() + err.getvalue()


def test_the_log_lives_next_to_the_runs_checkpoints():
    assert run_log_path("orch_runs", "train-1") == Path("orch_runs/train-1/logs/driver.log")
    remote = run_log_path("s3://bucket/runs", "train-1")
    assert "://" not in str(remote) and remote.parts[-2:] == ("train-1", "driver.log")


def test_the_log_is_attached_to_the_mlflow_run_even_when_the_run_fails(tmp_path):
    path = tmp_path / "driver.log"
    path.write_text("chatter\n")
    logged = []
    with pytest.raises(RuntimeError):
        with log_file_attached(lambda local, artifact_dir: logged.append((local, artifact_dir)), path):
            raise RuntimeError("diverged")
    assert logged == [(str(path), "logs")]
    with log_file_attached(logged.append, None):  # -v: no log file
        pass
    assert len(logged) == 1


@pytest.mark.parametrize("flag", ["-v", "--verbose"])
def test_verbose_flag_reaches_the_run_and_not_hydra(monkeypatch, flag):
    import orchestrator.cli as cli

    seen = {}
    monkeypatch.setattr(cli, "_compose_once", lambda argv, mode: seen.update(argv=argv, mode=mode))
    cli._run_hydra("run", [flag, "trainer.max_steps=3"])
    assert seen["argv"] == ["trainer.max_steps=3"] and seen["mode"].verbose
    cli._run_hydra("sweep", ["trainer.max_steps=3"])
    assert not seen["mode"].verbose


class _Board:
    """Stands in for the progress-board actor: `.warn.remote(...)`, `.latest.remote(...)` as Ray's handles read."""

    def __init__(self) -> None:
        self.warnings: list[str] = []
        self.warn = type("Method", (), {"remote": staticmethod(self.warnings.append)})()
        self.latest = type("Method", (), {"remote": staticmethod(lambda seen: (7, {"loss": 1.0}, self.warnings[seen:]))})()


def test_orchs_warnings_on_rank_0_reach_the_drivers_terminal(monkeypatch):
    from rich.console import Console

    from orchestrator.launch import progress
    from orchestrator.train.worker_metrics import WarningsToDriver, send_warnings_to_driver

    board = _Board()
    send_warnings_to_driver(board)
    send_warnings_to_driver(board)  # a second set-up in the same process replaces the first
    logger = logging.getLogger("orchestrator")
    try:
        assert sum(isinstance(h, WarningsToDriver) for h in logger.handlers) == 1
        logging.getLogger("orchestrator.train.checkpoints").warning("skipping %s: not every rank finished writing it", "ckpt_10")
        logging.getLogger("orchestrator.train.checkpoints").info("not a warning")
        logging.getLogger("deepspeed").warning("not orch's")
    finally:
        logger.handlers = [h for h in logger.handlers if not isinstance(h, WarningsToDriver)]
    assert board.warnings == ["skipping ckpt_10: not every rank finished writing it"]

    monkeypatch.setattr(progress.ray, "get", lambda value, timeout=None: value)
    out = io.StringIO()
    poll = progress._Poll(board, Console(file=out, width=100))
    assert poll() == (7, {"loss": 1.0}) and poll() == (7, {"loss": 1.0})
    assert out.getvalue().count("skipping ckpt_10") == 1  # shown once
