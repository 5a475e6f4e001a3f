"""Step overhead: the same training run three ways, and what orch costs per step on top of the other two.

(a) `orch run` (MLflow tracking and its defaults on, validation and mid-run checkpoints off so that every way does
    the same work between steps), (b) a hand-written Ray Train + DeepSpeed script (benchmarks/baselines/
    ray_deepspeed.py), (c) a plain single-process PyTorch loop (benchmarks/baselines/plain_torch.py; 1 worker only).
Same model, data, micro-batch 32, fp32, ZeRO-0, AdamW (torch's), clipping 1.0 and torch threads per worker
(set explicitly: trainer.threads_per_worker in (a), torch.set_num_threads in (b) and (c)).

Repeats are interleaved a, b, c, a, b, c, ... so drifting load on a shared machine hits all three alike, and each
repeat's ratio a_i/b_i compares two runs made back to back under the same load: the median of these paired ratios
(with their range) is the steadiest figure when the machine's load drifts between repeats, as it does with 2
workers on 2 cores, where per-run medians spread by ±25 %. A step's
time is measured end to end on rank 0 (between the ends of consecutive optimizer steps); the first `warmup` steps
are dropped. Reported per way: the median of the runs' medians, the IQR of all steady steps pooled, the mean
(which, unlike the median, includes the periodic logging steps), and the median CPU time per step of the training
process (all its threads): on a shared machine the wall-time ratios move with other jobs' load, the CPU-time ratios
much less, so with 1 worker (nothing to wait for) they are the better measure of the work each way adds.
"""

from __future__ import annotations

from typing import Any

from benchmarks.harness import (
    MODELS,
    Workdir,
    common_overrides,
    orch_command,
    plain_command,
    ray_baseline_command,
    ratio,
    run_process,
    summarize,
)

FULL = {"repeats": 5, "workers": [1, 2], "steps": {"mlp": 400, "gpt": 150}, "warmup": {"mlp": 50, "gpt": 20}}
QUICK = {"repeats": 1, "workers": [1], "steps": {"mlp": 200, "gpt": 60}, "warmup": {"mlp": 30, "gpt": 10}}
THREADS = 1


def commands(model: str, workers: int, steps: int) -> dict[str, list[str]]:
    ways = {
        "a_orch": orch_command(
            [*common_overrides(model, workers, THREADS, steps), "trainer.eval_every=0", "trainer.checkpoint_every=0"]
        ),
        "b_ray_deepspeed": ray_baseline_command(model, workers, THREADS, steps),
    }
    if workers == 1:
        ways["c_plain_torch"] = plain_command(model, THREADS, steps)
    return ways


