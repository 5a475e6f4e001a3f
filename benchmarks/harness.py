"""What every performance benchmark shares: the machine's description, robust statistics, launching the three ways
of training (orch run, the Ray Train + DeepSpeed baseline, the plain PyTorch loop) and reading their timelines.

Each way runs as its own process with ORCH_TIMELINE pointing at a fresh file, so start-up is measured from the
moment the process is launched, and step durations come from inside the training loop (rank 0).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

# The workload of the step-overhead comparison, identical in all three ways (thread count set explicitly in each:
# orch via trainer.threads_per_worker, the baselines via torch.set_num_threads).
MODELS: dict[str, dict[str, Any]] = {
    "mlp": {"overrides": ["model=mlp", "data=digits"], "model_args": {"hidden_sizes": [128, 128]}, "tokens": 1},
    "gpt": {
        "overrides": ["model=gpt", "data=text"],
        "model_args": {"block_size": 64, "n_layer": 2, "n_head": 4, "n_embd": 64},
        "tokens": 64,
    },
}


# ---------------------------------------------------------------- machine


def machine() -> dict[str, Any]:
    """CPU, cores, memory, library versions and load: the machine is shared, so the load is part of the result."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    versions = {}
    for package in ("torch", "ray", "deepspeed", "mlflow", "hydra-core"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": mem_gib,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "gpu": gpu_name(),
    }


