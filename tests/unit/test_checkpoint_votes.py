"""Ranks that see different files settle on the same checkpoint: two real processes, a real gloo group, each rank
with its own folder on disk (storage local to each node), choosing through `load_first_good` as workers do."""

from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp
from pyarrow.fs import LocalFileSystem

from orchestrator.train.checkpoints import Layout, complete_checkpoints, load_first_good, write_marker

LAYOUT = Layout(world_size=2, zero_stage=1, micro_batch_size=4, grad_accum_steps=1)


def save(run: Path, step: int, complete: bool, payload: str | None = None) -> None:
    """Both ranks' files and, when `complete`, both markers (what this node's storage holds)."""
    directory = run / f"checkpoint_step_{step:08d}"
    directory.mkdir(parents=True)
    for rank in (0, 1):
        (directory / f"state_rank{rank}.json").write_text(payload or json.dumps({"step": step}))
        if complete:
            write_marker(LocalFileSystem(), str(directory), rank, f"step_{step:08d}", LAYOUT,
                         {f"state_rank{rank}.json": (directory / f"state_rank{rank}.json").stat().st_size})


def choose(rank: int, root: str, init_file: str) -> None:
    import torch

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)

    def agree(ok: bool) -> bool:
        vote = torch.tensor([int(ok)])
        dist.all_reduce(vote, op=dist.ReduceOp.MIN)
        return bool(vote.item())

    def lowest(key: int) -> int:
        value = torch.tensor([key], dtype=torch.int64)
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return int(value.item())

    def load(candidate):
        return json.loads(Path(candidate.path, f"state_rank{rank}.json").read_text())  # a corrupt file raises

    run = Path(root, f"node{rank}")
    state = load_first_good(complete_checkpoints(LocalFileSystem(), str(run), 2), load, agree, lowest)
    Path(root, f"chose{rank}").write_text(json.dumps(state))
    dist.destroy_process_group()


def test_ranks_that_see_different_checkpoints_all_load_the_newest_good_on_every_rank(tmp_path):
    for node in ("node0", "node1"):
        save(tmp_path / node, 10, complete=True)
        save(tmp_path / node, 20, complete=True)
    # node 0 has step 30 complete; node 1's copy never got its markers (its upload died)
    save(tmp_path / "node0", 30, complete=True)
    save(tmp_path / "node1", 30, complete=False)
    # step 20 is complete by its manifest on both, but rank 1's copy is garbled (same size, not JSON)
    garbled = tmp_path / "node1" / "checkpoint_step_00000020" / "state_rank1.json"
    garbled.write_text("x" * len(garbled.read_text()))
    assert len(complete_checkpoints(LocalFileSystem(), str(tmp_path / "node1"), 2)) == 2  # it looks complete there

    # spawn, not fork: a fork would inherit whatever process group an earlier test left in this process
    mp.spawn(choose, args=(str(tmp_path), str(tmp_path / "init")), nprocs=2, join=True)
    chosen = [json.loads((tmp_path / f"chose{rank}").read_text()) for rank in (0, 1)]
    assert chosen == [{"step": 10}, {"step": 10}]