def measure(model: str, workers: int, steps: int, warmup: int, repeats: int) -> dict[str, Any]:
    per_way: dict[str, dict[str, list]] = {}
    per_repeat: list[dict[str, float]] = []  # each repeat's median step time per way, for the paired ratios
    with Workdir() as workdir:
        for repeat in range(repeats):
            per_repeat.append({})
            for way, command in commands(model, workers, steps).items():
                print(f"  step_overhead {model} workers={workers} {way} repeat {repeat + 1}/{repeats}", flush=True)
                timeline = run_process(command, workdir)
                runs = per_way.setdefault(way, {"medians": [], "steady": [], "cpu_medians": [], "failed": 0})
                steady = timeline.steady(warmup)
                if timeline.returncode != 0 or not steady:
                    runs["failed"] += 1
                    continue
                runs["medians"].append(summarize(steady)["median"])
                per_repeat[-1][way] = runs["medians"][-1]
                cpu = timeline.steady_cpu(warmup)
                if cpu:
                    runs["cpu_medians"].append(summarize(cpu)["median"])
                runs["steady"].extend(steady)
    tokens = MODELS[model]["tokens"]
    results: dict[str, Any] = {}
    for way, runs in per_way.items():
        median = summarize(runs["medians"])["median"]
        cpu_median = summarize(runs["cpu_medians"])["median"] if runs["cpu_medians"] else None
        pooled = summarize(runs["steady"])
        results[way] = {
            "step_time_median_s": median,
            "step_time_iqr_s": pooled["iqr"],
            "step_time_mean_s": pooled["mean"],
            "run_medians_s": runs["medians"],
            "cpu_time_median_s": cpu_median,
            "run_cpu_medians_s": runs["cpu_medians"],
            "failed_runs": runs["failed"],
            "samples_per_s": 32 * workers / median if median else None,
            **({"tokens_per_s": 32 * workers * tokens / median} if median and tokens > 1 else {}),
        }
    med = {way: results[way]["step_time_median_s"] for way in results}
    mean = {way: results[way]["step_time_mean_s"] for way in results}
    cpu = {way: results[way]["cpu_time_median_s"] for way in results}
    paired = paired_ratios(per_repeat, "a_orch", "b_ray_deepspeed")
    results["ratios"] = {
        "a/b_median": ratio(med.get("a_orch"), med.get("b_ray_deepspeed")),
        "a/b_paired": summarize(paired)["median"] if paired else None,
        "a/b_paired_runs": paired,
        "a/b_mean": ratio(mean.get("a_orch"), mean.get("b_ray_deepspeed")),
        "a/b_cpu": ratio(cpu.get("a_orch"), cpu.get("b_ray_deepspeed")),
        **(
            {
                "a/c_median": ratio(med.get("a_orch"), med.get("c_plain_torch")),
                "a/c_mean": ratio(mean.get("a_orch"), mean.get("c_plain_torch")),
                "b/c_median": ratio(med.get("b_ray_deepspeed"), med.get("c_plain_torch")),
                "a/c_cpu": ratio(cpu.get("a_orch"), cpu.get("c_plain_torch")),
                "b/c_cpu": ratio(cpu.get("b_ray_deepspeed"), cpu.get("c_plain_torch")),
            }
            if "c_plain_torch" in med
            else {}
        ),
    }
    return results


def paired_ratios(per_repeat: list[dict[str, float]], numerator: str, denominator: str) -> list[float]:
    """a_i / b_i for every repeat in which both ways ran."""
    return [r[numerator] / r[denominator] for r in per_repeat if r.get(numerator) and r.get(denominator)]


def run(quick: bool) -> dict[str, Any]:
    settings = QUICK if quick else FULL
    out: dict[str, Any] = {"settings": {**settings, "threads_per_worker": THREADS, "precision": "fp32", "zero": 0, "micro_batch": 32}}
    for model in ("mlp", "gpt"):
        for workers in settings["workers"]:
            out[f"{model}_w{workers}"] = measure(
                model, workers, settings["steps"][model], settings["warmup"][model], settings["repeats"]
            )
    return out


TARGETS = {"a/b_median": 1.03, "a/c_median": 1.05}


def table(result: dict[str, Any]) -> list[list[str]]:
    """Rows for the report: one per model and worker count."""
    rows = [[
        "case", "(a) orch ms", "(b) Ray+DS ms", "(c) plain ms", "a/b (target ≤1.03)", "a/b paired: median (range)",
        "a/c (target ≤1.05)", "a/b of means",
        "CPU ms per step a / b / c", "CPU a/b", "CPU a/c",
    ]]  # fmt: skip
    for case, data in result.items():
        if case == "settings":
            continue

        def ms(way: str) -> str:
            entry = data.get(way)
            if not entry or entry["step_time_median_s"] is None:
                return "–"
            return f"{entry['step_time_median_s'] * 1e3:.2f} (IQR {entry['step_time_iqr_s'] * 1e3:.2f})"

        r = data["ratios"]
        cpu = " / ".join("–" if not data.get(w) or data[w].get("cpu_time_median_s") is None else f"{data[w]['cpu_time_median_s'] * 1e3:.2f}" for w in ("a_orch", "b_ray_deepspeed", "c_plain_torch"))
        paired = r.get("a/b_paired_runs") or []
        paired_text = f"{fmt(r.get('a/b_paired'))} ({fmt(min(paired))}–{fmt(max(paired))})" if paired else "–"
        rows.append([
            case, ms("a_orch"), ms("b_ray_deepspeed"), ms("c_plain_torch"), fmt(r.get("a/b_median")), paired_text,
            fmt(r.get("a/c_median")),
            fmt(r.get("a/b_mean")), cpu, fmt(r.get("a/b_cpu")), fmt(r.get("a/c_cpu")),
        ])  # fmt: skip
    return rows


def fmt(value: Any, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"
