"""The user's path, as a user runs it: `orch run` in a terminal (its own Ray, local MLflow store, a quiet console),
then `orch ui` in a browser; a driver killed and resumed; Hydra's multirun, verbose."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import termios
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from orchestrator.launch.ray_session import free_port
from orchestrator.train.engine import cpu_has_native_bf16

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


CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def other_ray(ray_instance):
    """Another Ray instance already running on the machine (this test session's own), as on many users' machines:
    what it holds before `orch run` starts beside it."""
    import ray
    from ray.util.state import list_actors

    return {
        "actors": {actor.actor_id for actor in list_actors(limit=10_000, raise_on_missing_output=False)},
        "placement_groups": set(ray.util.placement_group_table()),
        "resources": ray.cluster_resources(),
    }


@pytest.fixture(scope="module")
def user_run(tmp_path_factory, other_ray):
    """`orch run` with small settings, exactly as typed at a shell (a 120x40 terminal), in an empty directory.
    Returns the directory and what the terminal showed (stdout and stderr together)."""
    cwd = tmp_path_factory.mktemp("user")
    code, console = _run_in_terminal(
        [*ORCH, "run", "name=first", "trainer.max_steps=30", "trainer.eval_every=15", "trainer.checkpoint_every=15",
         "tracking.register_as=digits-first"],
        cwd,
    )
    assert code == 0, console[-4000:]
    return cwd, console


def test_orch_run_prints_progress_and_a_summary_and_writes_the_local_store(user_run):
    cwd, console = user_run
    # orch's own lines: the start line with the log's path, the progress bar at its end, the summary
    assert "orch run first" in console and re.search(r"logs: \S*/orch_runs/first/logs/driver\.log", console)
    assert "30/30" in console and "val_accuracy" in console
    for line in ("MLflow run:", "checkpoint:", "model:", "orch ui"):
        assert line in console
    assert (cwd / "mlflow.db").is_file()
    assert list((cwd / "orch_runs" / "first").glob("checkpoint_step_00000030"))
    run = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}").search_runs(["1"], order_by=["attributes.start_time ASC"])[0]
    assert run.info.run_name == "first" and run.info.status == "FINISHED"
    assert run.data.metrics["val_accuracy"] > 0.5
    # precision=auto (the default) became bf16 only where the CPU computes bf16 natively
    assert run.data.tags["orch.precision"] == ("bf16" if cpu_has_native_bf16() else "fp32")


def test_the_terminal_shows_orchs_lines_only_and_the_run_log_holds_the_libraries(user_run):
    """A quiet terminal: Ray's, DeepSpeed's and MLflow's output, the driver's and the workers', is in the run's log
    file (an artifact of the run), not on the console."""
    cwd, console = user_run
    library_lines = [line for line in console.splitlines() if LIBRARY_LINE.search(line) or "TrainingReport(" in line]
    assert not library_lines, "\n".join(library_lines[:20])
    log = (cwd / "orch_runs" / "first" / "logs" / "driver.log").read_text()
    assert "TrainingReport(" in log and "(RayTrainWorker pid=" in log, log[-3000:]
    assert [line for line in CHATTER if line in log]
    assert "\x1b[" not in log  # RAY_COLOR_PREFIX=0: no colour codes in the file
    # a private local Ray has no node to drain: Ray Train's preemption watcher (an actor per fit, whose start its
    # controller logs) is not started there (orchestrator.launch.ray_session.LOCAL_INSTANCE_ENV)
    assert "PreemptionWatcher" not in log
    client = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    [run] = client.search_runs(["1"], filter_string="tags.`orch.run_name` = 'first'")
    assert [artifact.path for artifact in client.list_artifacts(run.info.run_id, "logs")] == ["logs/driver.log"]


def test_a_run_beside_another_ray_instance_keeps_to_its_own(user_run, other_ray):
    """orch's private Ray is the only cluster its processes and Ray's helpers see: nothing of the run lands on the
    other instance, which is left as it was, and no helper trips over two instances on one machine."""
    import ray
    from ray.util.state import list_actors

    cwd, console = user_run
    log = (cwd / "orch_runs" / "first" / "logs" / "driver.log").read_text()
    assert "(RayTrainWorker pid=" in log  # the log holds the run's Ray output, so the next line could fail
    for text in (console, log):
        assert "multiple active Ray instances" not in text and "Found multiple" not in text
    new_actors = [(actor.class_name, actor.actor_id) for actor in list_actors(limit=10_000, raise_on_missing_output=False)
                  if actor.actor_id not in other_ray["actors"]]
    assert not new_actors, new_actors
    assert not set(ray.util.placement_group_table()) - other_ray["placement_groups"]
    assert ray.cluster_resources() == other_ray["resources"]


def test_the_run_registers_its_mlflow_model_and_orch_eval_measures_the_registered_version(user_run, tmp_path):
    """tracking.register_as: a Model Registry version (alias newest) of the run's MLflow Model, which MLflow loads;
    `orch eval models:/...` evaluates it on the driver and tags the run it evaluated."""
    import mlflow.pytorch
    import torch

    from orchestrator.data.digits import load_digits_splits

    cwd, console = user_run
    uri = f"sqlite:///{cwd / 'mlflow.db'}"
    client = MlflowClient(uri)
    [run] = client.search_runs(["1"], filter_string="tags.`orch.run_name` = 'first'")
    assert "registered:  models:/digits-first/1" in console
    version = client.get_model_version_by_alias("digits-first", "newest")
    assert version.run_id == run.info.run_id and version.source == f"runs:/{run.info.run_id}/model/mlflow_model"
    assert client.get_experiment("1").tags["mlflow.experimentKind"] == "custom_model_development"
    [dataset] = run.inputs.dataset_inputs
    assert dataset.dataset.name == "digits"

    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        (tmp_path / "download").mkdir()
        served = mlflow.pytorch.load_model("models:/digits-first@newest", dst_path=str(tmp_path / "download"))
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    inputs, targets = load_digits_splits().val.tensors
    with torch.no_grad():
        accuracy = (served(inputs).argmax(-1) == targets).float().mean().item()
    assert accuracy == pytest.approx(run.data.metrics["val_accuracy"], abs=0.02)

    out = subprocess.run([*ORCH, "eval", "models:/digits-first@newest", "data=digits"], cwd=cwd, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    [evaluation] = client.search_runs(["1"], filter_string="tags.`orch.recipe` = 'evaluate'")
    assert evaluation.data.tags["orch.input_run_id"] == run.info.run_id
    assert evaluation.data.metrics["val_accuracy"] == pytest.approx(accuracy, abs=1e-6)


def test_a_second_run_with_the_same_name_is_refused_and_nothing_is_touched(user_run):
    cwd, _ = user_run
    before = sorted(p.name for p in (cwd / "orch_runs" / "first").iterdir())
    out = subprocess.run([*ORCH, "run", "name=first"], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "resume=first" in out.stderr
    assert sorted(p.name for p in (cwd / "orch_runs" / "first").iterdir()) == before
    runs = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}").search_runs(["1"], filter_string="tags.`orch.run_name` = 'first'")
    assert len(runs) == 1


@pytest.fixture(scope="module")
def ui(user_run):
    """`orch ui` on the user's store, in its own session, once it answers /health; stopped after the module."""
    cwd, _ = user_run
    port = free_port()
    ui = subprocess.Popen(
        [*ORCH, "ui", "--port", str(port)], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert ui.poll() is None, ui.stdout.read().decode()[-2000:] if ui.stdout else "orch ui exited"
            assert time.time() < deadline, "orch ui did not answer within 120 s"
            time.sleep(1)
        yield {"port": port, "process": ui}
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        try:
            ui.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(ui.pid, signal.SIGKILL)


def _session_commands(session: int) -> list[str]:
    """The command lines of every process in a session (`orch ui` and all it started)."""
    commands = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(") ", 1)[1].split()
            if int(fields[3]) == session:  # the session id
                commands.append((stat.parent / "cmdline").read_text().replace("\0", " "))
        except (OSError, IndexError, ValueError):
            continue
    return commands


def test_orch_ui_starts_the_mlflow_server_without_its_job_runners(ui):
    """MLflow 3's server starts a job runner and a pool of Huey consumers for GenAI jobs unless told not to: orch ui
    tells it (orchestrator.cli.mlflow_server_environment), so the UI is the server process and its web worker alone."""
    commands = _session_commands(ui["process"].pid)
    assert any("mlflow ui" in command for command in commands), commands
    assert any("uvicorn" in command for command in commands), commands  # the page server: the list is the real one
    assert not [command for command in commands if "huey" in command or "_job_runner" in command], commands


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_orch_ui_shows_the_run_and_its_metrics_in_a_browser(user_run, ui):
    cwd, _ = user_run
    run = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}").search_runs(["1"], order_by=["attributes.start_time ASC"])[0]
    with tempfile.TemporaryDirectory(prefix="orch-chromium-") as profile:
        dom = subprocess.run(
            [
                "chromium",
                *CHROMIUM_FLAGS,
                f"--user-data-dir={profile}",
                "--virtual-time-budget=20000",
                "--dump-dom",
                f"http://127.0.0.1:{ui['port']}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
    assert "first" in dom  # the run's name, rendered by the UI's JavaScript
    for metric in ("val_accuracy", "samples_per_s", "loss"):
        assert metric in dom


def test_a_killed_driver_is_started_again_with_resume_and_continues_the_same_run(tmp_path):
    # one worker, the cheapest fit: what is tested is the driver's death and the resume, not data parallelism
    run_args = ["trainer.max_steps=400", "trainer.num_workers=1", "trainer.checkpoint_every=20", "trainer.eval_every=0",
                "trainer.log_every=20", "tracking.log_model=false"]
    # rank 0 waits before step 50 (for a file nobody writes): the driver is killed there, mid-run, whatever the
    # machine's speed, with checkpoints 20 and 40 complete
    hold = tmp_path / "never"
    callback = f"{{_target_: orchestrator.train.callbacks.HoldAt, step: 50, rank: 0, until: '{hold}'}}"
    driver = subprocess.Popen(
        [*ORCH, "run", "name=crash", *run_args, f"trainer.callbacks=[{callback}]"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    run_dir = tmp_path / "orch_runs" / "crash"
    try:
        deadline = time.time() + 400
        while not Path(f"{hold}.reached").exists():
            assert driver.poll() is None, "the driver ended before step 50"
            assert time.time() < deadline, "step 50 not reached within 400 s"
            time.sleep(0.5)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray it started die at once, mid-run
        driver.wait(timeout=60)
    assert sorted(p.parent.name for p in run_dir.glob("checkpoint_step_*/.orch_complete_rank0")) == [
        "checkpoint_step_00000020", "checkpoint_step_00000040"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [crashed] = client.search_runs(["1"])
    assert crashed.info.status == "RUNNING"  # nobody was left to close it

    # the resume ends the run sooner than the first attempt meant to (120 steps, not 400)
    resumed = subprocess.run(
        [*ORCH, "run", "resume=crash", *run_args, "trainer.max_steps=120"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    # not a terminal (a pipe, as in a job log or CI): progress comes as lines now and then, up to the last step
    assert "crash: step 120/120" in resumed.stdout and "samples/s" in resumed.stdout, resumed.stdout
    assert "MLflow run:" in resumed.stdout and "checkpoint:" in resumed.stdout
    [run] = client.search_runs(["1"])
    assert run.info.run_id == crashed.info.run_id and run.info.status == "FINISHED"
    assert run.data.tags["orch.resumed_at_step"] == "40"
    assert max(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == 120


def test_hydra_multirun_gives_each_job_its_own_run_in_one_experiment_and_verbose_shows_the_libraries(tmp_path):
    """`orch run -v -m key=a,b`: Hydra's basic sweeper runs the jobs one after another in one process; `-v` shows
    the libraries' output live (here in a pipe) and writes no log file."""
    lrs = ("0.001", "0.01")
    out = subprocess.run(
        [*ORCH, "run", "-v", "-m", f"trainer.optimizer.lr={','.join(lrs)}", "trainer.num_workers=1",
         "trainer.max_steps=10", "trainer.eval_every=10", "trainer.checkpoint_every=10", "trainer.log_every=10",
         "tracking.system_metrics=false", "tracking.log_model=false"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    runs = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_runs(["1"])
    assert len(runs) == 2 and all(run.info.status == "FINISHED" for run in runs)
    assert sorted(run.data.params["trainer.optimizer.lr"] for run in runs) == sorted(lrs)
    names = {run.data.tags["orch.run_name"] for run in runs}
    assert len(names) == 2  # two runs, not one run logged twice
    assert (out.stdout + out.stderr).count("TrainingReport(") >= 2 and "logs:" not in out.stdout
    assert not any((tmp_path / "orch_runs" / name / "logs").exists() for name in names)
