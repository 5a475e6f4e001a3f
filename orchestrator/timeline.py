"""Opt-in timing marks for the performance benchmarks: where start-up time goes, and every step's duration.

Off unless the environment names a file in ORCH_TIMELINE (the driver forwards it to the workers). Then the driver
and rank 0 append JSON lines `{"event": ..., "t": <unix time>, ...}` to it: Ray ready, worker start, DeepSpeed
engine ready, first step, checkpoint phases, and at the end every step's duration, wall and CPU (the process's CPU
time, all threads: on a shared machine it is far less disturbed by other jobs than wall time). Step durations are
kept in memory and written once at the end, so the per-step cost of measuring is two clock reads. The benchmarks
(benchmarks/) read the file; nothing in a normal run does.
"""

from __future__ import annotations

import json
import os
import resource
import time
from typing import Any, Optional

ENV = "ORCH_TIMELINE"


def enabled() -> bool:
    return bool(os.environ.get(ENV))


def mark(event: str, **fields: Any) -> None:
    path = os.environ.get(ENV)
    if not path:
        return
    line = json.dumps({"event": event, "t": time.time(), "pid": os.getpid(), **fields})
    with open(path, "a") as handle:  # one short append per event: lines from several processes do not interleave
        handle.write(line + "\n")


def peak_rss_bytes() -> int:
    """This process's peak resident set size (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class StepClock:
    """Duration of every optimizer step on one rank, measured end to end (data, forward, backward, step, and the
    logging/checkpointing done after the previous step), so that the same definition holds in every baseline."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.on = enabled()
        self.stamps: list[float] = []
        self.cpu_stamps: list[float] = []
        self.first_step: Optional[int] = None

    def tick(self, step: int) -> None:
        if not self.on:
            return
        self.stamps.append(time.perf_counter())
        self.cpu_stamps.append(time.process_time())
        if self.first_step is None:
            self.first_step = step
            if self.rank == 0:
                mark("first_step", step=step)

    def close(self) -> None:
        """Rank 0 writes the step durations; every rank writes its peak RSS (memory per worker)."""
        if not self.on:
            return
        mark("peak_rss", rank=self.rank, bytes=peak_rss_bytes())
        if self.rank == 0 and len(self.stamps) > 1:
            mark("step_times", first_step=(self.first_step or 0) + 1, durations=differences(self.stamps), cpu_durations=differences(self.cpu_stamps))


def differences(stamps: list[float]) -> list[float]:
    return [b - a for a, b in zip(stamps, stamps[1:])]
