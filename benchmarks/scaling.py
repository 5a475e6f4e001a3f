"""Scaling: samples/s (tokens/s) of `orch run` with 1, 2 and 4 workers on this machine, and the share of a step
spent in gradient all-reduce.

Every worker gets 0.5 CPU of Ray's accounting and 1 torch thread, so 4 workers fit on a 2-core machine (they then
share the cores: on such a machine more workers cannot add compute, and the figure shows what the overhead of
synchronising them costs). The communication share comes from DeepSpeed's own wall-clock breakdown
(`wall_clock_breakdown: true` through trainer.deepspeed; ZeRO-0 times the gradient all-reduce as `bwd_allreduce`):
median over the steady steps of bwd_allreduce / (fwd + bwd + step), on rank 0. The breakdown is measured in a
separate run, because printing it every step costs time itself (with --quick, in the same run: cheaper, and the
step times then include DeepSpeed's per-step print).
"""

from __future__ import annotations

import re
import statistics
from typing import Any, Optional

from benchmarks.harness import MODELS, Workdir, common_overrides, orch_command, run_process, summarize

MODEL = "gpt"
BREAKDOWN = re.compile(r"time \(ms\) \| fwd: ([\d.]+) \| bwd: ([\d.]+) \| bwd_inner: ([\d.]+) \| bwd_allreduce: ([\d.]+) \| step: ([\d.]+)")


def overrides(workers: int, steps: int) -> list[str]:
    return [
        *common_overrides(MODEL, workers, 1, steps),
        "trainer.cpus_per_worker=0.5",
        "trainer.eval_every=0",
        "trainer.checkpoint_every=0",
    ]


def comm_share(output: str, warmup: int) -> Optional[float]:
    """Median all-reduce share of the steps DeepSpeed printed (rank 0), after `warmup` of them."""
    shares = []
    for fwd, bwd, _inner, allreduce, step in [tuple(map(float, m)) for m in BREAKDOWN.findall(output)][warmup:]:
        total = fwd + bwd + step
        if total > 0:
            shares.append(allreduce / total)
    return statistics.median(shares) if shares else None


def run(quick: bool) -> dict[str, Any]:
    steps, warmup = (40, 10) if quick else (150, 20)
    tokens = MODELS[MODEL]["tokens"]
    out: dict[str, Any] = {"settings": {"model": MODEL, "steps": steps, "warmup": warmup, "cpus_per_worker": 0.5, "threads_per_worker": 1}}
    with Workdir() as workdir:
        for workers in (1, 2, 4):
            print(f"  scaling workers={workers}", flush=True)
            breakdown = ["+trainer.deepspeed.wall_clock_breakdown=true"] if quick and workers > 1 else []
            timeline = run_process(orch_command([*overrides(workers, steps), *breakdown]), workdir)
            median = summarize(timeline.steady(warmup))["median"]
            entry: dict[str, Any] = {"step_time_median_s": median, "failed": timeline.returncode != 0}
            if median:
                entry["samples_per_s"] = 32 * workers / median
                entry["tokens_per_s"] = 32 * workers * tokens / median
            if workers > 1 and quick:
                entry["comm_share"] = comm_share(timeline.output, warmup)
            elif workers > 1:
                print(f"  scaling workers={workers} (DeepSpeed wall-clock breakdown)", flush=True)
                profiled = run_process(
                    orch_command([*overrides(workers, steps), "+trainer.deepspeed.wall_clock_breakdown=true"]), workdir
                )
                entry["comm_share"] = comm_share(profiled.output, warmup)
            out[f"w{workers}"] = entry
    base = out["w1"].get("samples_per_s")
    for workers in (2, 4):
        value = out[f"w{workers}"].get("samples_per_s")
        out[f"w{workers}"]["speedup_vs_1"] = value / base if value and base else None
    return out


def table(result: dict[str, Any]) -> list[list[str]]:
    rows = [["workers", "step ms", "samples/s", "tokens/s", "speed-up vs 1", "all-reduce share of step"]]
    for workers in (1, 2, 4):
        e = result.get(f"w{workers}", {})
        rows.append([
            str(workers),
            _f(e.get("step_time_median_s"), 1e3, 1),
            _f(e.get("samples_per_s"), 1, 0),
            _f(e.get("tokens_per_s"), 1, 0),
            _f(e.get("speedup_vs_1"), 1, 2),
            "–" if e.get("comm_share") is None else f"{e['comm_share']:.0%}",
        ])  # fmt: skip
    return rows


def _f(value: Any, scale: float, digits: int) -> str:
    return "–" if value is None else f"{value * scale:.{digits}f}"
