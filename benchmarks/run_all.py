"""Run the performance benchmarks and write benchmarks/results/<timestamp>.json and .md (figures + machine).

    python -m benchmarks.run_all                  # everything, full settings (several times the quick run's fits)
    python -m benchmarks.run_all --quick          # fewer repeats and steps (~55 min on 2 cores at load ~20)
    python -m benchmarks.run_all --only step_overhead startup
    python -m benchmarks.run_all --list

Each benchmark is a module with `run(quick: bool) -> dict` (and optionally `table(result) -> rows` for the
markdown page); add one by adding a line to REGISTRY. A listed module that is not present on this branch is
recorded as not run. benchmarks/compression_quality.py measures model quality, not speed, and runs on its own.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Optional, Sequence

from benchmarks.harness import RESULTS, load_average, machine
from benchmarks.report import write

# (name, module): run in this order; cheap and most important first
REGISTRY: list[tuple[str, str]] = [
    ("cli_latency", "benchmarks.cli_latency"),
    ("step_overhead", "benchmarks.step_overhead"),
    ("startup", "benchmarks.startup"),
    ("fit_end", "benchmarks.fit_end"),
    ("tracking_checkpoint", "benchmarks.tracking_checkpoint"),
    ("zero_precision", "benchmarks.zero_precision"),
    ("memory_plan", "benchmarks.memory_plan"),
    ("scaling", "benchmarks.scaling"),
    ("gpu_mfu", "benchmarks.gpu_mfu"),
    ("sweep_overhead", "benchmarks.sweep_overhead"),
    ("gpt_head_pruning", "benchmarks.gpt_head_pruning"),
]


def run_one(name: str, module_name: str, quick: bool) -> tuple[dict[str, Any], Optional[list[list[str]]]]:
    entry: dict[str, Any] = {"load_before": load_average()}
    start = time.perf_counter()
    table = None
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:
            raise
        entry.update(result=None, error=f"not run: {module_name} is not present", elapsed_s=0.0, load_after=load_average())
        return entry, None
    entry["doc"] = (module.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
    try:
        entry["result"] = module.run(quick)
        if hasattr(module, "table"):
            table = module.table(entry["result"])
    except Exception as error:  # one broken benchmark must not lose the others' figures
        traceback.print_exc()
        entry["result"], entry["error"] = None, f"{type(error).__name__}: {error}"
    entry["elapsed_s"] = time.perf_counter() - start
    entry["load_after"] = load_average()
    return entry, table


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and steps")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these benchmarks")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for the .json and .md (default %(default)s)")
    args = parser.parse_args(argv)
    names = [name for name, _ in REGISTRY]
    if args.list:
        print("\n".join(names))
        return {}
    unknown = sorted(set(args.only or []) - set(names))
    if unknown:
        parser.error(f"--only {' '.join(unknown)}: unknown benchmark; expected some of: {', '.join(names)}")
    selected = [(name, module) for name, module in REGISTRY if not args.only or name in args.only]
    stem = time.strftime("%Y%m%d-%H%M%S")
    document: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join(["python -m benchmarks.run_all", *(argv if argv is not None else sys.argv[1:])]),
        "quick": args.quick,
        "machine": machine(),
        "load_before": load_average(),
        "benchmarks": {},
    }
    tables: dict[str, list[list[str]]] = {}
    start = time.perf_counter()
    for name, module in selected:
        print(f"[{time.strftime('%H:%M:%S')}] {name} (load {load_average()[0]})", flush=True)
        entry, table = run_one(name, module, args.quick)
        document["benchmarks"][name] = entry
        if table is not None:
            tables[name] = table
        document["elapsed_s"], document["load_after"] = time.perf_counter() - start, load_average()
        json_path, md_path = write(document, tables, args.out, stem)  # after each benchmark: nothing lost on a crash
    print(f"wrote {json_path} and {md_path}")
    return document


if __name__ == "__main__":
    main()
