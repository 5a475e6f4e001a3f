"""Loop callbacks: code your config adds to the training loop without a line of it in the loop itself.

`trainer.callbacks` lists `_target_` dicts; every worker builds them (`build_callbacks`) and the loop calls them at
three points: once before the first step, before every step, and when a checkpoint is about to be reported (where a
callback may add entries to the report). Compression hooks, which change what is trained and are checkpointed, are
`orchestrator.compress.StepEndHook`s instead.

The two shipped here are what resilience and determinism tests need, and what a user checking a cluster's failure
handling needs too:
    trainer.callbacks='[{_target_: orchestrator.train.callbacks.KillWorkerOnce, step: 37, rank: 1, marker: /tmp/killed}]'
    trainer.callbacks='[{_target_: orchestrator.train.callbacks.WeightDigests}]'
`HoldAt` pauses one rank at a step until a file appears, so that something can happen to the world (a tracking
server stops, a node goes) at a known point of training; `ReportPid` writes one worker's PID to a file, so that
something outside can signal it (a preemption drill).
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence


class LoopCallback(Protocol):
    def on_fit_start(self, engine: Any, rank: int, world_size: int) -> None: ...

    def on_step_start(self, step: int) -> None:
        """`step`: optimizer steps done so far (the one about to run is step + 1)."""

    def on_checkpoint(self, step: int, last: bool, report: dict[str, Any]) -> None:
        """Collective: every rank calls it at the same steps, before the checkpoint and `report` go to Ray Train."""


def build_callbacks(specs: Sequence[Mapping[str, Any]]) -> list[LoopCallback]:
    from hydra.utils import instantiate

    return [instantiate(dict(spec)) for spec in specs]


class KillWorkerOnce:
    """SIGKILL one worker once, before a given step: a real process death for Ray Train to recover from. `marker`
    is a file that records the kill, so that the restarted worker group does not kill itself again."""

    def __init__(self, step: int, rank: int, marker: str) -> None:
        self.step, self.rank, self.marker = step, rank, Path(marker)
        self.my_rank = -1

    def on_fit_start(self, engine: Any, rank: int, world_size: int) -> None:
        self.my_rank = rank

    def on_step_start(self, step: int) -> None:
        if step == self.step and self.my_rank == self.rank and not self.marker.exists():
            self.marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)

    def on_checkpoint(self, step: int, last: bool, report: dict[str, Any]) -> None:
        pass


class HoldAt:
    """Before `step`, rank `rank` touches `<until>.reached`, waits (at most `timeout_s`) until `until` exists, then
    touches `<until>.passed`: a test that lets one run through and must hold the next one (a sweep's next trial)
    removes `until` once it sees `.passed`, before that next run can arrive."""

    def __init__(self, step: int, until: str, rank: int = 0, timeout_s: float = 600.0) -> None:
        self.step, self.until, self.rank, self.timeout_s = step, Path(until), rank, timeout_s
        self.my_rank = -1

    def on_fit_start(self, engine: Any, rank: int, world_size: int) -> None:
        self.my_rank = rank

    def on_step_start(self, step: int) -> None:
        if step != self.step or self.my_rank != self.rank:
            return
        Path(f"{self.until}.reached").touch()
        deadline = time.monotonic() + self.timeout_s
        while not self.until.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        Path(f"{self.until}.passed").touch()

    def on_checkpoint(self, step: int, last: bool, report: dict[str, Any]) -> None:
        pass


class ReportPid:
    """Write one worker's PID to `path` before a given step, once: what a test or a drill needs to signal that
    worker from outside, as a spot node's reclaim does (`kill -TERM <pid>`: see orchestrator.train.preemption)."""

    def __init__(self, step: int, rank: int, path: str) -> None:
        self.step, self.rank, self.path = step, rank, Path(path)
        self.my_rank = -1

    def on_fit_start(self, engine: Any, rank: int, world_size: int) -> None:
        self.my_rank = rank

    def on_step_start(self, step: int) -> None:
        if step == self.step and self.my_rank == self.rank and not self.path.exists():
            partial = self.path.with_suffix(".partial")
            partial.write_text(str(os.getpid()))
            partial.rename(self.path)  # whole or absent: the reader never sees a half-written PID

    def on_checkpoint(self, step: int, last: bool, report: dict[str, Any]) -> None:
        pass


class WeightDigests:
    """At the last checkpoint, a hash of every rank's full weights in the report (`rank_weight_digests`, comma
    separated): data parallelism must leave them identical, and a resumed run must end where an uninterrupted one does."""

    def __init__(self) -> None:
        self.engine: Any = None
        self.world_size = 1

    def on_fit_start(self, engine: Any, rank: int, world_size: int) -> None:
        self.engine, self.world_size = engine, world_size

    def on_step_start(self, step: int) -> None:
        pass

    def on_checkpoint(self, step: int, last: bool, report: dict[str, Any]) -> None:
        if not last:
            return
        import torch.distributed as dist

        digests: list[Any] = [None] * self.world_size
        dist.all_gather_object(digests, weights_digest(self.engine))
        report["rank_weight_digests"] = ",".join(d or "" for d in digests)


def weights_digest(engine: Any) -> str:
    """A hash of this rank's full weights; ZeRO-3 gathers partitioned parameters first."""
    import deepspeed

    params = list(engine.module.parameters())
    digest = hashlib.sha256()
    with deepspeed.zero.GatheredParameters(params, enabled=getattr(params[0], "ds_id", None) is not None):
        for param in params:
            digest.update(param.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()
