"""The one collective at log and checkpoint steps: earliest bad step and mean loss, over real gloo processes."""

from __future__ import annotations

import math
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from orchestrator.train.steps import StepAgreement

CASES = [
    # (bad step per rank, loss per rank or None) -> expected (earliest bad step, mean loss)
    ((None, None), (1.5, 2.5), (None, 2.0)),
    ((None, 17), (1.0, 3.0), (17, 2.0)),
    ((12, 9), (0.25, 0.75), (9, 0.5)),
    ((None, None), None, (None, None)),  # a checkpoint step that is not a log step: no loss
    ((2**40, None), (1.0, 1.0), (2**40, 1.0)),  # large step numbers stay exact
]


def _worker(rank: int, port: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        for bad, losses, _ in CASES:
            loss = None if losses is None else torch.tensor(losses[rank], dtype=torch.float64)
            agreement = StepAgreement(5, bad[rank], loss)
            other = torch.ones(1000)
            dist.all_reduce(other)  # the next step's gradient all-reduce, issued before the agreement is read
            assert float(other[0]) == 2.0
            results[(rank, len(results))] = agreement.result()
    finally:
        dist.destroy_process_group()


def test_agree_on_step_across_two_ranks():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(port, results), nprocs=2, join=True)
        got = dict(results)
    for rank in (0, 1):
        answers = [value for (r, _), value in sorted(got.items(), key=lambda item: item[0][1]) if r == rank]
        assert len(answers) == len(CASES)
        for (_, _, (bad, loss)), (got_bad, got_loss) in zip(CASES, answers):
            assert got_bad == bad
            assert (got_loss is None) if loss is None else math.isclose(got_loss, loss)
