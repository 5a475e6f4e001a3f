"""What a preemption costs: seconds from SIGTERM to one worker until that worker's process has exited, having saved
the step it was at on every rank (orchestrator.train.preemption), for the default GPT (`model=gpt data=text`).

One `orch run` of 2 workers in a directory of its own; the `ReportPid` loop callback gives rank 1's PID at a step,
the signal goes to it, and the time until its process is gone is measured, next to the run's own median step time
(MLflow `step_time_s`) and the ratio of the two, both from this one run:

    python -m benchmarks.preemption_cost [--steps 200] [--signal-at 20] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence


def measure(steps: int, signal_at: int, workers: int, workdir: Path) -> dict[str, Any]:
    pid_file = workdir / "worker.pid"
    report = f"{{_target_: orchestrator.train.callbacks.ReportPid, step: {signal_at}, rank: {workers - 1}, path: '{pid_file}'}}"
    command = [sys.executable, "-m", "orchestrator.cli", "run", "name=preempt", "model=gpt", "data=text",
               f"trainer.num_workers={workers}", f"trainer.max_steps={steps}", "trainer.log_every=1",
               "trainer.eval_every=0", "trainer.checkpoint_every=0", "trainer.max_failures=0",
               "tracking.system_metrics=false", "tracking.log_model=false", f"trainer.callbacks=[{report}]"]
    output = workdir / "driver.txt"
    driver = subprocess.Popen(command, cwd=workdir, stdout=output.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while not pid_file.exists():
            if driver.poll() is not None:
                raise RuntimeError(f"the run ended (exit {driver.returncode}) before step {signal_at}:\n{output.read_text()[-2000:]}")
            time.sleep(0.02)
        pid = int(pid_file.read_text())
        sent = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        while Path(f"/proc/{pid}").exists():
            time.sleep(0.02)
        seconds_to_exit = time.monotonic() - sent
        driver.wait(timeout=600)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    [run] = client.search_runs(["1"])
    step_times = [m.value for m in client.get_metric_history(run.info.run_id, "step_time_s")]
    step_time = statistics.median(step_times) if step_times else None
    return {
        "model": "gpt",
        "workers": workers,
        "signalled_before_step": signal_at,
        "saved_at_step": int(run.data.tags.get("orch.preempted_at_step", -1)),
        "sigterm_to_exit_s": round(seconds_to_exit, 3),
        "step_time_median_s": step_time,
        "exit_over_step_time": round(seconds_to_exit / step_time, 1) if step_time else None,
        "load_average_1m": os.getloadavg()[0],
    }


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--signal-at", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="orch-preempt-") as workdir:
        result = measure(args.steps, args.signal_at, args.workers, Path(workdir))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
