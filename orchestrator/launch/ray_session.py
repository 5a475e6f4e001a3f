"""Where a run's Ray comes from: a private local instance, or an existing cluster.

A local run starts its own Ray (`address="local"`, its own temp dir and dashboard port) and stops exactly that
instance afterwards, so it never attaches to, or tears down, a Ray that someone else on the machine started.

Starting a local Ray takes ~6-7 s of wall time (GCS, raylet, dashboard, prestarted workers) during which the driver
itself is idle (~0.5 s of its CPU). `ray_session(..., in_background=True)` starts it in a thread so that the driver's
own set-up (importing torch, MLflow and Ray Train, creating the MLflow run) overlaps it; whatever needs Ray first
calls the session's `wait()`. Launch to fit start went from ~15.8 to ~11 s (benchmarks/startup.py, 2 cores).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterator, Mapping, Optional

from orchestrator import timeline
from orchestrator.environment import environment
from orchestrator.config.secrets import SECRET_ENV

# Variables a worker needs to reach MLflow and find compiled ops; read from the driver's environment. Credentials go
# by reference (`<NAME>_FILE`), read by rank 0 itself: a runtime_env is visible in Ray's state to anyone who can list
# actors. (The workers of a private local Ray inherit the driver's own environment, credentials included.)
FORWARDED_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    *(f"{name}_FILE" for name in SECRET_ENV),
    "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_ALLOW_FILE_STORE",
    "TORCH_EXTENSIONS_DIR",
    "ORCH_TIMELINE",
)

MALLOC_MMAP_THRESHOLD = 128 * 1024  # glibc's initial M_MMAP_THRESHOLD, kept from growing


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker_env(cluster: Mapping[str, Any], use_gpu: bool, zero_stage: int = 0) -> dict[str, str]:
    env = {key: os.environ[key] for key in FORWARDED_ENV if key in os.environ}
    # CPU workers skip DeepSpeed's accelerator probe (and its warning); GPU workers must not inherit a driver's
    # DS_ACCELERATOR=cpu (set for its own CPU-side DeepSpeed use): a CPU accelerator on an NCCL group fails
    env["DS_ACCELERATOR"] = "cuda" if use_gpu else "cpu"
    if not use_gpu and zero_stage == 3:
        # glibc raises its mmap threshold (up to 32 MiB) each time a large block is freed, after which freed tensors
        # stay in the heap: a ZeRO-3 worker's peak grew by ~1 GB over 3 steps that way (85 M parameters, 2 ranks),
        # as it gathers and frees every layer's parameters. Fixed at its initial 128 KiB, large tensors go back to
        # the OS when freed. Only for ZeRO-3, which is chosen to save memory: every allocation above 128 KiB then
        # maps fresh pages, which made a small GPT's CPU step 1.6x slower (cluster.env can override it)
        env["MALLOC_MMAP_THRESHOLD_"] = str(MALLOC_MMAP_THRESHOLD)
    env.update({str(k): str(v) for k, v in (cluster.get("env") or {}).items()})
    return env


# What every process of a private local Ray inherits besides `findable_by_ray_helpers`, unless the user's own
# environment sets the variable (Ray's documented switches; `local_instance_env`). On a cluster (cluster=ray, submit)
# Ray's defaults stay: the cluster's operator sets them there.
# - Nothing drains the node of a Ray that one run started on its own machine, so Ray Train's preemption watcher (an
#   actor per fit, polling the node's drain state every 5 s; ~3 CPU-s to start on 2 cores, a sixteenth of a 20-step
#   fit's CPU) would watch for nothing. A local run's stop (SIGTERM, Ctrl-C) is orch's own
#   (orchestrator.train.preemption).
# - Ray Train's controller polls its workers every 2 s (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S), and a fit ends only when
#   a poll sees its workers done: measured on 2 cores, 4.1 s from the workers' last line to `fit()` returning at
#   2 s, 1.0 s at 0.5 s (a 20-step fit: 18.8 s -> 16.2 s, the same CPU). A poll is one small actor call per worker,
#   and a poll not answered in time is only counted as missed (a worker fails after 10 min of them), so a busy
#   worker is never taken for a dead one.
LOCAL_INSTANCE_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def local_instance_env() -> dict[str, str]:
    """LOCAL_INSTANCE_ENV, where the user's environment does not already set the variable: theirs wins."""
    return {name: os.environ.get(name, value) for name, value in LOCAL_INSTANCE_ENV.items()}


