"""Which checkpoint a (re)started worker group resumes from, and how a checkpoint proves it was fully written.

Ray Train hands a restarted group the last checkpoint its controller has registered; a worker that dies right
after reporting can beat that registration, and a checkpoint can be truncated on disk. So resume looks at the run's
storage itself. Each rank writes a marker straight into storage after `ray.train.report` returned (Ray uploads
synchronously, so the marker reaches storage last); the marker is a manifest: the layout that wrote the checkpoint
(world size, ZeRO stage, batch) and the size of every file this rank wrote. A checkpoint counts only with every
rank's marker and every listed file at its size. Candidates are tried newest first; all ranks must load the same
one, so they vote after each try.

Every attempt of a run (the first, then each `resume=`) writes into its own folder (`resume-N` inside the run's
folder), so no attempt's retention (`num_to_keep`) ever touches what an earlier attempt wrote; resume looks at the
checkpoints of all attempts. A checkpoint written by another world size under ZeRO >= 1 is converted once into a
DeepSpeed universal checkpoint, cached beside it (`<checkpoint>.universal`), the original left as it was.
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Mapping, Optional

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = re.compile(r"^checkpoint_step_(\d+)$")
ATTEMPT_DIR = re.compile(r"^resume-(\d+)$")
UNIVERSAL_SUFFIX = ".universal"
# What rank 0 reported to Ray Train with the checkpoint (step, loss, validation metrics): a resume that finds the
# run's last step already saved has nothing to train, and reports this instead (JSON: data, read as such)
REPORT_FILE = "orch_report.json"
UNIVERSAL_DONE = ".orch_universal_complete"


def marker_name(rank: int) -> str:
    return f".orch_complete_rank{rank}"


@dataclass(frozen=True)
class Layout:
    """How a checkpoint was written: what decides whether it loads as is, or through a universal checkpoint."""

    world_size: int
    zero_stage: int
    micro_batch_size: int
    grad_accum_steps: int

    @property
    def global_batch(self) -> int:
        return self.world_size * self.micro_batch_size * self.grad_accum_steps


def local_files(local_dir: str | Path) -> dict[str, int]:
    """Relative path -> size of every file one rank wrote into its local checkpoint folder."""
    root = Path(local_dir)
    return {path.relative_to(root).as_posix(): path.stat().st_size for path in sorted(root.rglob("*")) if path.is_file()}


def write_marker(filesystem, checkpoint_path: str, rank: int, tag: str, layout: Layout, files: Mapping[str, int]) -> None:
    """Call after `ray.train.report` returned: the files are in storage, and this lands after them."""
    payload = json.dumps({"tag": tag, "layout": asdict(layout), "files": dict(files)}, sort_keys=True).encode()
    with filesystem.open_output_stream(f"{checkpoint_path}/{marker_name(rank)}") as out:
        out.write(payload)


def _read(filesystem, path: str) -> Optional[bytes]:
    try:
        with filesystem.open_input_stream(path) as stream:
            return stream.read()
    except (FileNotFoundError, OSError):
        return None


def numbers_of(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numeric entries of a report (what a checkpoint's REPORT_FILE holds)."""
    return {str(key): value for key, value in metrics.items() if isinstance(value, (int, float)) and not isinstance(value, bool)}


@dataclass(frozen=True)
class Candidate:
    step: int
    attempt: int  # 0: the run's first attempt, N: its N-th resume
    path: str
    filesystem: Any  # pyarrow.fs.FileSystem
    layout: Optional[Layout]  # None: written before markers recorded it (same world size assumed)
    tag: str = ""

    def checkpoint(self):
        import ray.train

        return ray.train.Checkpoint(self.path, filesystem=self.filesystem)

    def report(self) -> dict[str, float]:
        """The numeric metrics reported with this checkpoint, with its step; only the step for a checkpoint written
        before reports were kept, or whose report is not a JSON object of numbers."""
        raw = _read(self.filesystem, f"{self.path}/{REPORT_FILE}")
        try:
            loaded = json.loads(raw) if raw is not None else {}
        except ValueError:
            loaded = {}
        return {**(numbers_of(loaded) if isinstance(loaded, dict) else {}), "step": self.step}

    @property
    def universal_path(self) -> str:
        return self.path + UNIVERSAL_SUFFIX


def attempt_paths(filesystem, run_path: str) -> list[tuple[int, str]]:
    """(attempt, folder) of every attempt of a run: the run's folder, then its `resume-N` folders."""
    from pyarrow.fs import FileSelector, FileType

    found = [(0, run_path)]
    for entry in filesystem.get_file_info(FileSelector(run_path, allow_not_found=True)):
        match = ATTEMPT_DIR.match(entry.base_name)
        if entry.type == FileType.Directory and match:
            found.append((int(match.group(1)), entry.path))
    return sorted(found)


