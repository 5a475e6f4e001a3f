"""The GPU path in one command: `python -m benchmarks.gpu_check` (one GPU, one worker, ~4 min on an H200).

Three short `orch run`s of a ~127 M-parameter GPT (18 layers × 768, byte vocabulary, context 1024) with `trainer=gpu`:
bf16 ZeRO-2 (tokens/s and MFU, as benchmarks/gpu_mfu.py measures them), bf16 ZeRO-3 with activation checkpointing
(where this branch's trainer schema has the key; otherwise ZeRO-3 alone, and the JSON says so), and fp16 with
DeepSpeed's dynamic loss scaling. Each run's predicted GPU memory (orch plan's total) is read beside its measured
peak (`torch.cuda.max_memory_allocated`), both logged by the run as memory/* MLflow metrics.

Prints one JSON object. Exits 1 when any run fails, logs a non-finite loss or lacks its metrics; without CUDA it says
so in the JSON and exits 0 (nothing to check here).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

from benchmarks.gpu_mfu import tokens_per_s
from benchmarks.harness import REPO, Workdir, orch_command, run_process, summarize

SHAPE = {"n_layer": 18, "n_head": 12, "n_embd": 768, "block_size": 1024}
MICRO_BATCH = 16
STEPS, WARMUP = 40, 10
RUN_TIMEOUT_S = 150  # a run took 73-83 s on an H200, mostly start-up; three stay under 8 minutes even if one hangs


def has_checkpointing_key() -> bool:
    from orchestrator.config.schema import TrainerConfig

    return any(f.name == "activation_checkpointing" for f in dataclasses.fields(TrainerConfig))


def flops_per_token() -> float:
    import torch

    from orchestrator.models.gpt import GPT
    from orchestrator.train.mfu import flops_per_sample

    with torch.device("meta"):  # shapes only: the count needs no memory
        model = GPT(vocab_size=256, **SHAPE)
    return flops_per_sample(model, tokens_per_sample=1)


def configurations() -> dict[str, list[str]]:
    zero3 = ["trainer.zero_stage=3", "trainer.precision=bf16"]
    if has_checkpointing_key():
        zero3.append("trainer.activation_checkpointing=true")
    return {
        "bf16_zero2": ["trainer.zero_stage=2", "trainer.precision=bf16"],
        "fp16_zero2_dynamic_loss_scale": ["trainer.zero_stage=2", "trainer.precision=fp16"],
        "bf16_zero3_checkpointing" if has_checkpointing_key() else "bf16_zero3": zero3,
    }


def last_metrics(tracking_uri: str, run_name: str, keys: list[str]) -> dict[str, Optional[float]]:
    """The last value of each metric of the stage run tagged with `run_name`, read from the run's MLflow store."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("orchestrator")
    if experiment is None:
        return {key: None for key in keys}
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`orch.run_name` = '{run_name}'")
    metrics = runs[0].data.metrics if runs else {}
    return {key: metrics.get(key) for key in keys}


def check(name: str, overrides: list[str], workdir: Path, corpus: Path, peak: Optional[float]) -> dict[str, Any]:
    command = [
        "trainer=gpu", "model=gpt", "data=text", f"data.path={corpus}", f"data.block_size={SHAPE['block_size']}",
        f"model.n_layer={SHAPE['n_layer']}", f"model.n_head={SHAPE['n_head']}", f"model.n_embd={SHAPE['n_embd']}",
        "trainer.num_workers=1", f"trainer.cpus_per_worker={max(1, (os.cpu_count() or 2) - 2)}",
        f"trainer.micro_batch_size={MICRO_BATCH}", f"trainer.max_steps={STEPS}", "trainer.log_every=10",
        "trainer.eval_every=0", "trainer.checkpoint_every=0", "tracking.log_model=false", "tracking.system_metrics=false",
        "trainer.max_failures=0",  # a check fails at once: a worker-group restart would only repeat the failure
        f"name=gpu-check-{name.replace('_', '-')}", *overrides,
    ]  # fmt: skip
    started = time.monotonic()
    timeline = run_process(orch_command(command), workdir, extra_env={"DS_ACCELERATOR": "cuda"}, timeout_s=RUN_TIMEOUT_S)
    wall_s = round(time.monotonic() - started, 1)
    stats = summarize(timeline.steady(WARMUP))
    metrics = last_metrics(
        f"sqlite:///{workdir / 'mlflow.db'}",
        f"gpu-check-{name.replace('_', '-')}",
        ["loss", "tokens_per_s", "mfu", "memory/predicted_bytes", "memory/measured_peak_bytes", "memory/measured_over_predicted"],
    )
    out: dict[str, Any] = {
        "overrides": overrides, "returncode": timeline.returncode, "wall_s": wall_s, "step_time_median_s": stats["median"]
    }
    if stats["median"]:
        out["tokens_per_s"] = tokens_per_s(stats["median"], 1, MICRO_BATCH, SHAPE["block_size"])
        if peak:
            from orchestrator.train.mfu import mfu

            out["mfu"] = mfu(out["tokens_per_s"], flops_per_token(), 1, peak)
    out.update(
        loss=metrics["loss"],
        logged_mfu=metrics["mfu"],
        predicted_gpu_memory_bytes=metrics["memory/predicted_bytes"],
        measured_gpu_memory_bytes=metrics["memory/measured_peak_bytes"],
        measured_over_predicted=metrics["memory/measured_over_predicted"],
    )
    problems = []
    if timeline.returncode != 0:
        problems.append(f"orch run exited {timeline.returncode}")
    if metrics["loss"] is None or not math.isfinite(metrics["loss"]):
        problems.append(f"loss {metrics['loss']!r}")
    if metrics["memory/measured_peak_bytes"] is None:
        problems.append("no memory/* metrics")
    out["ok"] = not problems
    if problems:
        out["problems"] = problems
        out["output_tail"] = timeline.output[-1500:]
    return out


def main() -> int:
    import argparse

    argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="ORCH_PEAK_TFLOPS overrides the GPU's peak for MFU."
    ).parse_args()
    import torch

    if not torch.cuda.is_available():
        print(json.dumps({"cuda": False, "ok": True, "skipped": "not run: no CUDA device on this machine"}))
        return 0
    from orchestrator.train.mfu import peak_flops_for

    name = torch.cuda.get_device_name()
    override = float(os.environ["ORCH_PEAK_TFLOPS"]) if os.environ.get("ORCH_PEAK_TFLOPS") else None
    peak = peak_flops_for(name, override)
    result: dict[str, Any] = {"cuda": True, "device": name, "shape": SHAPE, "micro_batch": MICRO_BATCH, "steps": STEPS}
    if not has_checkpointing_key():
        result["note"] = "trainer.activation_checkpointing is not in this branch's schema: the ZeRO-3 run has none"
    with Workdir() as workdir:
        corpus = Path(workdir) / "corpus.txt"
        sample = (REPO / "orchestrator" / "data" / "sample.txt").read_bytes()
        corpus.write_bytes(sample * (8_000_000 // len(sample) + 1))
        result["runs"] = {}
        for key, overrides in configurations().items():
            result["runs"][key] = check(key, overrides, Path(workdir), corpus, peak)
            print(json.dumps({key: result["runs"][key]}), file=sys.stderr, flush=True)  # kept if a later run hangs
    result["ok"] = all(run["ok"] for run in result["runs"].values())
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
