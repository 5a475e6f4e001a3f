"""`orch run` as the entrypoint of a Ray job (`ray job submit --working-dir . -- orch run ...`, or `orch submit`).

Ray unpacks a job's working directory into its session folder (`<temp dir>/session_*/runtime_resources/
working_dir_files/...`) and deletes it when the job ends and the package is garbage-collected. orch's defaults put
the local tracking store (`./mlflow.db`, `./mlartifacts`) and the checkpoints (`./orch_runs`) in the working
directory, so inside a job they would be written into that temporary copy and lost without a word. orch refuses
them there, before Ray starts, naming the key to set to a durable location (no silent redirect: where a run's data
lives is the user's choice, and a redirect would hide it in a place nobody looks).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Optional

from orchestrator.plan import TrackingPlan

JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for the entrypoint process
RUNTIME_RESOURCES = "runtime_resources"  # ray_constants.DEFAULT_RUNTIME_ENV_DIR_NAME, under session_*/


def ray_job_id(environ: Mapping[str, str] = os.environ) -> Optional[str]:
    """The submission id of the Ray job this process is the entrypoint of (None outside a job)."""
    raw = environ.get(JOB_CONFIG_ENV)
    if not raw:
        return None
    try:
        metadata = json.loads(raw).get("metadata") or {}
    except (ValueError, AttributeError):
        return None
    return str(metadata.get("job_submission_id") or "") or None


def in_ray_session(path: Path) -> bool:
    """Whether `path` lies in a Ray session's runtime resources (a job's unpacked working directory)."""
    parts = path.resolve().parts
    return RUNTIME_RESOURCES in parts and any(part.startswith("session_") for part in parts)


def local_path(uri: Optional[str]) -> Optional[str]:
    """The file path a storage path or tracking URI names on this machine (None for a server or remote store)."""
    if not uri:
        return None
    for prefix in ("sqlite:///", "file://", "file:"):
        if uri.startswith(prefix):
            return uri[len(prefix):]
    return None if "://" in uri else uri


def check_durable_in_ray_job(storage_path: str, tracking: TrackingPlan, cwd: Optional[Path] = None,
                             environ: Mapping[str, str] = os.environ) -> None:
    """Inside a Ray job whose working directory is Ray's temporary copy, refuse a storage path, tracking store or
    artifact location in that copy: one ConfigError naming the key."""
    from orchestrator.config.validate import ConfigError

    job, cwd = ray_job_id(environ), cwd or Path.cwd()
    if job is None or not in_ray_session(cwd):
        return
    checks = (
        ("tracking.uri", tracking.uri, "tracking data", "tracking.uri=http://mlflow:5000 or sqlite:////durable/mlflow.db"),
        ("tracking.artifact_location", tracking.artifact_location, "artifacts", "tracking.artifact_location=/durable/mlartifacts"),
        ("trainer.storage_path", storage_path, "checkpoints", "trainer.storage_path=/mnt/shared/orch_runs or s3://bucket/orch_runs"),
    )
    for key, location, what, example in checks:
        path = local_path(location)
        if path is not None and in_ray_session(cwd / Path(path).expanduser()):
            raise ConfigError(
                key, location, f"inside Ray job {job} this is in the job's working directory, a temporary copy that Ray "
                f"deletes, so the run's {what} would be lost; set a durable location, e.g. {example}",
            )
