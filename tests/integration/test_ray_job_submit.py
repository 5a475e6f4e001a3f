"""`ray job submit` (Ray's own CLI) against a Ray instance that is not orch's: with orch's default local tracking,
the job's driver refuses in one line naming `tracking.uri`, because the store would be written into the job's
temporary copy of the working directory, which Ray deletes.

The instance is `ray start --head --block` with its own temp dir, ports and token, stopped by killing its process
group, never with `ray stop`.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from orchestrator.launch.ray_session import free_port

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).with_name("ray"))


def _wait_http(url: str, timeout_s: float = 300) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:  # answered (401 without a token): the server is up
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(url)


@pytest.fixture(scope="module")
def stranger():
    """Someone else's Ray: a head node with a job server, 1 CPU. Yields (jobs URL, env of its clients, process)."""
    temp_dir = Path(f"/tmp/orch-st-{os.getpid()}")  # short: Ray's socket paths live under it
    dashboard_port = free_port()
    # none of the variables a private Ray of this test session sets (tests/conftest.py) reach the other instance
    inherited = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TMPDIR", "RAY_GCS_SERVER_PORT")}
    env = {
        **inherited,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    ports = [f"--{name}={free_port()}" for name in ("port", "node-manager-port", "object-manager-port",
                                                    "metrics-export-port", "dashboard-agent-listen-port",
                                                    "dashboard-agent-grpc-port", "runtime-env-agent-port")]
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--num-cpus=1", f"--temp-dir={temp_dir}", "--include-dashboard=true",
         f"--dashboard-port={dashboard_port}", "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1",
         "--object-store-memory=150000000", *ports],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    jobs_url = f"http://127.0.0.1:{dashboard_port}"
    try:
        _wait_http(f"{jobs_url}/api/version")
        yield jobs_url, env, head
    finally:
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops the processes it started
            try:
                head.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(head.pid, signal.SIGKILL)
                head.wait()
        subprocess.run(["rm", "-rf", str(temp_dir)], check=False)


def test_a_ray_job_with_local_tracking_is_refused_naming_tracking_uri(stranger, tmp_path):
    jobs_url, env, _ = stranger
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("the job's working directory\n")
    for _attempt in range(6):
        _wait_http(f"{jobs_url}/api/version")
        out = subprocess.run(
            [RAY, "job", "submit", "--address", jobs_url, "--working-dir", str(project), "--",
             sys.executable, "-m", "orchestrator.cli", "run", "cluster=ray", "cluster.address=auto", "trainer.num_workers=1"],
            env=env, capture_output=True, text=True, timeout=600, check=False,
        )
        # a head still starting on a busy machine drops the upload or has no job agent yet: submit again, as Ray's
        # own message says to
        if not any(busy in out.stdout + out.stderr for busy in ("Connection aborted", "please try again later",
                                                                 "Failed to connect to Ray")):
            break
        time.sleep(10)
    assert out.returncode != 0, out.stdout[-3000:]
    # Ray's CLI shows the job's output twice (the tail, then the status message): one distinct line
    errors = sorted({line for line in out.stdout.splitlines() if line.startswith("orch: error:")})
    assert len(errors) == 1, out.stdout[-3000:] + out.stderr[-2000:]
    assert errors[0].startswith("orch: error: tracking.uri='sqlite:///") and "inside Ray job raysubmit_" in errors[0]
    assert sorted(p.name for p in project.iterdir()) == ["notes.txt"]
