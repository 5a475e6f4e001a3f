"""The cost of resuming on another number of workers: DeepSpeed's universal conversion of the default GPT's ZeRO-2
checkpoint (`model=gpt data=text`), against one training step and one checkpoint save of the same engine, measured
in one process (a group of one, as the converting rank runs it), medians of `--repeats`.

    python -m benchmarks.universal_conversion [--repeats 3] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence


def _group_of_one() -> None:
    import deepspeed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="gloo")


def measure(repeats: int, steps: int) -> dict[str, Any]:
    import torch
    from hydra.utils import instantiate
    from pyarrow.fs import LocalFileSystem

    from orchestrator.config import compose
    from orchestrator.plan import build_plan
    from orchestrator.train.checkpoints import Candidate, Layout, convert_to_universal
    from orchestrator.train.engine import build_engine, checkpoint_tag
    from orchestrator.train.objective import task_loss

    work = Path(tempfile.mkdtemp(prefix="orch-bench-universal-"))
    plan = build_plan(compose(["model=gpt", "data=text", "trainer.zero_stage=2", "trainer.precision=fp32",
                               "trainer.num_workers=1", f"name=bench-{os.getpid()}"]), cwd=work)
    [stage] = plan.stages
    _group_of_one()
    engine = build_engine(instantiate(stage.config["model"]), stage.deepspeed, stage.config["trainer"]["optimizer"], False)
    micro, block = stage.config["trainer"]["micro_batch_size"], stage.config["data"]["block_size"]
    vocab = stage.config["model"]["vocab_size"]
    tokens = torch.randint(0, vocab, (micro, block + 1))
    step_times = []
    for _ in range(steps + 2):
        start = time.perf_counter()
        loss = task_loss(engine(tokens[:, :-1]), tokens[:, 1:])
        engine.backward(loss)
        engine.step()
        step_times.append(time.perf_counter() - start)
    step_times = step_times[2:]  # the first steps allocate optimizer state
    save_times, convert_times = [], []
    for repeat in range(repeats):
        checkpoint = work / f"checkpoint_step_{repeat:08d}"
        start = time.perf_counter()
        engine.save_checkpoint(str(checkpoint), tag=checkpoint_tag(repeat))
        save_times.append(time.perf_counter() - start)
        candidate = Candidate(repeat, 0, str(checkpoint), LocalFileSystem(), Layout(1, 2, micro, 1), checkpoint_tag(repeat))
        start = time.perf_counter()
        convert_to_universal(candidate)
        convert_times.append(time.perf_counter() - start)
    step, save, convert = (statistics.median(x) for x in (step_times, save_times, convert_times))
    size = sum(p.stat().st_size for p in (work / "checkpoint_step_00000000").rglob("*") if p.is_file())
    return {
        "model": "gpt (defaults)",
        "parameters": sum(p.numel() for p in engine.module.parameters()),
        "checkpoint_bytes": size,
        "step_s_median": step,
        "save_s_median": save,
        "convert_s_median": convert,
        "convert_per_step": convert / step,
        "convert_per_save": convert / save,
        "repeats": repeats,
        "steps": steps,
    }


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    result = measure(args.repeats, args.steps)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
