"""Choosing the checkpoint to resume from: complete ones only (every rank's manifest, every file at its size, in any
attempt of the run), newest first, falling back past corrupt ones; the layout rules of a resume on another size."""

from __future__ import annotations

import os

import pytest
from pyarrow.fs import LocalFileSystem

from orchestrator.train.checkpoints import (
    Layout,
    ResumeMismatch,
    check_resumable,
    complete_checkpoints,
    load_first_good,
    local_files,
    needs_universal,
    next_attempt,
    resumed_grad_accum,
    write_marker,
)

ONE = Layout(world_size=1, zero_stage=2, micro_batch_size=8, grad_accum_steps=2)
TWO = Layout(world_size=2, zero_stage=2, micro_batch_size=8, grad_accum_steps=1)


def make(run, step: int, ranks: list[int], layout: Layout = TWO):
    """A checkpoint as save_and_report leaves it: each rank's files, then (after the upload) its marker."""
    directory = run / f"checkpoint_step_{step:08d}"
    directory.mkdir(parents=True)
    for rank in ranks:
        local = run / f".local-{step}-{rank}"
        local.mkdir()
        (local / f"payload_rank{rank}").write_text(str(step) * (rank + 1))
        files = local_files(local)
        for name in files:
            os.replace(local / name, directory / name)
        write_marker(LocalFileSystem(), str(directory), rank, f"step_{step:08d}", layout, files)
    return directory


def steps(found) -> list[int]:
    return [c.step for c in found]


def test_only_checkpoints_every_rank_completed_count_newest_first(tmp_path):
    make(tmp_path, 10, [0, 1])
    make(tmp_path, 20, [0, 1])
    make(tmp_path, 30, [0])  # rank 1 died before its marker
    (tmp_path / "checkpoint_manager_snapshot.json").write_text("{}")
    found = complete_checkpoints(LocalFileSystem(), str(tmp_path), world_size=1)
    assert steps(found) == [20, 10]  # the world size that wrote it decides, not the one resuming
    assert found[0].layout == TWO and found[0].tag == "step_00000020"


@pytest.mark.parametrize(
    "written, expected",
    [
        ('{"loss": 0.5, "val_accuracy": 0.9, "step": 3, "note": "x", "flag": true}', {"loss": 0.5, "val_accuracy": 0.9}),
        (None, {}),  # written before reports were kept
        ("not json", {}),
        ('["a list"]', {}),
    ],
)
def test_a_checkpoints_report_is_read_as_numbers_with_its_own_step(tmp_path, written, expected):
    from orchestrator.train.checkpoints import REPORT_FILE

    directory = make(tmp_path, 20, [0, 1])
    if written is not None:
        (directory / REPORT_FILE).write_text(written)
    [found] = complete_checkpoints(LocalFileSystem(), str(tmp_path), world_size=2)
    assert found.report() == {**expected, "step": 20}


def test_a_file_shorter_than_its_manifest_says_makes_the_checkpoint_incomplete(tmp_path):
    make(tmp_path, 10, [0, 1])
    newest = make(tmp_path, 20, [0, 1])
    (newest / "payload_rank1").write_text("2")  # truncated after the marker was written
    assert steps(complete_checkpoints(LocalFileSystem(), str(tmp_path), world_size=2)) == [10]
    (newest / "payload_rank1").unlink()
    assert steps(complete_checkpoints(LocalFileSystem(), str(tmp_path), world_size=2)) == [10]


def test_markers_of_an_older_orch_count_for_the_resuming_world_size(tmp_path):
    directory = tmp_path / "checkpoint_step_00000010"
    directory.mkdir()
    for rank in (0, 1):
        (directory / f".orch_complete_rank{rank}").write_text("step_00000010")
    assert steps(complete_checkpoints(LocalFileSystem(), str(tmp_path), world_size=2)) == [10]
    [legacy] = complete_checkpoints(LocalFileSystem(), str(tmp_path), world_size=2)
    assert legacy.layout is None and not needs_universal(legacy.layout, 2, 2)
    assert complete_checkpoints(LocalFileSystem(), str(tmp_path), world_size=3) == []


def test_every_attempt_of_a_run_is_searched_and_new_attempts_get_new_folders(tmp_path):
    assert next_attempt(LocalFileSystem(), str(tmp_path / "never")) == 0
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "driver.log").write_text("the CLI opens the run's log before the first attempt starts\n")
    assert next_attempt(LocalFileSystem(), str(tmp_path)) == 0  # a fresh run writes its run's own folder
    make(tmp_path, 10, [0, 1])
    assert next_attempt(LocalFileSystem(), str(tmp_path)) == 1
    make(tmp_path / "resume-1", 10, [0], layout=ONE)
    make(tmp_path / "resume-1", 20, [0], layout=ONE)
    found = complete_checkpoints(LocalFileSystem(), str(tmp_path), world_size=1)
    assert [(c.step, c.attempt) for c in found] == [(20, 1), (10, 1), (10, 0)]
    assert next_attempt(LocalFileSystem(), str(tmp_path)) == 2


def test_a_missing_run_directory_means_a_fresh_start(tmp_path):
    assert complete_checkpoints(LocalFileSystem(), str(tmp_path / "never"), world_size=2) == []
    assert load_first_good([], lambda c: {}, lambda ok: ok) is None


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    make(tmp_path, 10, [0], layout=ONE)
    make(tmp_path, 20, [0], layout=ONE)
    tried = []

    def load(candidate):
        tried.append(candidate.step)
        if candidate.step == 20:
            raise EOFError("truncated file")
        return {"step": candidate.step}

    candidates = complete_checkpoints(LocalFileSystem(), str(tmp_path), world_size=1)
    assert load_first_good(candidates, load, lambda ok: ok) == {"step": 10}
    assert tried == [20, 10]


def test_when_nothing_loads_the_error_says_so_instead_of_starting_over(tmp_path):
    make(tmp_path, 10, [0], layout=ONE)
    candidates = complete_checkpoints(LocalFileSystem(), str(tmp_path), world_size=1)
    with pytest.raises(RuntimeError, match="could be loaded"):
        load_first_good(candidates, lambda c: None, lambda ok: ok)


def test_universal_conversion_only_where_optimizer_partitions_change():
    assert needs_universal(ONE, 2, 2) and needs_universal(TWO, 1, 2)
    assert not needs_universal(TWO, 2, 2)
    assert not needs_universal(Layout(1, 0, 8, 2), 2, 0)  # ZeRO-0: whole states in one file, any size loads it
    assert needs_universal(Layout(2, 1, 8, 1), 2, 2)


def test_the_global_batch_is_kept_by_gradient_accumulation_or_refused_naming_the_key():
    assert resumed_grad_accum(ONE, world_size=2, micro_batch_size=8) == 1
    assert resumed_grad_accum(TWO, world_size=1, micro_batch_size=8) == 2
    assert resumed_grad_accum(TWO, world_size=1, micro_batch_size=4) == 4
    with pytest.raises(ResumeMismatch, match=r"^trainer.num_workers=3: .*global batch of 16"):
        resumed_grad_accum(TWO, world_size=3, micro_batch_size=8)
    check_resumable(ONE, 2, 3, 8, 1)  # ZeRO-2 -> 3 converts through a universal checkpoint
    with pytest.raises(ResumeMismatch, match=r"^trainer.zero_stage=0: .*ZeRO-2"):
        check_resumable(ONE, 2, 0, 8, 1)
    with pytest.raises(ResumeMismatch, match=r"^trainer.grad_accum_steps=2: "):
        check_resumable(ONE, 2, 2, 8, 2)
