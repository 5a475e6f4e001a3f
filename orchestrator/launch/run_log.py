"""A quiet terminal: what Ray, DeepSpeed, MLflow and Hydra print during a run goes to the run's log file.

`orch run` and `orch sweep` print their own lines (start line, progress, evaluations, summary, errors) on a console
bound to the terminal before the run starts; `quiet_terminal(path)` then routes everything else for the block:

  driver     sys.stdout and sys.stderr point at the log file. Ray's and MLflow's handlers write to whatever
             sys.stderr is when they emit, so their records follow; the root logger (Hydra's job logging) writes to
             the file, INFO and up, with time, level and logger name; other handlers already bound to the terminal
             (DeepSpeed's logger) are pointed at the file.
  workers    Ray forwards every worker's and actor's stdout/stderr to the driver (log_to_driver), which prints it
             to sys.stdout/sys.stderr: into the file, with RAY_COLOR_PREFIX=0 (no colour codes) and RAY_DEDUP_LOGS=0
             (every rank's line, not "[repeated 3x across cluster]"). These switches are read when Ray is imported
             or prints, and the CLI imports Ray only after this block is entered.
  terminal   ERROR records of any logger, and orch's own warnings, still reach the terminal (and the file); orch's
             warnings on rank 0 come through the progress board (orchestrator.train.worker_metrics.WarningsToDriver).

Nothing is filtered by its text: a line goes to the file or the terminal by where it was written. `orch run -v` skips
this and shows everything live.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, TextIO

LOG_FILE = "driver.log"
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
TERMINAL_FORMAT = "%(levelname)s %(name)s: %(message)s"
# library switches for a log file: Ray's forwarded worker lines without ANSI colours and without de-duplication
QUIET_ENV = {"RAY_COLOR_PREFIX": "0", "RAY_DEDUP_LOGS": "0"}


def run_log_path(storage_path: str, run_name: str) -> Path:
    """`<storage_path>/<run_name>/logs/driver.log`, next to the run's checkpoints; a run whose checkpoints go to remote
    storage (s3://...) logs under the temp dir (and, like every run, as the MLflow artifact logs/driver.log)."""
    if "://" in storage_path:
        return Path(tempfile.gettempdir(), "orch-logs", run_name, LOG_FILE)
    return Path(storage_path, run_name, "logs", LOG_FILE)


class _OnTerminal(logging.Filter):
    """What a quiet run still shows: errors from anywhere, warnings from orch itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or (record.levelno >= logging.WARNING and record.name.startswith("orchestrator"))


def _loggers() -> list[logging.Logger]:
    existing = list(logging.Logger.manager.loggerDict.values())  # one copy: other threads may add loggers meanwhile
    return [logging.getLogger()] + [logger for logger in existing if isinstance(logger, logging.Logger)]


def _stream_handlers(streams: tuple[TextIO, ...]) -> list[logging.StreamHandler]:
    return [
        handler
        for logger in _loggers()
        for handler in logger.handlers
        if isinstance(handler, logging.StreamHandler)
        and not isinstance(getattr(type(handler), "stream", None), property)  # follows sys.stderr by itself
        and any(handler.stream is stream for stream in streams)
    ]


@contextmanager
def quiet_terminal(path: Path) -> Iterator[Path]:
    """For the block, every library's output in the driver (and the workers' output Ray forwards to it) is appended
    to `path`; see the module's docstring. Everything is put back as it was when the block ends."""
    path.parent.mkdir(parents=True, exist_ok=True)
    log = open(path, "a", buffering=1, encoding="utf-8", errors="replace")  # line-buffered: readable while it runs
    terminal_out, terminal_err = sys.stdout, sys.stderr
    env_set = [key for key in QUIET_ENV if key not in os.environ]  # a user's own setting wins
    root = logging.getLogger()
    root_level, root_handlers = root.level, root.handlers[:]
    repointed: list[tuple[logging.StreamHandler, TextIO]] = []
    added: list[logging.Handler] = []
    detached: list[logging.Logger] = []
    try:
        os.environ.update({key: QUIET_ENV[key] for key in env_set})
        for handler in root_handlers:
            root.removeHandler(handler)
        for handler in _stream_handlers((terminal_out, terminal_err)):
            repointed.append((handler, handler.setStream(log)))
        added.append(logging.StreamHandler(log))
        added[-1].setFormatter(logging.Formatter(FILE_FORMAT))
        added.append(logging.StreamHandler(terminal_err))
        added[-1].setFormatter(logging.Formatter(TERMINAL_FORMAT))
        added[-1].addFilter(_OnTerminal())
        # the root, and the libraries' loggers that keep their records to themselves (Ray's, DeepSpeed's, MLflow's
        # when imported already), show errors on the terminal
        detached = [logger for logger in _loggers()[1:] if not logger.propagate and logger.handlers]
        for handler in added:
            root.addHandler(handler)
        for logger in detached:
            logger.addHandler(added[-1])
        if root.level > logging.INFO:
            root.setLevel(logging.INFO)  # libraries' INFO records reach the file
        sys.stdout = sys.stderr = log
        yield path
    finally:
        sys.stdout, sys.stderr = terminal_out, terminal_err
        for handler in added:
            root.removeHandler(handler)
        for handler in root_handlers:
            root.addHandler(handler)
        for logger in detached:
            logger.removeHandler(added[-1])
        root.setLevel(root_level)
        for handler, stream in repointed:
            handler.setStream(stream)
        for handler in _stream_handlers((log,)):  # created during the block (a library imported then): stderr now
            handler.setStream(terminal_err)
        for key in env_set:
            os.environ.pop(key, None)
        log.close()
