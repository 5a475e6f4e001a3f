"""The collective behind divergence stops and logged losses, over real gloo processes: what one agreement carries,
and that the batched cadence is the same on every rank although their step times differ."""

from __future__ import annotations

import math
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from orchestrator.train.steps import Agreements, StepAgreement

CASES = [
    # (bad step per rank, [(log step, loss per rank)], proposal per rank) -> (earliest bad step, {step: mean}, next)
    ((None, None), [(10, (1.5, 2.5))], (30, 0), (None, {10: 2.0}, 30)),
    ((None, 17), [(10, (1.0, 3.0)), (20, (2.0, 4.0))], (25, 99), (17, {10: 2.0, 20: 3.0}, 25)),  # rank 0 proposes
    ((12, 9), [], (13, 13), (9, {}, 13)),  # a checkpoint step that logged nothing since the last agreement
    ((2**40, None), [(2**40, (1.0, 1.0))], (2**40 + 1, 0), (2**40, {2**40: 1.0}, 2**40 + 1)),  # exact large steps
]
STEPS, EVERY_S = 60, 0.25  # an agreement every ~EVERY_S of rank 0's time: far fewer than steps, even under load
STEP_SLEEP = (0.005, 0.02)  # per rank: rank 1 is slower, yet only rank 0's timing sets the cadence


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _agreement_worker(rank: int, port: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        for index, (bad, losses, proposals, _) in enumerate(CASES):
            rank_losses = [(step, torch.tensor(values[rank], dtype=torch.float64)) for step, values in losses]
            agreement = StepAgreement(rank_losses, bad[rank], proposals[rank])
            other = torch.ones(1000)
            dist.all_reduce(other)  # the next step's gradient all-reduce, issued before the agreement is read
            assert float(other[0]) == 2.0
            agreed = agreement.result()
            results[(rank, index)] = (agreed.diverged_at, agreed.losses, agreed.next_step)
    finally:
        dist.destroy_process_group()


def _cadence_worker(rank: int, port: int, results) -> None:
    """Every step is a log step; the last one is a checkpoint (agrees at once, whatever the cadence)."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        agreements = Agreements(rank, every_s=EVERY_S)
        started, logged = [], {}
        for step in range(1, STEPS + 1):
            time.sleep(STEP_SLEEP[rank])
            agreed = agreements.collect()
            if agreed is not None:
                logged.update(agreed.losses)
            agreements.add_loss(step, torch.tensor(float(step * (rank + 1)), dtype=torch.float64))
            if step == STEPS or agreements.due(step):
                started.append(step)
                agreements.start(step, None)
                if step == STEPS:
                    logged.update(agreements.collect().losses)  # type: ignore[union-attr]
        results[rank] = (started, logged)
    finally:
        dist.destroy_process_group()


def _spawn(worker) -> dict:
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(worker, args=(_free_port(), results), nprocs=2, join=True)
        return dict(results)


def test_one_agreement_carries_the_earliest_bad_step_the_mean_losses_and_rank_0s_proposal():
    got = _spawn(_agreement_worker)
    for rank in (0, 1):
        for index, (_, _, _, (bad, losses, next_step)) in enumerate(CASES):
            got_bad, got_losses, got_next = got[(rank, index)]
            assert got_bad == bad and got_next == next_step
            assert got_losses.keys() == losses.keys()
            assert all(math.isclose(got_losses[step], losses[step]) for step in losses)


def test_ranks_agree_on_the_same_batched_steps_and_every_logged_loss_arrives_once():
    got = _spawn(_cadence_worker)
    (started_0, logged_0), (started_1, logged_1) = got[0], got[1]
    assert started_0 == started_1  # the same collectives in the same order on both ranks
    assert started_0[:2] == [1, 2]  # the first agreement proposes the next step (no step time yet)
    assert len(started_0) < STEPS / 2  # batched: ~EVERY_S / rank 0's step time apart, not at every log step
    expected = {step: step * 1.5 for step in range(1, STEPS + 1)}  # mean of step*1 and step*2
    assert logged_0.keys() == expected.keys() == logged_1.keys()
    assert all(math.isclose(logged_0[s], expected[s]) and math.isclose(logged_1[s], expected[s]) for s in expected)
