"""How the command line ends: one `orch: error:` line and an exit code, or a JSON document for scripts."""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn


def fail(message: str, code: int = 2) -> NoReturn:
    print(f"orch: error: {message}", file=sys.stderr)
    sys.exit(code)


def print_json(document: Any) -> None:
    """One JSON document on stdout (paths, enums and other objects as strings): what `--json` promises."""
    print(json.dumps(document, default=str, sort_keys=True))
