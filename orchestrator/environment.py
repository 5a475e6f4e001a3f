"""Environment variables set for a block and put back after: what a library reads from the environment (Ray's
processes at start, torch's load switch), where a function argument cannot reach it."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator, Mapping, Optional


@contextmanager
def environment(settings: Mapping[str, Optional[str]]) -> Iterator[None]:
    """`settings` in this process's environment for the block (a None unsets the variable), and so in every process
    started inside it; then every variable named goes back as it was."""
    previous = {name: os.environ.get(name) for name in settings}
    for name, value in settings.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
