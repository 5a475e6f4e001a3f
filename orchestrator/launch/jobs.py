"""Ray Jobs: ship the user's working directory and the same `orch run` entry point to a cluster, then follow it.

The job's driver runs on the cluster (`python -m orchestrator.cli run ... cluster=ray`), so a laptop can close its
lid. Authentication uses Ray's own token mechanism (RAY_AUTH_TOKEN / ~/.ray/auth_token, read by Ray's SDK); the
command line never carries a token. Environment variables named by the user are passed through by name and their
values are never printed or logged. A job's runtime_env is readable by anyone who can list the cluster's jobs, so a
secret never travels in it: only its `<NAME>_FILE` path does (`orchestrator.config.secrets`).
"""

from __future__ import annotations

import asyncio
import os
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import Iterable, Optional, Sequence
from urllib.parse import urlparse

from orchestrator.config.secrets import SECRET_ENV, looks_secret
from orchestrator.launch.ray_job import local_path

# Always passed to the job when set here: where to track, who tracks, and where on the cluster the credentials lie
# (MLFLOW_TRACKING_PASSWORD_FILE: a path the job's driver and rank 0 read; never the password itself).
JOB_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_TRACKING_USERNAME",
    *(f"{name}_FILE" for name in SECRET_ENV),
)
# Never shipped with the working directory (gitignore patterns, as Ray's runtime_env "excludes" reads them):
# environments, local stores and run outputs; secrets (dotenv files, keys, .netrc), which would land in the cluster's
# package store readable by every job; sqlite journals, a half-written copy of a database that changes under upload.
UPLOAD_EXCLUDES = [
    ".venv", "venv", ".git", "orch_runs", "mlruns", "mlartifacts", "mlflow.db", "outputs", "multirun", "__pycache__",
    ".env", ".env.*", "*.pem", "*.key", "id_*", ".netrc", "*.db-journal", "*-wal", "*-shm",
]


def upload_excludes(working_dir: Path, storage_path: Optional[str], tracking_uri: Optional[str]) -> list[str]:
    """UPLOAD_EXCLUDES, plus the run storage and a local tracking store when they lie inside the working directory
    (`trainer.storage_path=./ckpts`, `tracking.uri=sqlite:///./runs.db`): checkpoints and databases are never
    uploaded as code."""
    excludes = list(UPLOAD_EXCLUDES)
    local = [local_path(uri) for uri in (storage_path, tracking_uri) if uri]
    root = working_dir.resolve()
    for path in filter(None, local):
        resolved = (root / Path(path).expanduser()).resolve()
        if resolved != root and resolved.is_relative_to(root):
            excludes.append("/" + resolved.relative_to(root).as_posix())  # anchored: that path only
    return excludes


class ClusterUnreachable(ConnectionError):
    pass


def resolve_address(address: Optional[str]) -> str:
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ClusterUnreachable(
            "no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS (the Ray dashboard's job API)"
        )
    return address if "://" in address else f"http://{address}"


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, not minutes, when nothing listens at the address (a stopped cluster, a typo)."""
    parsed = urlparse(address)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or (443 if parsed.scheme == "https" else 8265)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return
    except OSError as error:
        raise ClusterUnreachable(f"no Ray job server answers at {address} ({error.strerror or error}); is the cluster up?") from None


def client(address: Optional[str]):
    resolved = resolve_address(address)
    check_reachable(resolved)  # before importing Ray (seconds): a wrong address fails at once
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(resolved)
    except ConnectionError as error:
        raise ClusterUnreachable(f"could not reach the Ray job server at {resolved}: {error}") from None


def stop(address: Optional[str], job_id: str, pending_timeout_s: float = 300.0) -> bool:
    """Stop a job; True if it was still running. A job still PENDING is first waited for: Ray's stop_job on a
    pending job can report STOPPED while the entrypoint starts afterwards and trains on (ray-project/ray#58353;
    seen here: a job stopped right after submission wrote checkpoints for 10 more minutes)."""
    jobs = client(address)
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + pending_timeout_s
    while jobs.get_job_status(job_id) == JobStatus.PENDING:
        if time.monotonic() > deadline:
            raise RuntimeError(f"job {job_id} is still PENDING after {pending_timeout_s:.0f} s; try `orch stop` again later")
        time.sleep(1.0)
    return jobs.stop_job(job_id)


def job_env(names: Iterable[str]) -> dict[str, str]:
    """The job's environment variables: JOB_ENV and those named by `--env`, which must not look like secrets."""
    env = {name: os.environ[name] for name in JOB_ENV if name in os.environ}
    for name in names:
        if looks_secret(name):
            raise KeyError(
                f"--env {name}: looks like a secret, and a job's environment is readable by anyone who can list the "
                f"cluster's jobs; put it on the cluster instead (a mounted secret file passed as --env {name}_FILE, or "
                "the nodes' own environment: README, Security)"
            )
        if name not in os.environ:
            raise KeyError(f"--env {name}: not set in this environment")
        env[name] = os.environ[name]
    return env


def entrypoint(overrides: Sequence[str], command: str = "run", verbose: bool = False) -> str:
    """`verbose`: the job's `orch run -v`, so the libraries' output goes to the job's logs (`orch logs`) live rather
    than only to the run's log file on the cluster."""
    # the cluster's own python: the image has orchestrator installed; the shipped directory is the job's cwd
    flags = ["-v"] if verbose else []
    return shlex.join(["python", "-m", "orchestrator.cli", command, *flags, "cluster=ray", *overrides])


def submit(
    address: Optional[str], overrides: Sequence[str], env_names: Sequence[str], working_dir: Path, command: str = "run",
    excludes: Sequence[str] = tuple(UPLOAD_EXCLUDES), verbose: bool = False,
) -> str:
    """`excludes`: what not to upload (`upload_excludes`); `verbose`: see `entrypoint`."""
    env = job_env(env_names)
    job_client = client(address)
    return job_client.submit_job(
        entrypoint=entrypoint(overrides, command, verbose),
        runtime_env={"working_dir": str(working_dir), "excludes": list(excludes), "env_vars": env},
        metadata={"orch.overrides": " ".join(overrides)},
    )


def follow_logs(address: Optional[str], job_id: str) -> None:
    job_client = client(address)

    async def tail() -> None:
        async for chunk in job_client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    asyncio.run(tail())