RUN_OWN_ENTRIES = {"logs"}  # the run's log folder (orchestrator.launch.run_log), written before the first attempt


def next_attempt(filesystem, run_path: str) -> int:
    """The number of the next attempt: 0 for a run whose folder holds nothing an attempt wrote (absent, or only the
    driver's log, which the CLI opens before training starts)."""
    from pyarrow.fs import FileSelector

    attempts = attempt_paths(filesystem, run_path)
    if len(attempts) == 1:
        entries = filesystem.get_file_info(FileSelector(run_path, allow_not_found=True))
        if all(entry.base_name in RUN_OWN_ENTRIES for entry in entries):
            return 0
    return attempts[-1][0] + 1


def _complete(filesystem, path: str, world_size: int) -> tuple[bool, Optional[Layout], str]:
    """Whether every rank's marker is there and every file it lists has its size in storage."""
    from pyarrow.fs import FileType

    first = _read(filesystem, f"{path}/{marker_name(0)}")
    if first is None:
        return False, None, ""
    try:
        manifest = json.loads(first)
    except ValueError:  # a marker of an older orch: the tag only, written for the group's world size
        markers = filesystem.get_file_info([f"{path}/{marker_name(r)}" for r in range(world_size)])
        return all(info.type == FileType.File for info in markers), None, first.decode(errors="replace")
    layout = Layout(**manifest["layout"])
    sizes: dict[str, int] = dict(manifest["files"])
    for rank in range(1, layout.world_size):
        other = _read(filesystem, f"{path}/{marker_name(rank)}")
        if other is None:
            return False, layout, manifest["tag"]
        sizes.update(json.loads(other)["files"])
    infos = filesystem.get_file_info([f"{path}/{name}" for name in sizes])
    whole = all(info.type == FileType.File and info.size == sizes[name] for name, info in zip(sizes, infos))
    return whole, layout, manifest["tag"]


def complete_checkpoints(filesystem, run_path: str, world_size: int) -> list[Candidate]:
    """Checkpoints of every attempt of the run that every rank finished writing, newest step first (the latest
    attempt first among equal steps). `world_size` only serves markers written before they held a manifest."""
    from pyarrow.fs import FileSelector, FileType

    found = []
    for attempt, folder in attempt_paths(filesystem, run_path):
        for entry in filesystem.get_file_info(FileSelector(folder, allow_not_found=True)):
            match = CHECKPOINT_DIR.match(entry.base_name)
            if entry.type != FileType.Directory or not match:
                continue
            whole, layout, tag = _complete(filesystem, entry.path, world_size)
            if whole:
                found.append(Candidate(int(match.group(1)), attempt, entry.path, filesystem, layout, tag))
            else:
                logger.warning("skipping %s: not every rank finished writing it", entry.path)
    return sorted(found, key=lambda c: (c.step, c.attempt), reverse=True)


def needs_universal(layout: Optional[Layout], world_size: int, zero_stage: int) -> bool:
    """ZeRO-0 keeps whole optimizer states in one file, which any world size loads as is; ZeRO >= 1 partitions them
    per rank, so another world size needs DeepSpeed's universal checkpoint."""
    if layout is None or layout.zero_stage == 0:
        return False
    return layout.world_size != world_size or layout.zero_stage != zero_stage


class ResumeMismatch(ValueError):
    """A checkpoint the current config cannot continue from: the key to change, its value and why."""

    def __init__(self, key: str, value: Any, reason: str) -> None:
        self.key, self.value, self.reason = key, value, reason
        super().__init__(f"{key}={value!r}: {reason}")

    def __reduce__(self):
        # raised in a Ray worker, it travels to the controller and the driver pickled: rebuild it from its fields
        return type(self), (self.key, self.value, self.reason)


def check_zero_stage(layout: Layout, zero_stage: int) -> None:
    """Raise ResumeMismatch where no conversion leads from the checkpoint's ZeRO layout to `zero_stage`."""
    if (layout.zero_stage == 0) != (zero_stage == 0):
        raise ResumeMismatch(
            "trainer.zero_stage", zero_stage,
            f"the run's checkpoints were written with ZeRO-{layout.zero_stage}; ZeRO-0 and ZeRO>=1 checkpoints do not "
            f"convert into each other: resume with trainer.zero_stage={layout.zero_stage}",
        )


