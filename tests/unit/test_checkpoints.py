"""Choosing the checkpoint to resume from: complete ones only, newest first, falling back past corrupt ones."""

from __future__ import annotations

import pytest
from pyarrow.fs import LocalFileSystem

from orchestrator.train.checkpoints import complete_checkpoints, load_first_good, write_marker


def make(run, step: int, ranks: list[int]) -> None:
    directory = run / f"checkpoint_step_{step:08d}"
    directory.mkdir(parents=True)
    (directory / "payload").write_text(str(step))
    for rank in ranks:
        write_marker(directory, rank, f"step_{step:08d}")


def test_only_checkpoints_every_rank_completed_count_newest_first(tmp_path):
    make(tmp_path, 10, [0, 1])
    make(tmp_path, 20, [0, 1])
    make(tmp_path, 30, [0])  # rank 1 died while writing
    (tmp_path / "checkpoint_manager_snapshot.json").write_text("{}")
    found = complete_checkpoints(LocalFileSystem(), str(tmp_path), world_size=2)
    assert [c.step for c in found] == [20, 10]


def test_a_missing_run_directory_means_a_fresh_start(tmp_path):
    assert complete_checkpoints(LocalFileSystem(), str(tmp_path / "never"), world_size=2) == []
    assert load_first_good([], lambda d: {}, lambda ok: ok) is None


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    make(tmp_path, 10, [0])
    make(tmp_path, 20, [0])
    tried = []

    def load(directory):
        step = int(open(f"{directory}/payload").read())
        tried.append(step)
        if step == 20:
            raise EOFError("truncated file")
        return {"step": step}

    candidates = complete_checkpoints(LocalFileSystem(), str(tmp_path), world_size=1)
    assert load_first_good(candidates, load, lambda ok: ok) == {"step": 10}
    assert tried == [20, 10]


def test_ranks_that_disagree_all_move_to_the_previous_checkpoint(tmp_path):
    make(tmp_path, 10, [0])
    make(tmp_path, 20, [0])
    votes = iter([False, True])  # another rank failed on step 20, everyone succeeded on step 10
    candidates = complete_checkpoints(LocalFileSystem(), str(tmp_path), world_size=1)
    state = load_first_good(candidates, lambda d: {"dir": d}, lambda ok: next(votes))
    assert state is not None and "checkpoint_step_00000010" in state["dir"]


def test_when_nothing_loads_the_error_says_so_instead_of_starting_over(tmp_path):
    make(tmp_path, 10, [0])
    candidates = complete_checkpoints(LocalFileSystem(), str(tmp_path), world_size=1)
    with pytest.raises(RuntimeError, match="could be loaded"):
        load_first_good(candidates, lambda d: None, lambda ok: ok)
