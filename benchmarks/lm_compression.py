"""Language-model compression of the built-in GPT on a local text corpus: torchao int8 weight-only and dynamic vs
fp32, 2:4 sparsity (magnitude and wanda) with fine-tuning at fixed masks, and depth + width pruning (to under half the
parameters: fine-tuned, and distilled from the dense model with the distill recipe's `kd_loss`).

Plain PyTorch in one process (no Ray, no DeepSpeed) with the pieces the `prune` and `quantize` recipes use:
`quantize_model`, `input_feature_norms` + `wanda_scores`, `n_m_masks` held by `FixedMasks`, `drop_blocks` then
`prune_structured`, and the pipeline report's `measure` (size, one-thread CPU latency, validation perplexity).
Training and the corpus are benchmarks/gpt_head_pruning.py's (1 MB of Python standard-library source, byte tokens).

    python -m benchmarks.lm_compression            # 800 training steps, 300 fine-tuning steps per compressed row (600 for the half-size student)
    python -m benchmarks.lm_compression --quick    # 100 + 40 (+ 80) (a smoke run: the figures are not converged)

Every row is reported, misses included; the "dense + fine-tune" row is the control with the same total training.
Outputs: benchmarks/results/lm_compression.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
from hydra.utils import instantiate
from torch.utils.data import Subset

from benchmarks.gpt_head_pruning import BATCH, BLOCK, EVAL_BLOCKS, MODEL, RESULTS, stdlib_corpus, train
from orchestrator.compress import (
    FixedMasks,
    drop_blocks,
    input_feature_norms,
    n_m_masks,
    prunable_parameters,
    prune_structured,
    pruned_model_config,
    quantize_model,
    wanda_scores,
    weight_input_dims,
)
from orchestrator.data.splits import DataSplits
from orchestrator.data.text import load_text_splits
from orchestrator.pipeline.report import measure
from orchestrator.track.tables import markdown_table

CALIBRATION_BATCHES = 8


def two_four(model, data, criterion: str):
    """A copy of `model` pruned 2:4 along every Linear's input (head excluded), and its mask hook."""
    model = copy.deepcopy(model)
    params = prunable_parameters(model)
    dims = weight_input_dims(model, params)
    if criterion == "wanda":
        batches = [torch.stack([data.train[i][0] for i in range(b * BATCH, (b + 1) * BATCH)]) for b in range(CALIBRATION_BATCHES)]
        scores = wanda_scores(params, input_feature_norms(model, params, batches), dims)
    else:
        scores = {name: p.detach().abs() for name, p in params.items()}
    return model, FixedMasks(params, n_m_masks(scores, 2, 4, dims))


def run(quick: bool, seed: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    steps, finetune_steps = (100, 40) if quick else (800, 300)
    kd_steps = 2 * finetune_steps  # the half-size student has more to recover
    corpus = stdlib_corpus(RESULTS / "stdlib_corpus.txt")
    splits = load_text_splits(str(corpus), BLOCK)
    data = DataSplits(splits.train, Subset(splits.val, range(min(EVAL_BLOCKS, len(splits.val)))), task="lm")
    torch.manual_seed(seed)
    started = time.perf_counter()
    dense = train(instantiate(MODEL), data, steps, 3e-3, seed)
    rows = [{"model": "dense fp32", **measure(dense, dense, data, BATCH)}]
    for method in ("int8_weight_only", "int8_dynamic"):
        rows.append({"model": f"dense {method}", **measure(dense, quantize_model(dense, method), data, BATCH)})
    rows.append({"model": "dense + fine-tune", **measure(*[train(copy.deepcopy(dense), data, finetune_steps, 1e-3, seed)] * 2, data, BATCH)})
    for criterion in ("magnitude", "wanda"):
        pruned, hook = two_four(dense, data, criterion)
        before = measure(pruned, pruned, data, BATCH)["val_perplexity"]
        tuned = train(pruned, data, finetune_steps, 1e-3, seed)  # the hook's gradient hooks hold the zeros
        hook.remove()
        rows.append({"model": f"2:4 {criterion} + fine-tune", **measure(tuned, tuned, data, BATCH),
                     "val_perplexity_before_finetune": before})
    example = torch.stack([data.train[i][0] for i in range(2)])
    batches = [torch.stack([data.train[i][0] for i in range(b * BATCH, (b + 1) * BATCH)]) for b in range(CALIBRATION_BATCHES)]
    shorter, spec = drop_blocks(dense, MODEL, 1, batches)
    narrower = prune_structured(shorter, example, 0.25).eval()
    rebuilt = instantiate(pruned_model_config(spec, narrower))
    rebuilt.load_state_dict(narrower.state_dict())
    before = measure(rebuilt, rebuilt, data, BATCH)["val_perplexity"]
    tuned = train(rebuilt, data, finetune_steps, 1e-3, seed)
    rows.append({"model": "depth -1 block + width 0.25 + fine-tune", **measure(tuned, tuned, data, BATCH),
                 "val_perplexity_before_finetune": before})
    # under half the teacher's parameters (what pipeline=lm_compress ships: depth + width, then KD), trained as
    # long by fine-tuning alone and by distillation from the dense teacher: same steps, same data, same start
    halved = prune_structured(shorter, example, 0.5).eval()  # a copy: `shorter` stays as it was
    half = instantiate(pruned_model_config(spec, halved))
    half.load_state_dict(halved.state_dict())
    before = measure(half, half, data, BATCH)["val_perplexity"]
    for label, teacher in (("fine-tune", None), ("KD from dense", dense)):
        tuned = train(copy.deepcopy(half), data, kd_steps, 1e-3, seed, teacher=teacher)
        rows.append({"model": f"depth -1 block + width 0.5 + {label}", **measure(tuned, tuned, data, BATCH),
                     "val_perplexity_before_finetune": before})
    for row in rows:
        row["size_vs_dense"] = row["size_bytes"] / rows[0]["size_bytes"]
        row["latency_vs_dense"] = row["latency_ms"] / rows[0]["latency_ms"]
        row["perplexity_vs_dense"] = row["val_perplexity"] / rows[0]["val_perplexity"]
    return {"corpus": str(corpus), "corpus_bytes": corpus.stat().st_size, "train_steps": steps,
            "finetune_steps": finetune_steps, "kd_steps": kd_steps, "seed": seed, "model": MODEL, "rows": rows,
            "wall_s": time.perf_counter() - started, "torch_threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    result = run(args.quick, args.seed, args.threads)
    columns = ["model", "parameters", "sparsity", "size_bytes", "latency_ms", "val_perplexity",
               "val_perplexity_before_finetune", "size_vs_dense", "latency_vs_dense", "perplexity_vs_dense"]
    table = markdown_table([{c: row.get(c, "") for c in columns} for row in result["rows"]])
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    (RESULTS / f"lm_compression{suffix}.json").write_text(json.dumps(result, indent=2))
    (RESULTS / f"lm_compression{suffix}.md").write_text(table + "\n")
    print(table)
    print(f"corpus {result['corpus']} ({result['corpus_bytes']} bytes), {result['train_steps']} + "
          f"{result['finetune_steps']} steps, {result['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
