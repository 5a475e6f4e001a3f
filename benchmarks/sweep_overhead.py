"""Sweep overhead: wall time of N short trials against the ideal, sum(trial times) / concurrency.

Every trial is a full 2-worker DeepSpeed run of the digits MLP (random search over the learning rate, no early
stopping, so every trial does the same work). A trial's time is measured inside its function, from its start to
the end of its run (plan, Ray Train fit, export, MLflow); the sweep's wall time is Tuner.fit(). The ratio
wall / ideal − 1 is the overhead Ray Tune and orch add around the trials (Ray Tune publishes about 14 % for its own
scheduling). Ray's start and the parent MLflow run are outside both, and reported separately.

    python -m benchmarks.sweep_overhead            # 6 trials
    python -m benchmarks.sweep_overhead --quick    # 3 trials
Writes benchmarks/results/sweep_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def sweep_config(trials: int) -> dict:
    return {
        "name": "overhead",
        "overrides": [
            "model.hidden_sizes=[32]",
            "trainer.precision=fp32",
            "trainer.max_steps=40",
            "trainer.eval_every=20",
            "trainer.checkpoint_every=20",
            "tracking.system_metrics=false",
        ],
        "space": {"trainer.optimizer.lr": {"loguniform": [1e-3, 1e-2]}},
        "metric": "val_accuracy",
        "mode": "max",
        "num_samples": trials,
        "max_concurrent_trials": None,
        "search": "random",
        "seed": 0,
        "points_to_evaluate": [],
        "scheduler": {"name": "none", "grace_period": None, "reduction_factor": 2.0},
    }


def run(quick: bool = False) -> dict:
    from rich.console import Console

    from orchestrator.sweep.plan import plan_sweep
    from orchestrator.sweep.runner import run_sweep

    trials = 3 if quick else 6
    with tempfile.TemporaryDirectory(prefix="orch-bench-sweep-") as work:
        plan = plan_sweep(sweep_config(trials), [], cwd=Path(work))
        started = time.monotonic()
        outcome = run_sweep(plan, Console(quiet=True), cwd=Path(work))
        total = time.monotonic() - started
    times = [row["trial_wall_s"] for row in outcome.trials if row.get("trial_wall_s")]
    ideal = sum(times) / outcome.concurrency
    return {
        "benchmark": "sweep_overhead",
        "trials": len(outcome.trials),
        "trials_completed": len(times),
        "concurrency": outcome.concurrency,
        "trial_s_median": statistics.median(times) if times else None,
        "trial_s_sum": sum(times),
        "ideal_s": ideal,
        "tune_wall_s": outcome.tune_wall_s,
        "overhead_ratio": outcome.tune_wall_s / ideal - 1 if ideal else None,
        "end_to_end_s": total,  # with Ray's start, the parent run, tables and plots
        "reference": "Ray Tune's published overhead: about 0.14",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 trials instead of 6")
    args = parser.parse_args()
    result = run(quick=args.quick)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sweep_overhead.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(
        f"{result['trials']} trials, {result['concurrency']} at a time: wall {result['tune_wall_s']:.1f} s vs ideal "
        f"{result['ideal_s']:.1f} s → overhead {result['overhead_ratio']:.1%}"
    )


if __name__ == "__main__":
    main()
