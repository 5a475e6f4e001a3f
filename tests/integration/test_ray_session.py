"""A local Ray started in the background while the driver sets up (`ray_session(..., in_background=True)`), and
kept across the jobs of a multirun (`KeptLocalRay`).

Each case runs in its own Python process: the session fixture's Ray would otherwise be found and reused.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    import ray
    from orchestrator.launch.ray_session import KeptLocalRay, ray_session

    case = sys.argv[1]
    cluster = {"kind": "local", "num_cpus": -1 if case == "bad" else 1}
    kept = KeptLocalRay() if case == "kept" else None  # as `orch run -m` keeps one Ray for its jobs
    try:
        if kept is not None:
            kept.use(cluster)
        with ray_session(cluster, in_background=True) as session:
            print("entered", flush=True)
            session.wait()
            print("ready", ray.get_runtime_context().gcs_address, flush=True)
            # Ray must outlive the thread's own work: its GCS and raylet die with the thread that spawned them
            time.sleep(3)
            print("answer", ray.get(ray.remote(lambda: 41 + 1).remote(), timeout=60), flush=True)
            names = ("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")
            seen = ray.get(ray.remote(lambda: [os.environ.get(name) for name in names]).remote(), timeout=60)
            print("ray's processes have", *seen, "the driver has", *[os.environ.get(name) for name in names], flush=True)
            if case == "sigterm":
                time.sleep(120)  # stopped by the test
        if kept is not None:
            print("kept after the session:", ray.is_initialized(), flush=True)
            kept.use(dict(cluster))  # the next job, with the same settings
            with ray_session(cluster, in_background=True) as session:
                session.wait()
                print("next job on", ray.get_runtime_context().gcs_address, flush=True)
            kept.use({"kind": "ray", "address": "auto"})  # a job on a cluster: the kept local Ray is stopped
    except ValueError as error:
        print("start failed:", error, flush=True)
    finally:
        print("initialized after the session:", ray.is_initialized(), flush=True)
    """
)


def run_case(case: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SCRIPT, case], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def test_background_start_gives_a_working_ray_that_a_multirun_keeps_for_its_next_job_and_stops_after():
    """Ray's processes get orch's local settings (ray_session.LOCAL_INSTANCE_ENV) where the user set none, the
    user's own where they did, and the driver's environment stays as it was. Kept for a multirun (KeptLocalRay),
    the next job's session is the same Ray, started once; a job on a cluster stops it."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("RAY_TRAIN_")}
    process = run_case("kept", env={**env, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1.5"})
    out, _ = process.communicate(timeout=180)
    assert process.returncode == 0, out
    lines = out.splitlines()
    ready = next(i for i, line in enumerate(lines) if line.startswith("ready "))
    assert lines.index("entered") < ready, out
    assert "answer 42" in lines, out
    assert "ray's processes have 0 1.5 the driver has None 1.5" in lines, out
    assert "kept after the session: True" in lines, out
    assert f"next job on {lines[ready].split()[1]}" in lines, out
    assert "initialized after the session: False" in lines, out


def test_a_failed_start_is_raised_where_the_driver_waits_for_ray():
    process = run_case("bad")
    out, _ = process.communicate(timeout=180)
    assert process.returncode == 0, out
    assert "start failed:" in out and "ready" not in out, out
    assert "initialized after the session: False" in out, out


def test_sigterm_during_the_session_unwinds_the_driver():
    """A stopped job's driver gets SIGTERM: with Ray started off the main thread, orch installs the handler Ray
    would have, so the session (and the MLflow run around it) closes instead of the process dying on the spot."""
    process = run_case("sigterm")
    deadline = time.monotonic() + 180
    seen = []
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        seen.append(line)
        if line.startswith("answer") or not line:
            break
    assert any(line.startswith("answer 42") for line in seen), "".join(seen)
    process.send_signal(signal.SIGTERM)
    rest, _ = process.communicate(timeout=60)
    assert process.returncode == signal.SIGTERM, "".join(seen) + rest  # sys.exit(SIGTERM), not killed by the signal
    assert "initialized after the session: False" in rest, rest
