"""Preemption: a worker told to stop (SIGTERM, as a spot node's processes are) saves the step it is at, then stops.

Ray 2.60's own preemption hook, `ray.train.get_preemption_info()`, is fed by Ray Core's node drain (the notice an
autoscaler or KubeRay gives through GCS DrainNode), not by signals: a SIGTERM sent to a worker process never reaches
it, and the handler Ray sets in every worker process exits at once ("The process receives a SIGTERM"), losing every
step since the last checkpoint. So each worker replaces that handler with one that only raises a flag; at each step
boundary the ranks combine their flags (an all-reduce, MAX), so that all of them save the same step through the
normal checkpoint path and stop there. The loop then raises `Preempted`: Ray Train restarts the group from that
checkpoint (trainer.max_failures) or the run ends, to be continued with `resume=NAME`; either way no step is lost.

Python sets signal handlers only on a process's main thread. A Ray Train worker runs the training function on a
thread of its own while the actor's main thread serves calls, so the handler is installed through one: the worker
actor's `execute(fn)`, the method Ray Train's controller itself uses to run set-up functions on each worker.
"""

from __future__ import annotations

import signal
import threading
from typing import Optional

import torch
import torch.distributed as dist

from orchestrator.train.collectives import collective_device

STOP_REQUESTED = threading.Event()  # set by the SIGTERM handler, read by the training thread of the same process


class Preempted(RuntimeError):
    """Raised on every rank after the checkpoint of the step at which a worker was told to stop."""

    def __init__(self, step: int) -> None:
        self.step = step
        super().__init__(f"a worker was told to stop (SIGTERM); every rank saved a checkpoint at step {step} and stopped")


def _flag_on_sigterm(signum: int, frame: object) -> None:
    STOP_REQUESTED.set()


def _install_on_main_thread() -> None:
    STOP_REQUESTED.clear()
    signal.signal(signal.SIGTERM, _flag_on_sigterm)


def install_sigterm_flag() -> None:
    """From the training thread of a Ray Train worker: SIGTERM now only raises the flag (see the module's doc)."""
    import ray

    actor = ray.get_runtime_context().current_actor
    ray.get(actor.execute.remote(_install_on_main_thread))


class StopAgreement:
    """Whether any rank was told to stop, agreed by all ranks at the same step.

    The flag's all-reduce is started at one step boundary and read at the next, so it runs during that step's
    compute instead of adding a synchronous collective to every step (a small gloo all-reduce waits 0.3-1.7 ms on 2
    busy cores, `orchestrator.train.steps.Agreements`); a signal therefore stops training one step after the step
    it arrived in. Collective: every rank must call `agreed` once per step.
    """

    def __init__(self) -> None:
        self.flag = torch.zeros(1, dtype=torch.int32, device=collective_device())
        self.work: Optional[dist.Work] = None

    def agreed(self) -> bool:
        stop = False
        if self.work is not None:
            self.work.wait()
            stop = bool(self.flag.item())
        self.work = None
        if not stop:
            self.flag = torch.tensor([1 if STOP_REQUESTED.is_set() else 0], dtype=torch.int32, device=collective_device())
            self.work = dist.all_reduce(self.flag, op=dist.ReduceOp.MAX, async_op=True)
        return stop

    def close(self) -> None:
        """Collective, once at the end of the loop: waits for the all-reduce in flight, then for every rank. A rank
        that raises `Preempted` ends the worker group, killing the others where they are: rank 0 killed while it
        closes its MLflow store left that store's database half-migrated, so all ranks finish their cleanup first."""
        if self.work is not None:
            self.work.wait()
            self.work = None
        dist.barrier()
