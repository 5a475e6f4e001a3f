"""Tracking and checkpoint cost: what MLflow logging and checkpointing at the default intervals add to a step.

One `orch run` at the defaults (log_every=10, checkpoint_every=100, system metrics on; validation only at the end
so it does not coincide with the checkpoints), read step by step: the work done after step s (logging, saving) shows
up in the duration of step s+1. Cost of an event = median duration of the steps after it - median of plain steps;
its share of step time at the default interval = cost / interval / plain step. That per-event view misses work
that lands later (an asynchronous collective read a step after, a batch of metrics flushed every few seconds, the
system-metrics sampler), so logging is also measured whole: a run that logs at the defaults without checkpoints
against a control run with tracking reduced to the end of the run (log_every=max_steps, no system metrics,
checkpoint only at the end), mean step over mean step, wall and CPU time, paired per repeat (runs interleaved). Checkpoint phases (DeepSpeed save; Ray Train report, which copies the files into
run storage, then the completion markers written there) come from timeline marks in save_and_report.
"""

from __future__ import annotations

import statistics
from typing import Any, Optional

from benchmarks.harness import Timeline, Workdir, common_overrides, orch_command, ratio, run_process, summarize

WORKERS, LOG_EVERY, CHECKPOINT_EVERY = 2, 10, 100


def event_costs(timeline: Timeline, warmup: int, max_steps: int) -> dict[str, Any]:
    """Per-event extra time from one run's step durations (see the module docstring)."""
    after_log, after_ckpt, plain = [], [], []
    after_log_cpu, plain_cpu = [], []
    for step in range(warmup + 1, max_steps + 1):
        duration, cpu = timeline.duration_of(step), timeline.cpu_of(step)
        if duration is None:
            continue
        previous = step - 1
        if previous % CHECKPOINT_EVERY == 0:
            after_ckpt.append(duration)
        elif previous % LOG_EVERY == 0:
            after_log.append(duration)
            after_log_cpu += [cpu] if cpu is not None else []
        else:
            plain.append(duration)
            plain_cpu += [cpu] if cpu is not None else []
    base = summarize(plain)["median"]
    log_cost = statistics.median(after_log) - base if after_log and base else None
    base_cpu = summarize(plain_cpu)["median"]
    log_cost_cpu = statistics.median(after_log_cpu) - base_cpu if after_log_cpu and base_cpu else None
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
        "plain_step_cpu_median_s": base_cpu,
        "log_step_extra_cpu_s": log_cost_cpu,
        "log_share_of_step_cpu": log_cost_cpu / LOG_EVERY / base_cpu if log_cost_cpu is not None and base_cpu else None,
        "checkpoint_extra_s": ckpt_cost,
        "checkpoint_share_of_step": ckpt_cost / CHECKPOINT_EVERY / base if ckpt_cost is not None and base else None,
        "checkpoint_phases": phases,
        "mean_step_s": summarize(timeline.steady(warmup))["mean"],
        "mean_step_cpu_s": summarize(timeline.steady_cpu(warmup))["mean"],
    }


def run(quick: bool) -> dict[str, Any]:
    steps, warmup, repeats = (250, 20, 1) if quick else (600, 30, 3)
    base = [*common_overrides("mlp", WORKERS, 1, steps), "trainer.eval_every=0"]
    default = [*base, f"trainer.log_every={LOG_EVERY}", f"trainer.checkpoint_every={CHECKPOINT_EVERY}"]
    logging = [*base, f"trainer.log_every={LOG_EVERY}", "trainer.checkpoint_every=0"]
    control = [*base, f"trainer.log_every={steps}", "trainer.checkpoint_every=0", "tracking.system_metrics=false"]
    runs: dict[str, list[dict[str, Any]]] = {"default": [], "logging": [], "control": []}
    paired: dict[str, list[float]] = {"wall": [], "cpu": []}  # logging / control, mean step, per repeat
    with Workdir() as workdir:
        for repeat in range(repeats):
            this_repeat: dict[str, dict[str, Any]] = {}
            order = [("default", default), ("logging", logging), ("control", control)]
            for name, overrides in order if repeat % 2 == 0 else order[::-1]:  # alternate: the load drifts
                print(f"  tracking_checkpoint {name} {repeat + 1}/{repeats}", flush=True)
                timeline = run_process(orch_command(overrides), workdir)
                if timeline.returncode == 0:
                    runs[name].append(event_costs(timeline, warmup, steps))
                    this_repeat[name] = runs[name][-1]
            if {"logging", "control"} <= this_repeat.keys():
                for kind, key in (("wall", "mean_step_s"), ("cpu", "mean_step_cpu_s")):
                    ratio_ = ratio(this_repeat["logging"][key], this_repeat["control"][key])
                    if ratio_ is not None:
                        paired[kind].append(ratio_)
    out: dict[str, Any] = {"settings": {"model": "mlp", "workers": WORKERS, "steps": steps, "log_every": LOG_EVERY, "checkpoint_every": CHECKPOINT_EVERY}}
    out["runs"] = runs

    def med(name: str, key: str) -> Optional[float]:
        values = [r[key] for r in runs[name] if r.get(key) is not None]
        return statistics.median(values) if values else None

    out["log_share_of_step"] = med("default", "log_share_of_step")
    out["log_step_extra_s"] = med("default", "log_step_extra_s")
    out["log_share_of_step_cpu"] = med("default", "log_share_of_step_cpu")
    # the same measure on the control run, at steps after which it logs nothing: what noise alone gives
    out["noise_floor_share"] = med("control", "log_share_of_step")
    out["noise_floor_share_cpu"] = med("control", "log_share_of_step_cpu")
    out["log_step_extra_cpu_s"] = med("default", "log_step_extra_cpu_s")
    out["checkpoint_extra_s"] = med("default", "checkpoint_extra_s")
    out["checkpoint_share_of_step"] = med("default", "checkpoint_share_of_step")
    out["mean_step_ratio_default_vs_control"] = ratio(med("default", "mean_step_s"), med("control", "mean_step_s"))
    out["logging_mean_step_ratios"] = paired
    out["logging_overhead"] = statistics.median(paired["wall"]) - 1 if paired["wall"] else None
    out["logging_overhead_cpu"] = statistics.median(paired["cpu"]) - 1 if paired["cpu"] else None
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
        ["  in CPU time of the training process: extra ms per log step, share", f"{ms(result.get('log_step_extra_cpu_s'))}, {pct(result.get('log_share_of_step_cpu'))}"],
        ["  noise floor: the same share on the control run, which logs nothing there (wall, CPU)", f"{pct(result.get('noise_floor_share'))}, {pct(result.get('noise_floor_share_cpu'))}"],
        ["logging whole (defaults, no checkpoints) vs control, mean step: wall, CPU (paired median)", f"{pct(result.get('logging_overhead'))}, {pct(result.get('logging_overhead_cpu'))}"],
        ["checkpoint: extra ms per checkpoint", ms(result.get("checkpoint_extra_s"))],
        ["  of which DeepSpeed save + marker ms", ms(result.get("checkpoint_save_s"))],
        ["  of which Ray Train report (copy to storage) ms", ms(result.get("checkpoint_report_s"))],
        [f"checkpoint share of step time at checkpoint_every={CHECKPOINT_EVERY}", pct(result.get("checkpoint_share_of_step"))],
        ["mean step, defaults / tracking+checkpoints reduced to the end", "–" if result.get("mean_step_ratio_default_vs_control") is None else f"{result['mean_step_ratio_default_vs_control']:.3f}"],
    ]
