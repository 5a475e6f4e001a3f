"""GPU throughput and MFU of the GPT at a size that fills a GPU: tokens/s and model FLOPs utilisation of `orch run`.

GPT-2-small shape (12 layers, 12 heads, width 768, context 1024; ~85 M parameters with the byte-level vocabulary,
whose embedding is tiny), bf16, ZeRO-2, NCCL, one worker per visible GPU (trainer=gpu). The corpus is the bundled
text sample repeated to a few MB (content does not matter for speed). MFU = tokens/s × training FLOPs per token
(the model's `estimate_flops_per_token`: 6N + 12·L·H·Q·T) / (GPUs × peak bf16 FLOP/s of the device, from
orchestrator/train/mfu.py's table or --peak-tflops via ORCH_PEAK_TFLOPS). Without CUDA it records "not run".
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from benchmarks.harness import REPO, Workdir, orch_command, run_process, summarize

SHAPE = {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024}
MICRO_BATCH = 16


def flops_per_token() -> float:
    from orchestrator.models.gpt import GPT
    from orchestrator.train.mfu import flops_per_sample

    return flops_per_sample(GPT(vocab_size=256, **SHAPE), tokens_per_sample=1)


def tokens_per_s(step_time_s: float, gpus: int, micro_batch: int = MICRO_BATCH, block_size: int = SHAPE["block_size"]) -> float:
    return micro_batch * block_size * gpus / step_time_s


def run(quick: bool) -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"skipped": "not run: no CUDA on this machine"}
    from orchestrator.train.mfu import mfu, peak_flops_for

    gpus = torch.cuda.device_count()
    name = torch.cuda.get_device_name()
    override = float(os.environ["ORCH_PEAK_TFLOPS"]) if os.environ.get("ORCH_PEAK_TFLOPS") else None
    peak = peak_flops_for(name, override)
    steps, warmup = (40, 10) if quick else (120, 20)
    with Workdir() as workdir:
        corpus = Path(workdir) / "corpus.txt"
        sample = (REPO / "orchestrator" / "data" / "sample.txt").read_bytes()
        corpus.write_bytes(sample * (8_000_000 // len(sample) + 1))
        overrides = [
            "trainer=gpu", "model=gpt", "data=text", f"data.path={corpus}", f"data.block_size={SHAPE['block_size']}",
            f"model.n_layer={SHAPE['n_layer']}", f"model.n_head={SHAPE['n_head']}", f"model.n_embd={SHAPE['n_embd']}",
            f"trainer.num_workers={gpus}", f"trainer.cpus_per_worker={max(1, (os.cpu_count() or 2) // gpus - 1)}",
            "trainer.zero_stage=2", "trainer.precision=bf16", f"trainer.micro_batch_size={MICRO_BATCH}",
            f"trainer.max_steps={steps}", "trainer.eval_every=0", "trainer.checkpoint_every=0", "tracking.log_model=false",
        ]  # fmt: skip
        if override:
            overrides.append(f"trainer.peak_tflops={override}")
        timeline = run_process(orch_command(overrides), workdir)
    stats = summarize(timeline.steady(warmup))
    out: dict[str, Any] = {
        "device": name,
        "gpus": gpus,
        "shape": SHAPE,
        "micro_batch": MICRO_BATCH,
        "failed": timeline.returncode != 0,
        "step_time_median_s": stats["median"],
        "flops_per_token": flops_per_token(),
        "peak_flops_per_gpu": peak,
    }
    if stats["median"]:
        out["tokens_per_s"] = tokens_per_s(stats["median"], gpus)
        if peak:
            out["mfu"] = mfu(out["tokens_per_s"], out["flops_per_token"], gpus, peak)
    if timeline.returncode != 0:
        out["error_tail"] = timeline.output[-2000:]
    return out


def table(result: dict[str, Any]) -> list[list[str]]:
    if "skipped" in result:
        return [["gpu_mfu", result["skipped"]]]
    mfu_value = result.get("mfu")
    return [
        ["device", "GPUs", "step ms", "tokens/s", "MFU (target ≥40 %)"],
        [
            str(result["device"]),
            str(result["gpus"]),
            "–" if result["step_time_median_s"] is None else f"{result['step_time_median_s'] * 1e3:.1f}",
            "–" if result.get("tokens_per_s") is None else f"{result['tokens_per_s']:.0f}",
            "–" if mfu_value is None else f"{mfu_value:.1%}",
        ],
    ]


