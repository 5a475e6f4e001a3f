"""Attention-head and MLP-unit pruning of the built-in GPT: perplexity, size and CPU latency, dense vs pruned.

Plain PyTorch in one process (no Ray, no DeepSpeed) with the pieces the `prune` recipe uses: the built-in GPT,
`prune_structured` (torch-pruning, whole heads), `pruned_model_config` (the smaller model rebuilt from its config)
and the pipeline report's `measure` (size, gzip size, one-thread CPU latency, validation perplexity). The shipped
pipeline conf/pipeline/text_structured.yaml runs the same steps through Ray Train + DeepSpeed.

    python -m benchmarks.gpt_head_pruning                    # corpus: 1 MB of Python standard-library source
    python -m benchmarks.gpt_head_pruning --corpus FILE.txt  # your own text
    python -m benchmarks.gpt_head_pruning --quick            # shorter training (a smoke run)

Byte-level tokens, block 64, batch 32, AdamW + cosine, one torch thread by default (--threads; on a shared machine
more threads than free cores slow PyTorch's CPU kernels down several-fold). Perplexity is measured on the first
`EVAL_BLOCKS` validation blocks (32k tokens), latency with one thread on a batch of 32. Ratios r remove ceil(r * n_head) heads and r of the MLP
hidden units in every block, ranked by weight magnitude; each pruned model is fine-tuned for `finetune_steps`, and so
is a copy of the dense model (the control row: same total training).
Outputs: benchmarks/results/gpt_head_pruning.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sysconfig
import time
from pathlib import Path
from typing import Sequence

import torch
from hydra.utils import instantiate
from torch import nn
from torch.utils.data import Subset

from orchestrator.compress import prune_structured, pruned_model_config
from orchestrator.data.splits import DataSplits
from orchestrator.data.text import load_text_splits
from orchestrator.pipeline.report import measure
from orchestrator.track.tables import markdown_table

RESULTS = Path(__file__).resolve().parent / "results"
BLOCK, BATCH, EVAL_BLOCKS = 64, 32, 512
MODEL = {"_target_": "orchestrator.models.gpt.GPT", "vocab_size": 256, "block_size": BLOCK, "n_layer": 4, "n_head": 8, "n_embd": 128}


def stdlib_corpus(target: Path, limit_bytes: int = 1_000_000) -> Path:
    """Deterministic local text (no downloads): the Python standard library's source, in sorted file order."""
    if target.exists():
        return target
    chunks, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = path.read_bytes()
        chunks.append(text)
        size += len(text)
        if size >= limit_bytes:
            break
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"".join(chunks)[:limit_bytes])
    return target


def train(model: nn.Module, data, steps: int, lr: float, seed: int, teacher: nn.Module | None = None,
          temperature: float = 2.0, alpha: float = 0.5) -> nn.Module:
    """`teacher`: distil from it (the recipe's token-level `kd_loss`) instead of training on the labels alone."""
    from orchestrator.compress.distill import kd_loss

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        picks = torch.randint(len(data.train), (BATCH,), generator=generator).tolist()
        inputs = torch.stack([data.train[i][0] for i in picks])
        targets = torch.stack([data.train[i][1] for i in picks])
        if teacher is None:
            loss = nn.functional.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        else:
            with torch.no_grad():
                taught = teacher(inputs)
            loss = kd_loss(model(inputs), taught, targets, temperature, alpha)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    return model.eval()


def run(
    quick: bool = False, corpus: Path | None = None, ratios: Sequence[float] = (0.25, 0.5), seed: int = 0, threads: int = 1
) -> dict:
    torch.set_num_threads(threads)
    steps, finetune_steps = (100, 40) if quick else (800, 300)
    corpus = corpus or stdlib_corpus(RESULTS / "stdlib_corpus.txt")
    splits = load_text_splits(str(corpus), BLOCK)
    data = DataSplits(splits.train, Subset(splits.val, range(min(EVAL_BLOCKS, len(splits.val)))), task="lm")
    torch.manual_seed(seed)
    started = time.perf_counter()
    dense = train(instantiate(MODEL), data, steps, 3e-3, seed)
    rows = [{"model": "dense", "heads_per_block": MODEL["n_head"], **measure(dense, dense, data, BATCH)}]
    # control: the dense model fine-tuned for as many more steps as each pruned one gets
    dense_tuned = train(copy.deepcopy(dense), data, finetune_steps, 1e-3, seed)
    rows.append({"model": "dense + fine-tune", "heads_per_block": MODEL["n_head"], **measure(dense_tuned, dense_tuned, data, BATCH)})
    example = torch.stack([data.train[i][0] for i in range(2)])
    for ratio in ratios:
        pruned = prune_structured(dense, example, ratio).eval()
        before = measure(pruned, pruned, data, BATCH)["val_perplexity"]
        rebuilt = instantiate(pruned_model_config(MODEL, pruned))  # what the prune recipe exports and reloads
        rebuilt.load_state_dict(pruned.state_dict())
        tuned = train(rebuilt, data, finetune_steps, 1e-3, seed)
        rows.append({
            "model": f"pruned {ratio:.2f}",
            "heads_per_block": tuned.blocks[0].attn.n_head,
            **measure(tuned, tuned, data, BATCH),
            "val_perplexity_before_finetune": before,
        })
    dense_row = rows[0]
    for row in rows:
        row["parameters_vs_dense"] = row["parameters"] / dense_row["parameters"]
        row["latency_vs_dense"] = row["latency_ms"] / dense_row["latency_ms"]
    return {
        "corpus": str(corpus), "corpus_bytes": corpus.stat().st_size, "train_steps": steps,
        "finetune_steps": finetune_steps, "seed": seed, "model": MODEL, "rows": rows,
        "wall_s": time.perf_counter() - started, "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--corpus", type=Path)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    result = run(args.quick, args.corpus, args.ratios, args.seed, args.threads)
    columns = ["model", "heads_per_block", "parameters", "size_bytes", "latency_ms", "val_perplexity",
               "val_perplexity_before_finetune", "parameters_vs_dense", "latency_vs_dense"]
    table = markdown_table([{c: row.get(c, "") for c in columns} for row in result["rows"]])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "gpt_head_pruning.json").write_text(json.dumps(result, indent=2))
    (RESULTS / "gpt_head_pruning.md").write_text(table + "\n")
    print(table)
    print(f"corpus {result['corpus']} ({result['corpus_bytes']} bytes), {result['train_steps']} + "
          f"{result['finetune_steps']} steps, {result['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
