"""Time to first step, cold and warm, for (a) `orch run` and (b) the Ray Train + DeepSpeed baseline, in parts.

Cold: TORCH_EXTENSIONS_DIR points at an empty directory, so DeepSpeed's JIT-compiled CPU op (deepspeed_shm_comm,
built by its CPU backend at start) is not cached: (b) compiles it; (a) skips it, since training never calls it
(orchestrator.train.engine.skip_shm_allreduce_build). Warm: the same directory again. Parts, from the
launch of the process: process start + imports + Ray start (ray_ready), driver set-up (orch: config, MLflow run,
trainer; baseline: ~0), the Ray Train worker group up to the first line of the training loop, DeepSpeed initialize
(including building data and model), and the first batch (orch: also checkpoint lookup and MLflow client set-up).
orch starts a local Ray on a thread while its driver imports and creates the MLflow run, so most of its driver
set-up lies inside its "process + Ray start" and what is left after ray_ready is what Ray start did not cover.
"""

from __future__ import annotations

import statistics
import tempfile
from typing import Any

from benchmarks.harness import Workdir, common_overrides, orch_command, ratio, ray_baseline_command, run_process

WORKERS, THREADS, STEPS = 2, 1, 5
PARTS = ("process_and_ray_start", "driver_setup", "worker_group", "deepspeed_initialize", "first_batch", "total")


def run(quick: bool) -> dict[str, Any]:
    warm_repeats = 1 if quick else 3
    cold_repeats = 1 if quick else 2
    ways = {
        "a_orch": orch_command([*common_overrides("mlp", WORKERS, THREADS, STEPS), "trainer.eval_every=0", "trainer.checkpoint_every=0"]),
        "b_ray_deepspeed": ray_baseline_command("mlp", WORKERS, THREADS, STEPS),
    }
    out: dict[str, Any] = {
        "settings": {"workers": WORKERS, "steps": STEPS, "model": "mlp", "warm_repeats": warm_repeats, "cold_repeats": cold_repeats}
    }
    samples: dict[str, dict[str, list[dict]]] = {way: {"cold": [], "warm": []} for way in ways}
    with Workdir() as workdir:
        extension_dirs: dict[str, str] = {}
        # cold: every run compiles into its own empty cache; the order alternates (a b, b a, ...) because the
        # compile takes minutes and the load of a shared machine drifts over that time
        for repeat in range(cold_repeats):
            for way in list(ways) if repeat % 2 == 0 else list(reversed(ways)):
                print(f"  startup {way} cold {repeat + 1}/{cold_repeats}", flush=True)
                extension_dirs[way] = tempfile.mkdtemp(prefix=f"torch-ext-{way}-", dir=workdir)
                timeline = run_process(ways[way], workdir, {"TORCH_EXTENSIONS_DIR": extension_dirs[way]})
                if timeline.returncode == 0:
                    samples[way]["cold"].append(timeline.startup())
        for repeat in range(warm_repeats):  # interleaved, each way with the cache its last cold run filled
            for way, command in ways.items():
                print(f"  startup {way} warm {repeat + 1}/{warm_repeats}", flush=True)
                timeline = run_process(command, workdir, {"TORCH_EXTENSIONS_DIR": extension_dirs[way]})
                if timeline.returncode == 0:
                    samples[way]["warm"].append(timeline.startup())
    for way, by_kind in samples.items():
        out[way] = {kind: median_parts(runs) for kind, runs in by_kind.items()}
    for kind in ("cold", "warm"):
        out[f"ratio_{kind}"] = ratio(out["a_orch"][kind].get("total"), out["b_ray_deepspeed"][kind].get("total"))
    return out


def median_parts(runs: list[dict[str, Any]]) -> dict[str, Any]:
    parts: dict[str, Any] = {}
    for part in PARTS:
        values = [run[part] for run in runs if run.get(part) is not None]
        parts[part] = statistics.median(values) if values else None
    parts["n"] = len(runs)
    return parts


def table(result: dict[str, Any]) -> list[list[str]]:
    rows = [["way", "cache", *[f"{p} s" for p in PARTS]]]
    for way in ("a_orch", "b_ray_deepspeed"):
        for kind in ("cold", "warm"):
            parts = result.get(way, {}).get(kind, {})
            rows.append([way, f"{kind} (n={parts.get('n', 0)})", *["–" if parts.get(p) is None else f"{parts[p]:.1f}" for p in PARTS]])
    rows.append(["a/b total (target ≤1.1)", "cold / warm", _f(result.get("ratio_cold")), _f(result.get("ratio_warm")), *[""] * (len(PARTS) - 2)])
    return rows


def _f(value: Any) -> str:
    return "–" if value is None else f"{value:.2f}"
