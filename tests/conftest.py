"""Shared fixtures. Integration tests share one private Ray instance per session (Ray start costs ~5-10 s)."""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
if "ORCH_CACHE_DIR" not in os.environ:
    # the digits split cache (orchestrator.data.digits): the session's own folder, never the user's; set before any
    # Ray starts, so every worker, node and `orch` subprocess of the session inherits it
    os.environ["ORCH_CACHE_DIR"] = tempfile.mkdtemp(prefix="orch-test-cache-")
    atexit.register(shutil.rmtree, os.environ["ORCH_CACHE_DIR"], ignore_errors=True)

# The longest modules, longest first (2-5 min each on 2 cores, as measured on 2026-11-30), then the other end-to-end
# ones, then the rest, in collection order. `python -m pytest -n 2` keeps each module on one worker (pyproject: --dist
# loadfile --no-loadscope-reorder, so that a module's shared fits and clusters are made once) and hands modules out in
# this order: the long ones start first, and the short ones fill in at the end, so that both workers finish close
# together.
LONGEST_FIRST = ("test_cluster_e2e", "test_zero3_e2e", "test_cli_e2e", "test_sweep_resume", "test_sweep_e2e",
                 "test_lm_e2e", "test_pipeline_e2e", "test_train_e2e", "test_sweep_pareto_e2e")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        if item.path.stem in LONGEST_FIRST:
            return LONGEST_FIRST.index(item.path.stem)
        return len(LONGEST_FIRST) + (0 if item.path.parent.name == "integration" else 1)

    items.sort(key=rank)  # stable: a module's tests keep their order


@pytest.fixture(scope="session")
def ray_instance() -> Iterator[None]:
    """A Ray of our own (address="local", own temp dir), never one another process started; shut down at the end."""
    import ray

    from orchestrator.environment import environment
    from orchestrator.launch.ray_session import findable_by_ray_helpers, free_port, local_instance_env, record_address

    temp_dir, port = tempfile.mkdtemp(prefix="orch-test-ray-", dir="/tmp"), free_port()
    with findable_by_ray_helpers(temp_dir):
        # the State API's address only while Ray starts (its processes keep it): the test process's own children
        # (`orch submit --address URL`) must not inherit it, since it overrides any address a job client is given
        with findable_by_ray_helpers(temp_dir, port), environment(local_instance_env()):  # as orch's own local Ray
            ray.init(
                address="local",
                num_cpus=2,
                include_dashboard=True,
                dashboard_host="127.0.0.1",
                dashboard_port=port,
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
def single_process_group() -> Iterator[None]:
    """A torch.distributed group of one (gloo), for DeepSpeed engines built in the test process itself; use with
    `pytest.mark.usefixtures("single_process_group")`. One for the whole session: DeepSpeed caches the groups it
    derives from the first one (deepspeed.utils.groups), so a group destroyed and created again breaks later engines."""
    import deepspeed
    import torch.distributed as dist

    from orchestrator.train.engine import skip_shm_allreduce_build

    created = not dist.is_initialized()
    with pytest.MonkeyPatch.context() as env:
        if created:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                                   LOCAL_RANK="0").items():
                env.setenv(key, value)
            skip_shm_allreduce_build()  # as orch's workers do: training never calls it
            deepspeed.init_distributed(dist_backend="gloo")
        yield
        if created and dist.is_initialized():
            dist.destroy_process_group()


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    """Where the runs of the session live: ./orch_runs checkpoints, ./mlflow.db, ./mlartifacts."""
    return tmp_path_factory.mktemp("orch-work")


@pytest.fixture(autouse=True)
def restore_torch_linear() -> Iterator[None]:
    """A ZeRO-3 engine built in the test process (`deepspeed.zero.Init`) replaces `torch.nn.functional.linear` for
    the rest of the process ("This will persist unless manually reset", DeepSpeed says). A training worker hosts one
    engine and keeps it; a test process hosts many, and torchao's quantized tensors cannot run DeepSpeed's version
    (`aten.t` on an Int8Tensor): put PyTorch's own back after each test."""
    import torch.nn.functional as F

    original = F.linear
    yield
    F.linear = original
