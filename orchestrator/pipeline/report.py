"""The compression report of a pipeline: every stage's model measured the same way, on the driver's CPU.

Per stage: total and non-zero parameters, sparsity, serialized size (torch.save of the state dict, as shipped,
and gzip of it, which is where unstructured sparsity pays), CPU latency of one batch (one thread, median), and
validation accuracy (or perplexity for language models). Written as CSV, markdown and a PNG of accuracy vs size.
"""

from __future__ import annotations

import gzip
import io
import statistics
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from hydra.utils import instantiate
from torch import nn

from orchestrator.compress import count_parameters
from orchestrator.track.tables import csv_table, markdown_table, print_table
from orchestrator.train.objective import evaluate_module

LATENCY_REPEATS = 50


def serialized_sizes(model: nn.Module) -> tuple[int, int]:
    """(bytes of torch.save(state_dict), bytes of the same gzip-compressed)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    raw = buffer.getvalue()
    return len(raw), len(gzip.compress(raw, compresslevel=6))


@torch.no_grad()
def cpu_latency_ms(model: nn.Module, batch: torch.Tensor, repeats: int = LATENCY_REPEATS) -> float:
    """Median wall time of one forward on `batch`, single-threaded so that runs on a shared machine compare."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model.eval()
        for _ in range(10):  # first calls pick kernels and allocate: not what a served model pays
            model(batch)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(batch)
            times.append((time.perf_counter() - start) * 1000)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(times)


def measure(fp32_model: nn.Module, served_model: nn.Module, data, batch_size: int) -> dict[str, Any]:
    """`fp32_model` gives the parameter counts; `served_model` (the same, or its int8 version) everything else."""
    total = count_parameters(fp32_model)
    nonzero = sum(int(p.count_nonzero()) for p in {id(p): p for p in fp32_model.parameters()}.values())
    size, size_gzip = serialized_sizes(served_model)
    indices = [i % len(data.val) for i in range(batch_size)]
    batch = torch.stack([data.val[i][0] for i in indices])
    quality = evaluate_module(served_model, data.val, data.task, batch_size)
    # one-thread CPU latency compares stages on any machine; a model quantized for CUDA (int4, fp8) has none
    on_cpu = next(served_model.parameters()).device.type == "cpu"
    row: dict[str, Any] = {
        "parameters": total,
        "nonzero_parameters": nonzero,
        "sparsity": 1.0 - nonzero / total if total else 0.0,
        "size_bytes": size,
        "size_gzip_bytes": size_gzip,
        "latency_ms": cpu_latency_ms(served_model, batch) if on_cpu else None,
    }
    if data.task == "lm":
        row["val_perplexity"] = quality["val_perplexity"]
        # CPU, one thread: comparable across stages
        row["tokens_per_s"] = batch.numel() / (row["latency_ms"] / 1000) if row["latency_ms"] else None
    else:
        row["val_accuracy"] = quality["val_accuracy"]
    return row


def stage_row(
    name: str, kind: str, run_id: str, model_dir: Path, data_cfg: Mapping[str, Any], batch_size: int, allowed: Iterable[str]
) -> dict[str, Any]:
    """`allowed`: the classes the stage's logged model.yaml may name (its config's trusted model targets)."""
    from orchestrator.artifacts.export import load_exported

    data = instantiate(dict(data_cfg))
    row = {"stage": name, "kind": kind, "run_id": run_id}
    fp32, served = load_exported(model_dir, quantized=False, allowed=allowed), load_exported(model_dir, allowed=allowed)
    row.update(measure(fp32, served, data, batch_size))
    return row


def summary_metrics(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """What a pipeline's parent run shows in the runs table: the final stage's quality and size, and how it compares
    with the first stage (ratios first / final: 4.0 means four times smaller; latency: times faster)."""
    first, final = rows[0], rows[-1]
    summary = {f"final_{key}": float(final[key]) for key in ("val_accuracy", "val_perplexity", "parameters",
                                                               "nonzero_parameters", "sparsity", "size_bytes",
                                                               "size_gzip_bytes", "latency_ms") if final.get(key) is not None}
    for key, name in (("size_bytes", "size_ratio"), ("size_gzip_bytes", "size_gzip_ratio"),
                      ("nonzero_parameters", "nonzero_parameters_ratio"), ("latency_ms", "latency_speedup")):
        if final.get(key) and first.get(key) is not None:
            summary[name] = float(first[key]) / float(final[key])
    for key in ("val_accuracy", "val_perplexity"):
        if key in final and key in first:
            summary[f"{key}_change"] = float(final[key]) - float(first[key])
    return summary


def write_report(rows: Sequence[Mapping[str, Any]], out_dir: Path, title: str) -> list[Path]:
    from orchestrator.track.plots import quality_vs_size

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "compression_report.csv", out_dir / "compression_report.md", out_dir / "accuracy_vs_size.png"]
    paths[0].write_text(csv_table(rows))
    paths[1].write_text(f"# {title}\n\n" + markdown_table(rows))
    figure = quality_vs_size(rows, title)
    figure.savefig(paths[2], dpi=120)
    return paths


HEADERS = {
    "parameters": "params",
    "nonzero_parameters": "non-zero",
    "size_bytes": "size",
    "size_gzip_bytes": "gzip",
    "latency_ms": "latency/batch",
    "val_accuracy": "accuracy",
    "val_perplexity": "perplexity",
    "tokens_per_s": "tokens/s",
}


def print_report(rows: Sequence[Mapping[str, Any]], console, title: str) -> None:
    columns = [column for column in rows[0] if column != "run_id"]
    headers = [HEADERS.get(column, column) for column in columns]
    cells = [[_show(column, row[column]) for column in columns] for row in rows]
    right = [HEADERS.get(column, column) for column in columns if column not in ("stage", "kind")]
    print_table(console, headers, cells, title=title, right=right)


def _show(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key.startswith("size"):
        return f"{value / 1024:.1f}K"
    if key == "latency_ms":
        return f"{value:.2f} ms"
    if key == "tokens_per_s":
        return f"{value:,.0f}"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
