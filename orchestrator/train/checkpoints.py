"""Which checkpoint a (re)started worker group resumes from, and how a checkpoint proves it was fully written.

Ray Train hands a restarted group the last checkpoint its controller has registered; a worker that dies right
after reporting can beat that registration, and a checkpoint can be truncated on disk. So resume looks at the run's
storage itself: each rank writes a marker after its DeepSpeed files, a checkpoint counts only with every rank's
marker, and candidates are tried newest first. All ranks must load the same one, so they vote after each try.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = re.compile(r"^checkpoint_step_(\d+)$")


def marker_name(rank: int) -> str:
    return f".orch_complete_rank{rank}"


def write_marker(local_dir: str | Path, rank: int, tag: str) -> None:
    """Written last, after DeepSpeed's files: its presence means this rank's part is complete."""
    (Path(local_dir) / marker_name(rank)).write_text(tag)


@dataclass(frozen=True)
class Candidate:
    step: int
    path: str
    filesystem: Any  # pyarrow.fs.FileSystem

    def checkpoint(self):
        import ray.train

        return ray.train.Checkpoint(self.path, filesystem=self.filesystem)


def complete_checkpoints(filesystem, run_path: str, world_size: int) -> list[Candidate]:
    """Checkpoints under the run's storage that every rank finished writing, newest first."""
    from pyarrow.fs import FileSelector, FileType

    entries = filesystem.get_file_info(FileSelector(run_path, allow_not_found=True))
    found = []
    for entry in entries:
        match = CHECKPOINT_DIR.match(entry.base_name)
        if entry.type != FileType.Directory or not match:
            continue
        markers = filesystem.get_file_info([f"{entry.path}/{marker_name(r)}" for r in range(world_size)])
        if all(info.type == FileType.File for info in markers):
            found.append(Candidate(int(match.group(1)), entry.path, filesystem))
        else:
            logger.warning("skipping %s: not every rank finished writing it", entry.path)
    return sorted(found, key=lambda c: c.step, reverse=True)


def load_first_good(
    candidates: list[Candidate], load: Callable[[str], Optional[dict[str, Any]]], agree: Callable[[bool], bool]
) -> Optional[dict[str, Any]]:
    """Try candidates newest first; `agree` combines every rank's success so all ranks settle on the same one."""
    for candidate in candidates:
        try:
            with candidate.checkpoint().as_directory() as directory:
                state = load(directory)
            ok = state is not None
        except Exception as error:  # noqa: BLE001 - a corrupt file must not end the run while an older one loads
            logger.warning("checkpoint %s could not be loaded (%s)", candidate.path, error)
            ok, state = False, None
        if agree(ok):
            return state
        logger.warning("checkpoint %s is unusable on some rank; trying the previous one", candidate.path)
    if candidates:
        raise RuntimeError(
            f"none of the {len(candidates)} checkpoints under {Path(candidates[0].path).parent} could be loaded"
        )
    return None