def gpu_name() -> Optional[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


# ---------------------------------------------------------------- statistics


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """Median and interquartile range (robust to the spikes a shared machine produces), with n, min and max."""
    if not values:
        return {"n": 0, "median": None, "q1": None, "q3": None, "iqr": None, "min": None, "max": None, "mean": None}
    ordered = sorted(values)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    return {
        "n": len(ordered),
        "median": statistics.median(ordered),
        "q1": q1,
        "q3": q3,
        "iqr": q3 - q1,
        "min": ordered[0],
        "max": ordered[-1],
        "mean": statistics.fmean(ordered),
    }


def ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    return numerator / denominator if numerator is not None and denominator else None


# ---------------------------------------------------------------- timelines


@dataclass
class Timeline:
    """Events of one run (unix times), its per-step durations (rank 0) and per-rank peak RSS."""

    launched: float
    finished: float
    events: dict[str, float] = field(default_factory=dict)
    durations: list[float] = field(default_factory=list)
    cpu_durations: list[float] = field(default_factory=list)  # process CPU time per step (all threads)
    first_step: int = 2  # the step whose duration is durations[0]
    peak_rss: dict[int, int] = field(default_factory=dict)
    checkpoints: list[dict[str, float]] = field(default_factory=list)
    returncode: int = 0
    output: str = ""  # stdout + stderr of the process

    def steady(self, warmup: int) -> list[float]:
        """Step durations after `warmup` steps (allocation, lazy init and cache warm-up excluded)."""
        return self.durations[max(0, warmup - self.first_step + 1) :]

    def steady_cpu(self, warmup: int) -> list[float]:
        """CPU time of the same steps: what the process itself spent, much less sensitive to other jobs' load."""
        return self.cpu_durations[max(0, warmup - self.first_step + 1) :]

    def duration_of(self, step: int) -> Optional[float]:
        index = step - self.first_step
        return self.durations[index] if 0 <= index < len(self.durations) else None

    def cpu_of(self, step: int) -> Optional[float]:
        index = step - self.first_step
        return self.cpu_durations[index] if 0 <= index < len(self.cpu_durations) else None

    def startup(self) -> dict[str, Optional[float]]:
        """Time to first step and its parts, in seconds from process launch."""
        marks = {"launch": self.launched, **self.events}

        def span(start: str, end: str) -> Optional[float]:
            return marks[end] - marks[start] if start in marks and end in marks else None

        return {
            "total": span("launch", "first_step"),
            "process_and_ray_start": span("launch", "ray_ready"),
            "driver_setup": span("ray_ready", "fit_start"),
            "worker_group": span("fit_start", "worker_start"),
            "deepspeed_initialize": span("worker_start", "engine_ready"),
            "first_batch": span("engine_ready", "first_step"),
        }


def read_timeline(path: Path, launched: float, finished: float) -> Timeline:
    timeline = Timeline(launched=launched, finished=finished)
    if not path.exists():
        return timeline
    pending: dict[int, dict[str, float]] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        event = record["event"]
        if event == "step_times":
            timeline.durations = record["durations"]
            timeline.cpu_durations = record.get("cpu_durations", [])
            timeline.first_step = record["first_step"]
        elif event == "peak_rss":
            timeline.peak_rss[int(record["rank"])] = int(record["bytes"])
        elif event.startswith("checkpoint_"):
            pending.setdefault(record["step"], {"step": record["step"]})[event] = record["t"]
        else:
            timeline.events.setdefault(event, record["t"])  # the first occurrence (a restarted group repeats marks)
    timeline.checkpoints = [pending[step] for step in sorted(pending)]
    return timeline


def run_process(
    command: Sequence[str], cwd: Path, extra_env: Optional[dict[str, str]] = None, timeout_s: float = 900
) -> Timeline:
    """Run one training process with a fresh timeline file; a failure is recorded, not raised."""
    handle, name = tempfile.mkstemp(prefix="timeline-", suffix=".jsonl")
    os.close(handle)
    path = Path(name)
    path.unlink()
    env = {**os.environ, "ORCH_TIMELINE": str(path), "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", **(extra_env or {})}
    launched = time.time()
    try:
        completed = subprocess.run(list(command), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s)
        returncode, output = completed.returncode, completed.stdout + completed.stderr
    except subprocess.TimeoutExpired as error:
        returncode, output = -9, f"timed out after {timeout_s} s: {error}"
    timeline = read_timeline(path, launched, time.time())
    timeline.returncode, timeline.output = returncode, output
    path.unlink(missing_ok=True)
    if returncode != 0:
        print(f"  ! {' '.join(command[:4])} ... exited {returncode}:\n{output[-1500:]}", file=sys.stderr)
    return timeline


def orch_executable() -> list[str]:
    script = Path(sys.executable).parent / "orch"
    return [str(script)] if script.exists() else [sys.executable, "-m", "orchestrator.cli"]


def orch_command(overrides: Sequence[str]) -> list[str]:
    """(a): `orch run` with its defaults except what the benchmark sets. `-v`: the libraries' output on the process's
    own stdout, not in the run's log file (scaling.py reads DeepSpeed's wall_clock_breakdown lines from it)."""
    return [*orch_executable(), "run", "-v", *overrides]


def common_overrides(model: str, workers: int, threads: int, steps: int, batch: int = 32, precision: str = "fp32", zero: int = 0) -> list[str]:
    return [
        *MODELS[model]["overrides"],
        f"trainer.num_workers={workers}",
        f"trainer.threads_per_worker={threads}",
        f"trainer.micro_batch_size={batch}",
        f"trainer.max_steps={steps}",
        f"trainer.precision={precision}",
        f"trainer.zero_stage={zero}",
    ]


def ray_baseline_command(model: str, workers: int, threads: int, steps: int, batch: int = 32, precision: str = "fp32", zero: int = 0, cpus_per_worker: float = 1.0) -> list[str]:
    """(b): the hand-written Ray Train + DeepSpeed script."""
    return [
        sys.executable, "-m", "benchmarks.baselines.ray_deepspeed",
        "--model", model, "--model-args", json.dumps(MODELS[model]["model_args"]),
        "--workers", str(workers), "--threads", str(threads), "--steps", str(steps), "--batch", str(batch),
        "--precision", precision, "--zero", str(zero), "--cpus-per-worker", str(cpus_per_worker),
    ]  # fmt: skip


def plain_command(model: str, threads: int, steps: int, batch: int = 32) -> list[str]:
    """(c): the single-process plain PyTorch loop."""
    return [
        sys.executable, "-m", "benchmarks.baselines.plain_torch",
        "--model", model, "--model-args", json.dumps(MODELS[model]["model_args"]),
        "--threads", str(threads), "--steps", str(steps), "--batch", str(batch),
    ]  # fmt: skip


class Workdir:
    """A scratch directory for orch's outputs (mlflow.db, orch_runs/), removed afterwards."""

    def __enter__(self) -> Path:
        self.path = Path(tempfile.mkdtemp(prefix="orch-bench-"))
        return self.path

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