@contextmanager
def findable_by_ray_helpers(temp_dir: str, dashboard_port: Optional[int] = None) -> Iterator[None]:
    """Make a private local Ray the one its own helper processes find, with other Ray instances on the machine.

    Some of Ray's helpers locate "the" cluster by auto-detection: Train V2's placement-group cleaner (which frees a
    run's CPUs when its controller dies abruptly, e.g. a sweep trial that Tune stops) asks the State API, whose
    client, given no address, scans the machine for GCS processes. With several Ray instances that scan warns
    ("Found multiple active Ray instances") and picks the newest one, which need not be this run's. Every process of
    the instance inherits the environment of the process that starts it, so two variables set around
    `ray.init(address="local", _temp_dir=temp_dir, dashboard_port=dashboard_port)` settle it for all of them:
    RAY_API_SERVER_ADDRESS (this instance's dashboard, the State API's address: no scan at all) and RAY_TMPDIR
    (Ray reads the cluster's address from RAY_TMPDIR/ray/ray_current_cluster; call `record_address(temp_dir)` after).
    Both are restored on exit.
    """
    settings = {"RAY_TMPDIR": temp_dir}
    if dashboard_port is not None:
        settings["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard_port}"
    with environment(settings):
        yield


def record_address(temp_dir: str) -> None:
    import ray

    folder = os.path.join(temp_dir, "ray")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "ray_current_cluster"), "w") as handle:
        handle.write(ray.get_runtime_context().gcs_address)


