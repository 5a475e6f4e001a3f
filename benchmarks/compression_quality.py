"""Compression quality on digits: what pruning, distillation and structured pruning keep. Figures, not a timed test.

The study runs in one process with plain PyTorch (no Ray, no DeepSpeed) so that the full version fits on 2 CPU
cores, but with the very pieces the recipes use: the built-in MLP and digits splits, `GradualPruning` (with
`MaskEnforcer` zeroing optimizer state), `kd_loss`, `prune_structured`, `quantize_dynamic_int8` and the pipeline
report's `measure` (size, gzip size, one-thread CPU latency). The shipped pipeline (conf/pipeline/digits_compress.yaml)
runs the same steps through Ray Train + DeepSpeed.

    python -m benchmarks.compression_quality            # full: 3 seeds, sparsity 0.80-0.98, both KD regimes
    python -m benchmarks.compression_quality --quick    # 1 seed, 3 sparsities, shorter training (a smoke run)
    python -m benchmarks.compression_quality --seeds 0 1 2 3 4 --sparsities 0.9 0.95
    python -m benchmarks.compression_quality --study transfer   # KD with a transfer set: a 16-unit student, 300 labels

Seed s means: digits split with split_seed=s (validation set and the 300-example labelled subset) and torch seed s.
Outputs: benchmarks/results/compression_quality.{json,md}, pruning_curve.png, and one MLflow run (experiment
"compression-quality"; --tracking-uri, default a sqlite store under benchmarks/results/) with the metrics and figures.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from orchestrator.compress import (
    FixedMasks,
    GradualPruning,
    kd_loss,
    prunable_parameters,
    transfer_kd_loss,
    prune_structured,
    quantize_dynamic_int8,
    realized_sparsity,
)
from orchestrator.data.digits import load_digits_splits
from orchestrator.models.mlp import MLP
from orchestrator.pipeline.report import measure
from orchestrator.track.tables import markdown_table

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Budget:
    """Optimizer steps (batch 64, AdamW, cosine schedule) of each phase."""

    teacher_steps: int = 2000
    prune_steps: int = 2000  # gradual pruning over the first 70%, then fine-tuning at fixed masks
    student_steps: int = 3000
    structured_steps: int = 1000


TEACHER = dict(hidden_sizes=[512, 512], lr=1e-3, weight_decay=1e-2)
STUDENT = dict(hidden_sizes=[64], lr=3e-3, weight_decay=1e-2)
PRUNE_LR = 5e-4
KD = dict(temperature=4.0, alpha=0.9)
BATCH = 64


def make_mlp(hidden_sizes: Sequence[int], seed: int) -> MLP:
    torch.manual_seed(seed)
    return MLP(input_shape=(1, 8, 8), num_classes=10, hidden_sizes=hidden_sizes)


def train(
    model: nn.Module,
    data: TensorDataset,
    steps: int,
    lr: float,
    seed: int,
    weight_decay: float = 0.0,
    loss_fn: Optional[Callable[[Tensor, Tensor, Tensor], Tensor]] = None,
    hook_factory: Optional[Callable[[torch.optim.Optimizer], object]] = None,
    transfer_inputs: Optional[Tensor] = None,
) -> nn.Module:
    """AdamW + cosine decay on shuffled batches of 64; `loss_fn(logits, inputs, targets)` defaults to cross-entropy.
    `hook_factory(optimizer)` builds a pruning hook after the optimizer exists (it zeroes its state too).
    `transfer_inputs`: a second stream of 64 of them per step (its own order, as recipe=distill's transfer set), run
    through the model with the labelled batch; `loss_fn(logits, inputs, targets, transfer_logits, transfer_batch)`."""
    inputs, targets = data.tensors
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    hook = hook_factory(optimizer) if hook_factory else None
    generator = torch.Generator().manual_seed(seed)
    transfer_generator = torch.Generator().manual_seed(seed + 1)
    order: list[int] = []
    transfer_order: list[int] = []
    model.train()
    for step in range(1, steps + 1):
        if len(order) < BATCH:
            order += torch.randperm(len(targets), generator=generator).tolist()
        batch, order = order[:BATCH], order[BATCH:]
        x, y = inputs[batch], targets[batch]
        if transfer_inputs is not None and loss_fn is not None:
            if len(transfer_order) < BATCH:
                transfer_order += torch.randperm(len(transfer_inputs), generator=transfer_generator).tolist()
            transfer_batch, transfer_order = transfer_inputs[transfer_order[:BATCH]], transfer_order[BATCH:]
            both = model(torch.cat([x, transfer_batch]))  # one forward, as the recipe does
            loss = loss_fn(both[:BATCH], x, y, both[BATCH:], transfer_batch)
        else:
            logits = model(x)
            loss = loss_fn(logits, x, y) if loss_fn else nn.functional.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if hook is not None:
            hook.on_step_end(step)
    if hook is not None:
        hook.remove()  # the zeros stay; the returned model is a plain module
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorDataset) -> float:
    inputs, targets = data.tensors
    return (model.eval()(inputs).argmax(-1) == targets).float().mean().item()


def copy_of(model: MLP, hidden_sizes: Sequence[int]) -> MLP:
    clone = MLP(input_shape=(1, 8, 8), num_classes=10, hidden_sizes=hidden_sizes)
    clone.load_state_dict(model.state_dict())
    return clone


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


# --- the three studies -------------------------------------------------------------------------------------------

def pruning_curve(seed: int, teacher: MLP, data, sparsities: Sequence[float], budget: Budget, scope: str) -> dict:
    """Gradual cubic pruning from the trained teacher to each sparsity, against a dense model trained as long."""
    dense = train(copy_of(teacher, TEACHER["hidden_sizes"]), data.train, budget.prune_steps, PRUNE_LR, seed + 100)
    row = {"dense_teacher": accuracy(teacher, data.val), "dense_same_steps": accuracy(dense, data.val)}
    end = int(0.7 * budget.prune_steps)
    for sparsity in sparsities:
        model = copy_of(teacher, TEACHER["hidden_sizes"])

        def hook(optimizer, model=model, sparsity=sparsity):
            return GradualPruning(prunable_parameters(model), final_sparsity=sparsity, start_step=0, end_step=end,
                                  frequency=max(1, end // 20), scope=scope, optimizer=optimizer)

        train(model, data.train, budget.prune_steps, PRUNE_LR, seed + 100, hook_factory=hook)
        row[f"{sparsity:.2f}"] = accuracy(model, data.val)
        row[f"{sparsity:.2f}_realized"] = realized_sparsity(prunable_parameters(model))
    return row


def distillation(seed: int, teacher: MLP, labelled: TensorDataset, data, budget: Budget) -> dict:
    """Student alone vs distilled student on the same labelled examples; gap closed = (kd - alone) / (t - alone)."""
    alone = train(make_mlp(STUDENT["hidden_sizes"], seed), labelled, budget.student_steps, STUDENT["lr"], seed,
                  STUDENT["weight_decay"])

    def kd(logits: Tensor, inputs: Tensor, targets: Tensor) -> Tensor:
        with torch.no_grad():
            teacher_logits = teacher(inputs)
        return kd_loss(logits, teacher_logits, targets, KD["temperature"], KD["alpha"])

    distilled = train(make_mlp(STUDENT["hidden_sizes"], seed), labelled, budget.student_steps, STUDENT["lr"], seed,
                      STUDENT["weight_decay"], loss_fn=kd)
    t, a, d = accuracy(teacher, data.val), accuracy(alone, data.val), accuracy(distilled, data.val)
    return {"teacher": t, "alone": a, "distilled": d, "gap_closed": (d - a) / (t - a) if t != a else float("nan")}


# --study transfer --recipe-defaults: the shipped recipes' settings (conf/model/mlp.yaml, conf/trainer/default.yaml:
# 300 steps, AdamW lr 3e-3, no weight decay, 2 workers x 32 = batch 64) for the teacher and the student
RECIPE_TEACHER = dict(hidden_sizes=[128, 128], lr=3e-3, weight_decay=0.0)
RECIPE_STEPS = 300


def transfer_distillation(seed: int, teacher: MLP, labelled: TensorDataset, data, budget: Budget,
                          hidden_sizes: Sequence[int], student_settings: Optional[dict] = None) -> dict:
    """A small student with few labels: alone, KD on the labelled examples only, and KD with a transfer set (every
    training input, labels ignored: recipe.distill.transfer_data=all_inputs), soft term on it, hard on the labels."""
    student = dict(student_settings or STUDENT, hidden_sizes=list(hidden_sizes))
    alone = train(make_mlp(student["hidden_sizes"], seed), labelled, budget.student_steps, student["lr"], seed,
                  student["weight_decay"])

    def kd(logits: Tensor, inputs: Tensor, targets: Tensor) -> Tensor:
        with torch.no_grad():
            teacher_logits = teacher(inputs)
        return kd_loss(logits, teacher_logits, targets, KD["temperature"], KD["alpha"])

    def kd_transfer(logits: Tensor, inputs: Tensor, targets: Tensor, transfer_logits: Tensor, transfer: Tensor) -> Tensor:
        with torch.no_grad():
            teacher_logits = teacher(transfer)
        return transfer_kd_loss(transfer_logits, teacher_logits, logits, targets, KD["temperature"], KD["alpha"])

    on_labels = train(make_mlp(student["hidden_sizes"], seed), labelled, budget.student_steps, student["lr"], seed,
                      student["weight_decay"], loss_fn=kd)
    with_transfer = train(make_mlp(student["hidden_sizes"], seed), labelled, budget.student_steps, student["lr"], seed,
                          student["weight_decay"], loss_fn=kd_transfer, transfer_inputs=data.train.tensors[0])
    return {"teacher": accuracy(teacher, data.val), "alone": accuracy(alone, data.val),
            "kd_labels_only": accuracy(on_labels, data.val), "kd_transfer_set": accuracy(with_transfer, data.val)}


def run_transfer_study(args, budget: Budget) -> None:
    """--study transfer: per seed a teacher on all labels, then the three students; means and ratios to 'alone'."""
    started = time.perf_counter()
    teacher_settings, student_settings = (RECIPE_TEACHER, dict(RECIPE_TEACHER)) if args.recipe_defaults else (TEACHER, STUDENT)
    if args.recipe_defaults:
        budget = Budget(teacher_steps=RECIPE_STEPS, student_steps=RECIPE_STEPS)
    per_seed = {}
    for seed in args.seeds:
        data = load_digits_splits(split_seed=seed)
        labelled = load_digits_splits(split_seed=seed, limit_train=args.labelled).train
        teacher = train(make_mlp(teacher_settings["hidden_sizes"], seed), data.train, budget.teacher_steps,
                        teacher_settings["lr"], seed, teacher_settings["weight_decay"])
        per_seed[seed] = transfer_distillation(seed, teacher, labelled, data, budget, args.student_hidden, student_settings)
        print(f"seed {seed}: {per_seed[seed]}", flush=True)
    columns = ("teacher", "alone", "kd_labels_only", "kd_transfer_set")
    rows = [{"seed": seed, **{c: f"{r[c]:.4f}" for c in columns}} for seed, r in per_seed.items()]
    means = {c: statistics.fmean(r[c] for r in per_seed.values()) for c in columns}
    rows.append({"seed": "mean", **{c: f"{means[c]:.4f}" for c in columns}})
    wins = sum(r["kd_transfer_set"] > r["alone"] for r in per_seed.values())
    summary = "\n".join([
        f"# KD with a transfer set on digits ({len(per_seed)} seeds; {time.perf_counter() - started:.0f} s)", "",
        f"Student MLP 64-{'-'.join(map(str, args.student_hidden))}-10 on {args.labelled} labelled examples, "
        f"{budget.student_steps} steps of batch 64 (+64 transfer inputs), lr {student_settings['lr']}, weight decay "
        f"{student_settings['weight_decay']}; teacher 64-{'-'.join(map(str, teacher_settings['hidden_sizes']))}-10 on "
        f"all labels, {budget.teacher_steps} steps; T={KD['temperature']}, alpha={KD['alpha']}. Transfer set: every "
        "training input (labels ignored).", "",
        markdown_table(rows),
        f"ratio to the student alone: KD on labels only {means['kd_labels_only'] / means['alone']:.4f}, KD with the "
        f"transfer set {means['kd_transfer_set'] / means['alone']:.4f}; the transfer set beats the student alone on "
        f"{wins} of {len(per_seed)} seeds", "",
    ])
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "compression_transfer_recipe_defaults" if args.recipe_defaults else "compression_transfer"
    stem += f"_T{KD['temperature']:g}_a{KD['alpha']:g}"
    (args.out / f"{stem}.json").write_text(json.dumps(
        {"budget": vars(budget), "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
         "seeds": per_seed, "means": means}, indent=2))
    (args.out / f"{stem}.md").write_text(summary)
    print(summary)


def structured(seed: int, teacher: MLP, data, ratios: Sequence[float], budget: Budget) -> list[dict]:
    """Whole neurons removed (a smaller dense model), then fine-tuned; measured like the pipeline report."""
    example = data.train.tensors[0][:2]
    dense = accuracy(teacher, data.val)
    rows = [{"model": "dense", "ratio": 0.0, "accuracy_before_finetune": dense, **measure(teacher, teacher, data, 256)}]
    rows.append({"model": "dense int8", "ratio": 0.0, "accuracy_before_finetune": dense,
                 **measure(teacher, quantize_dynamic_int8(teacher), data, 256)})
    for ratio in ratios:
        pruned = prune_structured(teacher, example, ratio)
        before = accuracy(pruned, data.val)
        # fine-tune with the weights it kept: no masks, every remaining weight trains
        train(pruned, data.train, budget.structured_steps, PRUNE_LR, seed + 200)
        rows.append({"model": f"structured {ratio:.0%}", "ratio": ratio, "accuracy_before_finetune": before,
                     **measure(pruned, pruned, data, 256)})
    return rows


def one_shot_control(seed: int, teacher: MLP, data, sparsity: float, budget: Budget) -> float:
    """One-shot pruning + the same fine-tuning, to show what the gradual schedule buys."""
    model = copy_of(teacher, TEACHER["hidden_sizes"])

    def hook(optimizer):
        return FixedMasks.one_shot(prunable_parameters(model), sparsity, optimizer=optimizer)

    train(model, data.train, budget.prune_steps, PRUNE_LR, seed + 100, hook_factory=hook)
    return accuracy(model, data.val)


# --- driver ------------------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 3 sparsities, a quarter of the steps")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.8, 0.85, 0.9, 0.95, 0.97, 0.98])
    parser.add_argument("--scopes", nargs="+", default=["layer", "global"])
    parser.add_argument("--labelled", type=int, default=300, help="labelled examples the limited-label student sees")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--from-json", type=Path, default=None, help="re-render summary, plot and MLflow run only")
    parser.add_argument("--study", choices=["all", "transfer"], default="all",
                        help="transfer: only KD with a transfer set vs the student alone (--student-hidden, --labelled)")
    parser.add_argument("--student-hidden", type=int, nargs="+", default=[16], help="--study transfer: student widths")
    parser.add_argument("--temperature", type=float, default=KD["temperature"], help="KD temperature (all studies)")
    parser.add_argument("--alpha", type=float, default=KD["alpha"], help="KD weight of the soft term (all studies)")
    parser.add_argument("--recipe-defaults", action="store_true",
                        help="--study transfer with the shipped recipes' settings (300 steps, lr 3e-3, teacher 128-128)")
    args = parser.parse_args()
    if args.from_json:
        results = json.loads(args.from_json.read_text())
        for key in ("seeds", "sparsities", "scopes", "labelled", "quick"):
            setattr(args, key, results["args"][key])
        results["seeds"] = {int(seed): value for seed, value in results["seeds"].items()}
        finish(results, args)
        return
    budget = Budget()
    if args.quick:
        args.seeds, args.sparsities, args.scopes = args.seeds[:1], [0.8, 0.9, 0.95], args.scopes[:1]
        budget = Budget(teacher_steps=500, prune_steps=500, student_steps=800, structured_steps=300)
    torch.set_num_threads(args.threads)
    KD.update(temperature=args.temperature, alpha=args.alpha)
    if args.study == "transfer":
        run_transfer_study(args, budget)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    results: dict = {"budget": vars(budget), "teacher": TEACHER, "student": STUDENT, "kd": KD, "args": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "seeds": {}}
    for seed in args.seeds:
        data = load_digits_splits(split_seed=seed)
        labelled = load_digits_splits(split_seed=seed, limit_train=args.labelled).train
        teacher = train(make_mlp(TEACHER["hidden_sizes"], seed), data.train, budget.teacher_steps, TEACHER["lr"], seed,
                        TEACHER["weight_decay"])
        per_seed = {"teacher_accuracy": accuracy(teacher, data.val)}
        for scope in args.scopes:
            per_seed[f"pruning_{scope}"] = pruning_curve(seed, teacher, data, args.sparsities, budget, scope)
            print(f"seed {seed} pruning ({scope}): {per_seed[f'pruning_{scope}']}", flush=True)
        per_seed["one_shot_0.90"] = one_shot_control(seed, teacher, data, 0.9, budget)
        per_seed["kd_limited"] = distillation(seed, teacher, labelled, data, budget)
        per_seed["kd_full"] = distillation(seed, teacher, data.train, data, budget)
        print(f"seed {seed} KD limited: {per_seed['kd_limited']}\nseed {seed} KD full: {per_seed['kd_full']}", flush=True)
        if seed == args.seeds[0]:
            per_seed["structured"] = structured(seed, teacher, data, args.ratios, budget)
        results["seeds"][seed] = per_seed
    results["elapsed_s"] = time.perf_counter() - started
    (args.out / "compression_quality.json").write_text(json.dumps(results, indent=2))
    finish(results, args)


def finish(results: dict, args) -> None:
    """Summary (markdown), curve (PNG) and the MLflow run, from the results."""
    args.out.mkdir(parents=True, exist_ok=True)
    summary = summarize(results, args)
    (args.out / "compression_quality.md").write_text(summary)
    figure = plot_curve(results, args)
    figure.savefig(args.out / "pruning_curve.png", dpi=120)
    log_to_mlflow(results, summary, args)
    print(summary)


def summarize(results: dict, args) -> str:
    seeds = list(results["seeds"].values())
    lines = [f"# Compression quality on digits ({len(seeds)} seed(s): {args.seeds}; {results['elapsed_s']:.0f} s)", ""]
    lines.append(f"Budget (steps of batch 64): {results['budget']}. Teacher MLP 64-512-512-10, student 64-64-10.\n")
    for scope in args.scopes:
        rows = []
        teacher = mean_std([s[f"pruning_{scope}"]["dense_teacher"] for s in seeds])
        same = mean_std([s[f"pruning_{scope}"]["dense_same_steps"] for s in seeds])
        rows.append({"sparsity": "dense teacher", "accuracy": f"{teacher[0]:.4f} ± {teacher[1]:.4f}", "vs dense (pt)": ""})
        rows.append({"sparsity": "dense, same extra steps", "accuracy": f"{same[0]:.4f} ± {same[1]:.4f}",
                     "vs dense (pt)": f"{100 * (same[0] - teacher[0]):+.2f}"})
        for sparsity in args.sparsities:
            acc = mean_std([s[f"pruning_{scope}"][f"{sparsity:.2f}"] for s in seeds])
            deltas = [100 * (s[f"pruning_{scope}"][f"{sparsity:.2f}"] - s[f"pruning_{scope}"]["dense_teacher"]) for s in seeds]
            rows.append({"sparsity": f"{sparsity:.2f}", "accuracy": f"{acc[0]:.4f} ± {acc[1]:.4f}",
                         "vs dense (pt)": f"{statistics.fmean(deltas):+.2f} (worst {min(deltas):+.2f})"})
        lines += [f"## Gradual magnitude pruning, {scope} scope", "", markdown_table(rows)]
    one_shot = mean_std([s["one_shot_0.90"] for s in seeds])
    lines.append(f"One-shot 90% + the same fine-tuning (layer scope): {one_shot[0]:.4f} ± {one_shot[1]:.4f}\n")
    for regime, title in (("kd_limited", f"{args.labelled} labelled examples"), ("kd_full", "all labels")):
        rows = [{"seed": seed, **{k: f"{v:.4f}" for k, v in s[regime].items() if k != "gap_closed"},
                 "gain (pt)": f"{100 * (s[regime]['distilled'] - s[regime]['alone']):+.2f}",
                 "gap closed": _percent(s[regime]["gap_closed"])} for seed, s in results["seeds"].items()]
        means = {k: statistics.fmean(s[regime][k] for s in seeds) for k in ("teacher", "alone", "distilled")}
        pooled = (means["distilled"] - means["alone"]) / (means["teacher"] - means["alone"]) if means["teacher"] != means["alone"] else float("nan")
        defined = [s[regime]["gap_closed"] for s in seeds if not math.isnan(s[regime]["gap_closed"])]
        lines += [f"## Distillation, student sees {title}", "", markdown_table(rows),
                  f"mean accuracy: teacher {means['teacher']:.4f}, student alone {means['alone']:.4f}, distilled "
                  f"{means['distilled']:.4f}; gap closed by the means: {_percent(pooled)}; per seed: "
                  f"{', '.join(_percent(g) for g in defined) or 'undefined (student alone = teacher)'}\n"]
    first = next(iter(results["seeds"].values()))
    lines += ["## Structured pruning (seed %s, fine-tuned)" % args.seeds[0], "", markdown_table(first["structured"])]
    return "\n".join(lines)


def _percent(value: float) -> str:
    return "n/a (alone = teacher)" if math.isnan(value) else f"{round(value, 2) or 0.0:.0%}"


def plot_curve(results: dict, args):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    seeds = list(results["seeds"].values())
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for scope in args.scopes:
        means = [statistics.fmean(s[f"pruning_{scope}"][f"{x:.2f}"] for s in seeds) for x in args.sparsities]
        errors = [statistics.stdev([s[f"pruning_{scope}"][f"{x:.2f}"] for s in seeds]) if len(seeds) > 1 else 0
                  for x in args.sparsities]
        axis.errorbar(args.sparsities, means, yerr=errors, marker="o", capsize=3, label=f"gradual, {scope} scope")
    dense = statistics.fmean(s[f"pruning_{args.scopes[0]}"]["dense_teacher"] for s in seeds)
    axis.axhline(dense, color="gray", linestyle="--", label="dense teacher")
    axis.axhline(dense - 0.01, color="gray", linestyle=":", label="dense - 1 pt")
    axis.set_xlabel("unstructured sparsity (prunable weights)")
    axis.set_ylabel("validation accuracy")
    axis.set_title(f"digits, MLP 64-512-512-10, {len(seeds)} seed(s)")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    return figure


def log_to_mlflow(results: dict, summary: str, args) -> None:
    import mlflow

    uri = args.tracking_uri or f"sqlite:///{args.out / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name("compression-quality") is None:
        location = (args.out / "mlartifacts").as_uri() if uri.startswith("sqlite") else None
        mlflow.create_experiment("compression-quality", artifact_location=location)
    mlflow.set_experiment("compression-quality")
    seeds = list(results["seeds"].values())
    with mlflow.start_run(run_name="quick" if args.quick else "full"):
        mlflow.log_params({"seeds": args.seeds, "labelled": args.labelled, **results["budget"]})
        for scope in args.scopes:
            for sparsity in args.sparsities:
                mean = statistics.fmean(s[f"pruning_{scope}"][f"{sparsity:.2f}"] for s in seeds)
                mlflow.log_metric(f"pruning_{scope}_accuracy", mean, step=round(sparsity * 100))
        for regime in ("kd_limited", "kd_full"):
            for key in ("teacher", "alone", "distilled"):
                mlflow.log_metric(f"{regime}_{key}_accuracy", statistics.fmean(s[regime][key] for s in seeds))
        mlflow.log_figure(plot_curve(results, args), "pruning_curve.png")
        mlflow.log_text(summary, "compression_quality.md")
        mlflow.log_dict(results, "compression_quality.json")


if __name__ == "__main__":
    main()
