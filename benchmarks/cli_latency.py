"""CLI latency: `orch --help`, `orch run --help` and `orch plan` must answer without importing torch, MLflow or
DeepSpeed. Wall time of each command (median of a few runs) and whether a heavy module got imported (checked by
running the CLI under `python -X importtime`)."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from typing import Any

from benchmarks.harness import REPO, orch_executable

COMMANDS = {"orch --help": ["--help"], "orch run --help": ["run", "--help"], "orch plan": ["plan"]}
HEAVY = ("torch", "mlflow", "deepspeed", "ray")


def heavy_imports(args: list[str]) -> list[str]:
    """Top-level heavy packages imported by `orch <args>` (from -X importtime's log on stderr)."""
    code = "import sys; from orchestrator.cli import main; sys.argv = ['orch', *sys.argv[1:]]; main()"
    completed = subprocess.run([sys.executable, "-X", "importtime", "-c", code, *args], cwd=REPO, capture_output=True, text=True)
    found = set()
    for line in completed.stderr.splitlines():
        if line.startswith("import time:"):
            name = line.rsplit("|", 1)[-1].strip()
            if name.split(".")[0] in HEAVY:
                found.add(name.split(".")[0])
    return sorted(found)


def run(quick: bool) -> dict[str, Any]:
    repeats = 3 if quick else 5
    out: dict[str, Any] = {}
    for label, args in COMMANDS.items():
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            completed = subprocess.run([*orch_executable(), *args], cwd=REPO, capture_output=True, text=True)
            times.append(time.perf_counter() - start)
        out[label] = {"median_s": statistics.median(times), "ok": completed.returncode == 0, "heavy_imports": heavy_imports(args)}
    return out


def table(result: dict[str, Any]) -> list[list[str]]:
    rows = [["command", "median s (target well under 2)", "heavy modules imported"]]
    for label, e in result.items():
        rows.append([label, f"{e['median_s']:.2f}", ", ".join(e["heavy_imports"]) or "none"])
    return rows
