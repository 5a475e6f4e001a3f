"""Fault injection and determinism probes reach the loop as callbacks from the run's config, never as branches of the
loop or variables forwarded to every production worker."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from orchestrator.launch.ray_session import FORWARDED_ENV
from orchestrator.train.callbacks import KillWorkerOnce, build_callbacks

REPO = Path(__file__).resolve().parents[2]

KILL = """
import sys
from orchestrator.train.callbacks import KillWorkerOnce
callback = KillWorkerOnce(step=3, rank=1, marker=sys.argv[1])
callback.on_fit_start(None, rank=int(sys.argv[2]), world_size=2)
for step in range(6):
    callback.on_step_start(step)
print("survived")
"""


def run_kill(marker: Path, rank: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", KILL, str(marker), str(rank)], capture_output=True, text=True, timeout=60)


def test_kill_worker_once_kills_its_rank_at_its_step_once(tmp_path):
    marker = tmp_path / "killed"
    assert run_kill(marker, rank=0).stdout.strip() == "survived" and not marker.exists()  # another rank
    killed = run_kill(marker, rank=1)
    assert killed.returncode == -9 and "survived" not in killed.stdout and marker.exists()
    assert run_kill(marker, rank=1).stdout.strip() == "survived"  # the restarted worker is not killed again


def test_callbacks_are_built_from_config():
    [callback] = build_callbacks([{"_target_": "orchestrator.train.callbacks.KillWorkerOnce", "step": 5, "rank": 0, "marker": "/tmp/m"}])
    assert isinstance(callback, KillWorkerOnce) and callback.step == 5


def test_the_loop_has_no_test_only_lines_and_workers_get_no_test_switches():
    loop = (REPO / "recipes" / "train.py").read_text()
    for test_only in ("chaos", "digest", "ORCH_CHAOS", "SIGKILL"):
        assert test_only not in loop
    assert not [name for name in FORWARDED_ENV if "CHAOS" in name]


def test_hold_at_marks_its_arrival_waits_for_the_file_and_marks_its_passing(tmp_path):
    import threading

    from orchestrator.train.callbacks import HoldAt

    go = tmp_path / "go"
    hold = HoldAt(step=2, until=str(go), rank=0, timeout_s=60)
    hold.on_fit_start(None, rank=0, world_size=1)
    hold.on_step_start(1)  # not its step
    assert not Path(f"{go}.reached").exists()
    holder = threading.Thread(target=hold.on_step_start, args=(2,))
    holder.start()
    deadline = time.monotonic() + 30  # however loaded the machine, the holder gets there
    while not Path(f"{go}.reached").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # a few of its 0.2 s polls: it must still be waiting
    assert holder.is_alive() and Path(f"{go}.reached").exists() and not Path(f"{go}.passed").exists()
    go.touch()
    holder.join(timeout=30)
    assert not holder.is_alive() and Path(f"{go}.passed").exists()
