"""Fit end: how long `orch run` waits between its workers' last line and Ray Train's `fit()` returning, on orch's
own local Ray (Ray Train's controller polls its workers every 0.5 s there) against Ray Train's default poll (2 s,
set through its documented RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, which orch leaves to the user when set).

The same 20-step `orch run` both ways, interleaved (a, b, a, b, ...), each in its own process. Parts: the wait
(rank 0's `worker_end` mark to the driver's `fit_returned`) and the whole process's wall time.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Optional

from benchmarks.harness import Workdir, common_overrides, orch_command, ratio, run_process

STEPS = 20
WAYS = {"a_orch_local": {}, "b_ray_default_poll": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2"}}


def run(quick: bool) -> dict[str, Any]:
    repeats = 2 if quick else 4
    command = orch_command([*common_overrides("mlp", 2, 1, STEPS), "trainer.eval_every=0", "trainer.checkpoint_every=0",
                            "tracking.system_metrics=false"])
    samples: dict[str, dict[str, list[float]]] = {way: {"wait_s": [], "wall_s": []} for way in WAYS}
    with Workdir() as workdir:
        for repeat in range(repeats):
            for way, env in WAYS.items():
                print(f"  fit_end {way} {repeat + 1}/{repeats}", flush=True)
                started = time.time()
                timeline = run_process(command, workdir, env)
                marks = timeline.events
                if timeline.returncode != 0 or "worker_end" not in marks or "fit_returned" not in marks:
                    continue
                samples[way]["wait_s"].append(marks["fit_returned"] - marks["worker_end"])
                samples[way]["wall_s"].append(timeline.finished - started)
    out: dict[str, Any] = {"settings": {"steps": STEPS, "workers": 2, "repeats": repeats}}
    for way, parts in samples.items():
        out[way] = {part: _median(values) for part, values in parts.items()} | {"n": len(parts["wall_s"])}
    for part in ("wait_s", "wall_s"):
        out[f"ratio_{part}"] = ratio(out["a_orch_local"][part], out["b_ray_default_poll"][part])
    return out


def _median(values: list[float]) -> Optional[float]:
    return statistics.median(values) if values else None


def table(result: dict[str, Any]) -> list[list[str]]:
    rows = [["way", "n", "wait after the workers end, s", "process wall, s"]]
    for way in WAYS:
        e = result.get(way, {})
        rows.append([way, str(e.get("n", 0)), _f(e.get("wait_s")), _f(e.get("wall_s"))])
    rows.append(["a/b", "", _f(result.get("ratio_wait_s")), _f(result.get("ratio_wall_s"))])
    return rows


def _f(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 repeats each way instead of 4")
    args = parser.parse_args()
    for row in table(run(args.quick)):
        print(" | ".join(row))
