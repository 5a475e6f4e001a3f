"""Predicted vs measured memory per worker: `orch plan`'s total (model states + activations + process baseline) beside
the peak resident set size of each `orch run` worker, for ZeRO 0/2/3 × activation checkpointing off/on.

A GPT of 12 layers × 768 (~85 M parameters, ~1.4 GB of fp32 model states at ZeRO-0), 2 workers, fp32, micro-batch 8,
context 64: model states dominate the process's own baseline. Every rank writes its peak RSS (getrusage ru_maxrss)
at the end of training (ORCH_TIMELINE); the run also logs the same figures as memory/* MLflow metrics. A `baseline`
row trains a tiny GPT the same way: its peak is the process baseline the plan adds on CPU (RUNTIME_CPU_BYTES). Rows
with checkpointing run only where `trainer.activation_checkpointing` is in the trainer schema. Targets: measured
within ±25 % of predicted; ZeRO-3 / ZeRO-0 per-rank peak ≤ 0.6× (on a branch where ZeRO-3 builds the full model on
every rank first, that ratio reports the construction peak, not the partitioned steady state).

    python -m benchmarks.memory_plan            # all rows
    python -m benchmarks.memory_plan --quick    # ZeRO 0 and 3, checkpointing off
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any, Optional

from benchmarks.harness import Workdir, orch_command, ratio, run_process

WORKERS = 2
MODEL = ["model=gpt", "data=text", "model.n_layer=12", "model.n_embd=768", "model.n_head=12"]
TINY = ["model=gpt", "data=text", "model.n_layer=2", "model.n_embd=64", "model.n_head=4"]
COMMON = [
    f"trainer.num_workers={WORKERS}", "trainer.threads_per_worker=1", "trainer.precision=fp32", "trainer.micro_batch_size=8",
    "data.block_size=64", "trainer.max_steps=2", "trainer.log_every=1", "trainer.eval_every=0", "trainer.checkpoint_every=0",
    "tracking.log_model=false", "tracking.system_metrics=false",
]  # fmt: skip


def has_checkpointing_key() -> bool:
    from orchestrator.config.schema import TrainerConfig

    return any(f.name == "activation_checkpointing" for f in dataclasses.fields(TrainerConfig))


def predicted(overrides: list[str]) -> dict[str, int]:
    from orchestrator.config import compose
    from orchestrator.plan import build_plan

    memory = build_plan(compose(overrides)).stages[0].memory
    return {"total": memory.total, "model_states": memory.model_states, "activations": memory.activations, "runtime": memory.runtime}


def measure(name: str, overrides: list[str], workdir) -> dict[str, Any]:
    print(f"  memory_plan {name}", flush=True)
    plan = predicted(overrides)
    for attempt in range(2):
        timeline = run_process(orch_command([*overrides, f"name=memory-{name}-{attempt}"]), workdir, timeout_s=1800)
        # On a shared machine under heavy load Ray's own start can fail (its raylet wait is a hard-coded 30 s, the
        # dashboard's start too): a run that failed before any worker reported is started once more
        if timeline.returncode == 0 or timeline.peak_rss:
            break
    peaks = timeline.peak_rss
    peak = max(peaks.values()) if peaks else None
    return {
        "predicted_bytes": plan["total"],
        "predicted_parts_bytes": plan,
        "measured_peak_per_rank_bytes": {str(rank): value for rank, value in sorted(peaks.items())},
        "measured_peak_bytes": peak,
        "measured_over_predicted": ratio(peak, plan["total"]),
        "failed": timeline.returncode != 0,
    }


def run(quick: bool) -> dict[str, Any]:
    stages = (0, 3) if quick else (0, 2, 3)
    checkpointing = (False, True) if has_checkpointing_key() and not quick else (False,)
    out: dict[str, Any] = {"settings": {"model": "gpt 12x768", "workers": WORKERS, "precision": "fp32", "micro_batch": 8, "context": 64}}
    if not has_checkpointing_key():
        out["settings"]["checkpointing_rows"] = "not run: trainer.activation_checkpointing is not in this branch's schema"
    with Workdir() as workdir:
        if not quick:
            out["baseline"] = measure("baseline", [*TINY, *COMMON, "trainer.zero_stage=0"], workdir)
        for zero in stages:
            for ckpt in checkpointing:
                name = f"zero{zero}_ckpt{'on' if ckpt else 'off'}"
                extra = ["trainer.activation_checkpointing=true"] if ckpt else []
                out[name] = measure(name, [*MODEL, *COMMON, f"trainer.zero_stage={zero}", *extra], workdir)
    z0, z3 = out.get("zero0_ckptoff", {}), out.get("zero3_ckptoff", {})
    out["zero3_over_zero0_peak"] = ratio(z3.get("measured_peak_bytes"), z0.get("measured_peak_bytes"))
    return out


def table(result: dict[str, Any]) -> list[list[str]]:
    rows = [["configuration", "predicted MiB", "measured peak MiB (max of ranks)", "measured / predicted"]]
    for key, entry in result.items():
        if not isinstance(entry, dict) or "predicted_bytes" not in entry:
            continue
        peak: Optional[int] = entry["measured_peak_bytes"]
        rows.append([
            key,
            f"{entry['predicted_bytes'] / 2**20:.0f}",
            "failed" if peak is None else f"{peak / 2**20:.0f}",
            "–" if entry["measured_over_predicted"] is None else f"{entry['measured_over_predicted']:.2f}",
        ])  # fmt: skip
    z = result.get("zero3_over_zero0_peak")
    rows.append(["ZeRO-3 / ZeRO-0 peak per rank (target ≤ 0.6)", "", "–" if z is None else f"{z:.2f}", ""])
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="ZeRO 0 and 3 only, checkpointing off")
    print(json.dumps(run(parser.parse_args().quick), indent=2))
