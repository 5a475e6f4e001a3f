"""What orch exposes: the files `orch submit` uploads, the UI's address, a tracking server checked before Ray.

The upload is packed by Ray's own packer (`create_package`, what `submit_job` uses for a working_dir) with orch's
excludes, so the test sees exactly what a cluster would receive. No Ray is started.
"""

from __future__ import annotations

import http.server
import threading
import zipfile
from pathlib import Path

import pytest

from orchestrator.cli import _loopback
from orchestrator.config.validate import ConfigError
from orchestrator.launch.jobs import upload_excludes
from orchestrator.track.mlflow_run import check_tracking_reachable

SECRETS = [".env", ".env.prod", "server.pem", "tls.key", "id_rsa", "id_ed25519.pub", ".netrc", "keys/deploy.pem"]
JOURNALS = ["mlflow.db-journal", "runs.db-wal", "runs.db-shm"]
CODE = ["train.py", "conf/model/mine.yaml", "pkg/keyboard.py", "README.md", "runs.db"]


def _uploaded(working_dir: Path, excludes: list[str], tmp_path: Path) -> set[str]:
    from ray._private.runtime_env.packaging import create_package

    package = tmp_path / "package.zip"
    create_package(str(working_dir), package, include_gitignore=True, excludes=excludes)
    with zipfile.ZipFile(package) as archive:
        return {name for name in archive.namelist() if not name.endswith("/")}


def test_submit_uploads_code_and_never_secrets_journals_or_run_storage(tmp_path):
    project = tmp_path / "project"
    stored = ["ckpts/run-1/checkpoint_000000/model.pt", "track/runs.sqlite", "nested/store/x.bin"]
    for name in SECRETS + JOURNALS + CODE + stored:
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text("x")
    excludes = upload_excludes(project, "./ckpts", f"sqlite:///{project / 'track' / 'runs.sqlite'}")
    uploaded = _uploaded(project, excludes, tmp_path)
    assert uploaded == {*CODE, "nested/store/x.bin"}, sorted(uploaded)
    # a file:// storage URI inside the directory, and storage outside it (nothing to exclude, nothing breaks)
    excludes = upload_excludes(project, (project / "nested" / "store").as_uri(), "http://mlflow:5000")
    (tmp_path / "package.zip").unlink()
    assert "nested/store/x.bin" not in _uploaded(project, excludes, tmp_path)
    assert upload_excludes(project, str(tmp_path / "elsewhere"), "s3://bucket/x")[-1] == "*-shm"


@pytest.mark.parametrize("host, local", [("127.0.0.1", True), ("localhost", True), ("::1", True), ("127.0.0.2", True),
                                         ("0.0.0.0", False), ("::", False), ("192.168.1.5", False), ("myhost", False)])
def test_only_loopback_hosts_are_served_without_insecure_public(host, local):
    assert _loopback(host) is local


def test_orch_ui_on_a_public_host_is_refused_without_the_flag(capsys):
    from orchestrator import cli

    with pytest.raises(SystemExit) as exited:
        cli.main(["ui", "--host", "0.0.0.0", "--port", "5999"])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--host=0.0.0.0" in err[0] and "--insecure-public" in err[0]


def test_a_tracking_server_that_answers_passes_and_a_silent_port_fails_naming_the_key():
    class Unauthorized(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(401)  # a server with auth is still a server
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Unauthorized)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        check_tracking_reachable(f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(ConfigError) as refused:
        check_tracking_reachable(f"http://127.0.0.1:{server.server_port}", timeout_s=2)
    assert refused.value.key == "tracking.uri" and "\n" not in str(refused.value)
    check_tracking_reachable("sqlite:///nowhere/mlflow.db")  # not a server: nothing to probe


def test_secrets_travel_by_reference_never_as_values(tmp_path, monkeypatch):
    from orchestrator.config.secrets import load_secret_files
    from orchestrator.launch.jobs import job_env
    from orchestrator.launch.ray_session import worker_env

    secret = tmp_path / "password"
    secret.write_text("hunter2\n")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter2")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD_FILE", str(secret))
    monkeypatch.setenv("API_TOKEN", "t0ken")
    monkeypatch.setenv("DATA_ROOT", "/data")
    env = job_env(["DATA_ROOT"])
    assert env["MLFLOW_TRACKING_PASSWORD_FILE"] == str(secret) and env["DATA_ROOT"] == "/data"
    assert "hunter2" not in str(env) and "hunter2" not in str(worker_env({"env": {}}, use_gpu=False))
    for name in ("API_TOKEN", "AWS_SECRET_ACCESS_KEY", "DB_PASSWORD", "SSH_KEY"):
        with pytest.raises(KeyError) as refused:
            job_env([name])
        assert f"--env {name}: looks like a secret" in refused.value.args[0]
    environ = {"MLFLOW_TRACKING_PASSWORD_FILE": str(secret)}
    load_secret_files(environ)  # what the job's driver and rank 0 do
    assert environ["MLFLOW_TRACKING_PASSWORD"] == "hunter2"


def test_inside_a_ray_job_its_temporary_working_dir_is_refused_for_runs_and_tracking(tmp_path):
    import json

    from orchestrator.launch.ray_job import check_durable_in_ray_job
    from orchestrator.plan import TrackingPlan

    job_dir = tmp_path / "session_2026-11-29_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_1"
    job_dir.mkdir(parents=True)
    environ = {"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"metadata": {"job_submission_id": "raysubmit_1"}})}
    durable = tmp_path / "durable"
    default = TrackingPlan(f"sqlite:///{job_dir / 'mlflow.db'}", "e", (job_dir / "mlartifacts").as_uri())
    server = TrackingPlan("http://mlflow:5000", "e", None)
    cases = [
        (str(job_dir / "orch_runs"), server, "trainer.storage_path"),
        (str(durable), default, "tracking.uri"),
        (str(durable), TrackingPlan(f"sqlite:///{durable / 'm.db'}", "e", (job_dir / "a").as_uri()), "tracking.artifact_location"),
    ]
    for storage, tracking, key in cases:
        with pytest.raises(ConfigError) as refused:
            check_durable_in_ray_job(storage, tracking, job_dir, environ)
        assert refused.value.key == key and "raysubmit_1" in str(refused.value) and "\n" not in str(refused.value)
    check_durable_in_ray_job(str(durable), server, job_dir, environ)  # durable: taken
    check_durable_in_ray_job(str(job_dir / "orch_runs"), default, job_dir, {})  # not a job: the user's own directory
    check_durable_in_ray_job(str(job_dir / "orch_runs"), default, durable, environ)  # a job run from a real directory


def test_orch_ui_turns_mlflows_job_execution_off_unless_the_user_set_it():
    from orchestrator.cli import mlflow_server_environment

    assert mlflow_server_environment({"PATH": "/bin"}) == {"PATH": "/bin", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    assert mlflow_server_environment({"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "true"})["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "true"