def check_resumable(layout: Layout, world_size: int, zero_stage: int, micro_batch_size: int, grad_accum_steps: int) -> None:
    """Raise ResumeMismatch (one line, naming the key) where the new layout cannot continue the checkpoint's run."""
    check_zero_stage(layout, zero_stage)
    if world_size * micro_batch_size * grad_accum_steps != layout.global_batch:
        raise ResumeMismatch(
            "trainer.grad_accum_steps", grad_accum_steps,
            f"the run trained with a global batch of {layout.global_batch} ({layout.world_size} workers x "
            f"trainer.micro_batch_size={layout.micro_batch_size} x {layout.grad_accum_steps}); {world_size} workers "
            f"x {micro_batch_size} x {grad_accum_steps} is another",
        )


def resumed_grad_accum(layout: Layout, world_size: int, micro_batch_size: int) -> int:
    """Gradient accumulation that keeps the run's global batch on `world_size` workers; ResumeMismatch if none."""
    per_micro_step = world_size * micro_batch_size
    if layout.global_batch % per_micro_step:
        raise ResumeMismatch(
            "trainer.num_workers", world_size,
            f"the run trained with a global batch of {layout.global_batch} ({layout.world_size} workers x "
            f"trainer.micro_batch_size={layout.micro_batch_size} x trainer.grad_accum_steps={layout.grad_accum_steps}), "
            f"which {world_size} workers x trainer.micro_batch_size={micro_batch_size} do not divide; pick "
            "trainer.num_workers or trainer.micro_batch_size so that they do",
        )
    return layout.global_batch // per_micro_step


def convert_to_universal(candidate: Candidate) -> str:
    """DeepSpeed's `ds_to_universal` of the candidate, once: into `<checkpoint>.universal` beside it, completed by a
    marker written last. The original is only read. Returns the universal checkpoint's path in storage."""
    import pyarrow.fs
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal
    from pyarrow.fs import FileType

    filesystem, target = candidate.filesystem, candidate.universal_path
    if filesystem.get_file_info(f"{target}/{UNIVERSAL_DONE}").type == FileType.File:
        return target
    with candidate.checkpoint().as_directory() as source, tempfile.TemporaryDirectory(prefix="orch-universal-") as out:
        args = SimpleNamespace(
            input_folder=posixpath.join(source, candidate.tag),
            output_folder=posixpath.join(out, candidate.tag),
            num_extract_workers=1,  # the worker's own cores are the budget
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            # orch's models do not declare the (tensor-parallel) universal info; a data-parallel model needs none
            inject_missing_state=True,
        )
        ds_to_universal(args)
        # a half-written cache from a worker that died here is replaced, never the original checkpoint
        filesystem.delete_dir_contents(target, missing_dir_ok=True)
        pyarrow.fs.copy_files(out, target, destination_filesystem=filesystem)
    with filesystem.open_output_stream(f"{target}/{UNIVERSAL_DONE}") as marker:
        marker.write(candidate.tag.encode())
    return target


def _key(candidate: Candidate) -> int:
    return candidate.step * 10_000 + candidate.attempt


def load_first_good(
    candidates: list[Candidate],
    load: Callable[[Candidate], Optional[dict[str, Any]]],
    agree: Callable[[bool], bool],
    lowest: Callable[[int], int] = lambda key: key,
) -> Optional[dict[str, Any]]:
    """Try candidates newest first until every rank loaded the same one. Ranks may see different checkpoints (storage
    local to each node, a file one rank finds truncated): `lowest` (the minimum over ranks) picks the newest that no
    rank has passed, `agree` (every rank's success) moves all ranks past a checkpoint that fails anywhere."""
    remaining, tried = list(candidates), 0
    while True:
        chosen = lowest(_key(remaining[0]) if remaining else -1)
        if chosen < 0:
            break
        candidate = next((c for c in remaining if _key(c) == chosen), None)
        remaining = [c for c in remaining if _key(c) < chosen]
        tried += 1
        if not agree(candidate is not None):  # before loading: a load may itself wait on the other ranks
            logger.warning("checkpoint at step %d is not complete on every rank; trying the previous one", chosen // 10_000)
            continue
        assert candidate is not None
        try:
            state = load(candidate)
            ok = state is not None
        except ResumeMismatch:
            raise
        except Exception as error:  # noqa: BLE001 - a corrupt file must not end the run while an older one loads
            logger.warning("checkpoint %s could not be loaded (%s)", candidate.path, error)
            ok, state = False, None
        if agree(ok):
            return state
        logger.warning("checkpoint %s is unusable on some rank; trying the previous one", candidate.path)
    if agree(not candidates and not tried):  # a fresh start only where no rank saw any checkpoint
        return None
    where = Path(candidates[0].path).parent if candidates else "this run's storage"
    raise RuntimeError(f"none of the {max(tried, len(candidates))} checkpoints under {where} could be loaded")
