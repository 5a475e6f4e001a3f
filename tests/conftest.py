"""Shared fixtures. Integration tests share one private Ray instance per session (Ray start costs ~5-10 s)."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session")
def ray_instance() -> Iterator[None]:
    """A Ray of our own (address="local", own temp dir), never one another process started; shut down at the end."""
    import ray

    from orchestrator.launch.ray_session import findable_by_ray_helpers, free_port, record_address

    temp_dir = tempfile.mkdtemp(prefix="orch-test-ray-", dir="/tmp")
    with findable_by_ray_helpers(temp_dir):
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=True,
            dashboard_port=free_port(),
            logging_level=logging.WARNING,
            _temp_dir=temp_dir,
        )
        record_address(temp_dir)
        try:
            yield
        finally:
            ray.shutdown()
            shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    """Where the runs of the session live: ./orch_runs checkpoints, ./mlflow.db, ./mlartifacts."""
    return tmp_path_factory.mktemp("orch-work")