class _Start:
    """`start` on a thread that then stays alive until `release`: Ray starts its GCS and raylet with
    PR_SET_PDEATHSIG, which fires when the *thread* that spawned them ends, so that thread must outlive the
    session. An error of `start` is raised by whoever waits for it."""

    def __init__(self, start: Callable[[], None]) -> None:
        self.error: Optional[BaseException] = None
        self._start = start
        self._ready = threading.Event()
        self._released = threading.Event()
        self.thread = threading.Thread(target=self._run, name="orch-ray-start", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self._start()
        except BaseException as error:  # noqa: BLE001 - handed to the waiting thread
            self.error = error
        finally:
            self._ready.set()
        self._released.wait()

    def wait(self, raise_error: bool = True) -> None:
        self._ready.wait()
        if raise_error and self.error is not None:
            error, self.error = self.error, None
            raise error

    def release(self) -> None:
        self._released.set()
        self.thread.join()


def _unwind(signum: int, frame: Any) -> None:
    sys.exit(signum)


class RaySession:
    """The Ray a block runs on. `wait()` blocks until a Ray started in the background is up (and raises its start-up
    error); it returns at once when Ray was already up when the block was entered."""

    def __init__(self, starting: Optional[_Start] = None) -> None:
        self._starting = starting

    def wait(self) -> None:
        if self._starting is not None:
            starting, self._starting = self._starting, None
            starting.wait()
            if threading.current_thread() is threading.main_thread():
                # Ray's core worker, started on the thread, installed its own fatal-signal handler for SIGTERM
                # over ours (it prints a stack and aborts the process: exit -6, the session never unwound on a
                # loaded machine); ray.init on the main thread puts its Python handler back after that, so do we
                signal.signal(signal.SIGTERM, _unwind)


def _init_local(cluster: Mapping[str, Any], temp_dir: str, dashboard_port: int) -> None:
    """The State API's address (and `local_instance_env()`) only while Ray starts: its processes (raylet, GCS, and the
    workers the raylet spawns) keep it, and the driver's own environment goes back as it was (a driver that kept it
    exited on SIGTERM with SIGABRT instead of unwinding: tests/integration/test_ray_session.py)."""
    import ray

    with findable_by_ray_helpers(temp_dir, dashboard_port), environment(local_instance_env()):
        ray.init(
            address="local",
            num_cpus=cluster.get("num_cpus"),
            num_gpus=cluster.get("num_gpus"),
            include_dashboard=True,
            dashboard_host="127.0.0.1",  # the State API address findable_by_ray_helpers gives Ray's helpers
            dashboard_port=dashboard_port,
            logging_level=logging.WARNING,
            _temp_dir=temp_dir,
        )
    record_address(temp_dir)
    timeline.mark("ray_ready")


class _SkipThreadWarning(logging.Filter):
    """ray.init on a thread warns that it cannot install its SIGTERM handler; `ray_session` installs the same one."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "SIGTERM handler is not set" not in record.getMessage()


@contextmanager
def ray_session(cluster: Mapping[str, Any], in_background: bool = False) -> Iterator[RaySession]:
    """Ray for the duration of the block. `in_background`: a local Ray is started on a thread and the block is
    entered at once; call the session's `wait()` before the first use of Ray."""
    import ray

    if _kept is not None:
        # this process keeps a local Ray across runs (KeptLocalRay: a multirun's jobs), up or still starting
        yield _kept
        return
    if ray.is_initialized():
        # The caller owns a Ray already (a notebook, a test session, a Tune trial): use it, leave it running.
        yield RaySession()
        return
    if cluster["kind"] == "local":
        # Short path: Ray's Unix sockets live under the temp dir and socket paths are limited to ~107 bytes.
        temp_dir = tempfile.mkdtemp(prefix="orch-ray-", dir="/tmp")
        port = free_port()
        starting: Optional[_Start] = None
        try:
            with findable_by_ray_helpers(temp_dir):
                if in_background and threading.current_thread() is threading.main_thread():
                    # what ray.init installs when called on the main thread: SIGTERM (a stopped job) unwinds the
                    # driver, so its MLflow run is closed and Ray shut down
                    previous_sigterm = signal.signal(signal.SIGTERM, _unwind)
                    thread_warning = _SkipThreadWarning()
                    logging.getLogger("ray._private.worker").addFilter(thread_warning)
                    starting = _Start(lambda: _init_local(cluster, temp_dir, port))
                else:
                    _init_local(cluster, temp_dir, port)
                yield RaySession(starting)
        finally:
            if starting is not None:
                starting.wait(raise_error=False)  # never shut Ray down halfway through its start
            ray.shutdown()
            if starting is not None:
                starting.release()
                logging.getLogger("ray._private.worker").removeFilter(thread_warning)
                signal.signal(signal.SIGTERM, previous_sigterm)
            shutil.rmtree(temp_dir, ignore_errors=True)
    else:
        address: Optional[str] = cluster.get("address") or os.environ.get("RAY_ADDRESS")
        if not address:
            from orchestrator.config.validate import ConfigError

            raise ConfigError("cluster.address", None, "cluster=ray needs an address (or RAY_ADDRESS), e.g. 'auto' or 'HOST:6379'")
        check_gcs_reachable(address)
        ray.init(address=address, logging_level=logging.WARNING)
        try:
            yield RaySession()
        finally:
            ray.shutdown()


_kept: Optional[RaySession] = None  # the session of the one KeptLocalRay of this process, while it holds a Ray


class KeptLocalRay:
    """One private local Ray for the runs one process makes in a row (`orch run -m`: Hydra's basic launcher runs the
    jobs one after another): each run's `ray_session` is handed this Ray, up or still starting, instead of starting
    and stopping its own. Only the first job pays Ray's start (~7 CPU-s and 5-7 s on 2 cores) and Ray Train's
    one-time set-up in a new Ray (its detached autoscaling coordinator actor, which the first fit waits up to 5 s
    for). A job with other `cluster` settings gets a fresh Ray; `close()` stops the one kept."""

    def __init__(self) -> None:
        self._stack: Optional[ExitStack] = None
        self._cluster: Optional[dict[str, Any]] = None

    def use(self, cluster: Mapping[str, Any]) -> None:
        """Keep a Ray for `cluster` from now on (started in the background, as a single run's is)."""
        global _kept
        if cluster["kind"] != "local":
            self.close()
            return
        wanted = dict(cluster)
        if self._stack is not None and wanted == self._cluster:
            return
        self.close()
        stack = ExitStack()
        _kept = stack.enter_context(ray_session(cluster, in_background=True))
        self._stack, self._cluster = stack, wanted

    def close(self) -> None:
        global _kept
        if self._stack is not None:
            stack, self._stack, self._cluster, _kept = self._stack, None, None, None
            stack.close()


def check_gcs_reachable(address: str, timeout_s: float = 5.0) -> None:
    """An unreachable or stopped cluster fails in seconds with the key to fix, not after Ray's long retries."""
    from orchestrator.config.validate import ConfigError

    target = address.split("://", 1)[-1]
    if address in ("auto", "local") or ":" not in target:
        return
    host, _, port = target.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return
    except (OSError, ValueError) as error:
        raise ConfigError("cluster.address", address, f"no Ray cluster answers there ({error}); is it up?") from None


def cluster_capacity() -> tuple[float, float]:
    import ray

    resources = ray.cluster_resources()
    return float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
