"""Tracking and checkpoint cost: what MLflow logging and checkpointing at the default intervals add to a step.

One `orch run` at the defaults (log_every=10, checkpoint_every=100, system metrics on; validation only at the end
so it does not coincide with the checkpoints), read step by step: the work done after step s (logging, saving) shows
up in the duration of step s+1. Cost of an event = median duration of the steps after it - median of plain steps;
its share of step time at the default interval = cost / interval / plain step. A control run with tracking reduced
to the end of the run (log_every=max_steps, no system metrics, checkpoint only at the end) gives the mean-to-mean
comparison. Checkpoint phases (DeepSpeed save + completion marker; Ray Train report, which copies the files into
run storage) come from timeline marks in save_and_report.
"""

from __future__ import annotations

import statistics
from typing import Any, Optional

from benchmarks.harness import Timeline, Workdir, common_overrides, orch_command, ratio, run_process, summarize

WORKERS, LOG_EVERY, CHECKPOINT_EVERY = 2, 10, 100


def event_costs(timeline: Timeline, warmup: int, max_steps: int) -> dict[str, Any]:
    """Per-event extra time from one run's step durations (see the module docstring)."""
    after_log, after_ckpt, plain = [], [], []
    for step in range(warmup + 1, max_steps + 1):
        duration = timeline.duration_of(step)
        if duration is None:
            continue
        previous = step - 1
        if previous % CHECKPOINT_EVERY == 0:
            after_ckpt.append(duration)
        elif previous % LOG_EVERY == 0:
            after_log.append(duration)
        else:
            plain.append(duration)
    base = summarize(plain)["median"]
    log_cost = statistics.median(after_log) - base if after_log and base else None
    ckpt_cost = statistics.fmean(after_ckpt) - base if after_ckpt and base else None
    phases = [
        {"save_s": c["checkpoint_saved"] - c["checkpoint_start"], "report_s": c["checkpoint_reported"] - c["checkpoint_saved"]}
        for c in timeline.checkpoints
        if {"checkpoint_start", "checkpoint_saved", "checkpoint_reported"} <= c.keys() and c["step"] < max_steps
    ]
    return {
        "plain_step_median_s": base,
        "log_step_extra_s": log_cost,
        "log_share_of_step": log_cost / LOG_EVERY / base if log_cost is not None and base else None,
        "checkpoint_extra_s": ckpt_cost,
        "checkpoint_share_of_step": ckpt_cost / CHECKPOINT_EVERY / base if ckpt_cost is not None and base else None,
        "checkpoint_phases": phases,
        "mean_step_s": summarize(timeline.steady(warmup))["mean"],
    }


def run(quick: bool) -> dict[str, Any]:
    steps, warmup, repeats = (250, 20, 1) if quick else (400, 30, 2)
    base = [*common_overrides("mlp", WORKERS, 1, steps), "trainer.eval_every=0"]
    default = [*base, f"trainer.log_every={LOG_EVERY}", f"trainer.checkpoint_every={CHECKPOINT_EVERY}"]
    control = [*base, f"trainer.log_every={steps}", "trainer.checkpoint_every=0", "tracking.system_metrics=false"]
    runs: dict[str, list[dict[str, Any]]] = {"default": [], "control": []}
    with Workdir() as workdir:
        for repeat in range(repeats):
            for name, overrides in (("default", default), ("control", control)):
                print(f"  tracking_checkpoint {name} {repeat + 1}/{repeats}", flush=True)
                timeline = run_process(orch_command(overrides), workdir)
                if timeline.returncode == 0:
                    runs[name].append(event_costs(timeline, warmup, steps))
    out: dict[str, Any] = {"settings": {"model": "mlp", "workers": WORKERS, "steps": steps, "log_every": LOG_EVERY, "checkpoint_every": CHECKPOINT_EVERY}}
    out["runs"] = runs

    def med(name: str, key: str) -> Optional[float]:
        values = [r[key] for r in runs[name] if r.get(key) is not None]
        return statistics.median(values) if values else None

    out["log_share_of_step"] = med("default", "log_share_of_step")
    out["log_step_extra_s"] = med("default", "log_step_extra_s")
    out["checkpoint_extra_s"] = med("default", "checkpoint_extra_s")
    out["checkpoint_share_of_step"] = med("default", "checkpoint_share_of_step")
    out["mean_step_ratio_default_vs_control"] = ratio(med("default", "mean_step_s"), med("control", "mean_step_s"))
    phases = [p for r in runs["default"] for p in r["checkpoint_phases"]]
    out["checkpoint_save_s"] = statistics.median([p["save_s"] for p in phases]) if phases else None
    out["checkpoint_report_s"] = statistics.median([p["report_s"] for p in phases]) if phases else None
    return out


def table(result: dict[str, Any]) -> list[list[str]]:
    def pct(v: Any) -> str:
        return "–" if v is None else f"{v:.2%}"

    def ms(v: Any) -> str:
        return "–" if v is None else f"{v * 1e3:.1f}"

    return [
        ["what", "value"],
        ["MLflow logging: extra ms per log step", ms(result.get("log_step_extra_s"))],
        [f"MLflow logging share of step time at log_every={LOG_EVERY} (target ≤1 %)", pct(result.get("log_share_of_step"))],
        ["checkpoint: extra ms per checkpoint", ms(result.get("checkpoint_extra_s"))],
        ["  of which DeepSpeed save + marker ms", ms(result.get("checkpoint_save_s"))],
        ["  of which Ray Train report (copy to storage) ms", ms(result.get("checkpoint_report_s"))],
        [f"checkpoint share of step time at checkpoint_every={CHECKPOINT_EVERY}", pct(result.get("checkpoint_share_of_step"))],
        ["mean step, defaults / tracking+checkpoints reduced to the end", "–" if result.get("mean_step_ratio_default_vs_control") is None else f"{result['mean_step_ratio_default_vs_control']:.3f}"],
    ]
