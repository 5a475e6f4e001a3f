"""ZeRO stages × precision: step time and peak memory per worker of `orch run`, for ZeRO 0/1/2/3 × fp32/bf16.

With --quick only ZeRO 0 and 3 in bf16. 2 workers, the small GPT made a little wider (4 layers, width 128,
~0.8 M parameters) so model states are not entirely lost in the process's baseline. Memory per worker is the peak
resident set size of each worker process (getrusage ru_maxrss, written by every rank at the end of training): on CPU
that includes torch, Ray and DeepSpeed themselves (~hundreds of MiB), so differences between stages are what to
read. The plan's model-state estimate (weights + gradients + optimizer, ZeRO paper §3) is listed beside it.
"""

from __future__ import annotations

from typing import Any

from benchmarks.harness import Workdir, common_overrides, orch_command, run_process, summarize

WORKERS = 2
WIDER = ["model.n_layer=4", "model.n_embd=128"]


def model_state_bytes(zero: int, precision: str) -> int:
    from orchestrator.config import compose
    from orchestrator.plan import build_plan

    overrides = [*common_overrides("gpt", WORKERS, 1, 10, precision=precision, zero=zero), *WIDER]
    return build_plan(compose(overrides)).stages[0].memory.total


def run(quick: bool) -> dict[str, Any]:
    from orchestrator.train.engine import cpu_has_native_bf16

    steps, warmup = (30, 10) if quick else (80, 20)
    # bf16 without AVX512-BF16/AMX is emulated, ~9x slower per matmul: fewer steps keep the cell to minutes
    emulated = not cpu_has_native_bf16()
    out: dict[str, Any] = {
        "settings": {"model": "gpt n_layer=4 n_embd=128", "workers": WORKERS, "steps": steps, "warmup": warmup, "bf16_emulated": emulated}
    }
    with Workdir() as workdir:
        for precision in ("bf16",) if quick else ("fp32", "bf16"):
            for zero in (0, 3) if quick else (0, 1, 2, 3):
                steps, warmup = ((30, 10) if quick else (80, 20)) if precision == "fp32" or not emulated else (20, 5)
                print(f"  zero_precision zero={zero} {precision}", flush=True)
                overrides = [
                    *common_overrides("gpt", WORKERS, 1, steps, precision=precision, zero=zero),
                    *WIDER,
                    "trainer.eval_every=0",
                    "trainer.checkpoint_every=0",
                ]
                timeline = run_process(orch_command(overrides), workdir)
                stats = summarize(timeline.steady(warmup))
                out[f"zero{zero}_{precision}"] = {
                    "steps": steps,
                    "step_time_median_s": stats["median"],
                    "step_time_iqr_s": stats["iqr"],
                    "peak_rss_per_worker_bytes": timeline.peak_rss,
                    "max_peak_rss_bytes": max(timeline.peak_rss.values()) if timeline.peak_rss else None,
                    "model_state_estimate_bytes": model_state_bytes(zero, precision),
                    "failed": timeline.returncode != 0,
                }
    return out


def table(result: dict[str, Any]) -> list[list[str]]:
    rows = [["ZeRO", "precision", "step ms (IQR)", "peak RSS / worker MiB (max of ranks)", "model states (plan) KiB"]]
    for key, e in result.items():
        if key == "settings":
            continue
        zero, precision = key.split("_")
        step = "–" if e["step_time_median_s"] is None else f"{e['step_time_median_s'] * 1e3:.1f} ({e['step_time_iqr_s'] * 1e3:.1f})"
        rss = "–" if e["max_peak_rss_bytes"] is None else f"{e['max_peak_rss_bytes'] / 2**20:.0f}"
        rows.append([zero.removeprefix("zero"), precision, step, rss, f"{e['model_state_estimate_bytes'] / 1024:.0f}"])
    return rows
