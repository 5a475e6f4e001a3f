"""How a Plan and a finished run look in the terminal (rich)."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Optional, Sequence

import yaml
from rich.console import Console
from rich.table import Table

from orchestrator.pipeline.plan import PipelinePlan
from orchestrator.memory import MemoryEstimate
from orchestrator.plan import Plan
from orchestrator.track.tables import print_table

if TYPE_CHECKING:
    from orchestrator.stage_runner import StageResult


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    raise AssertionError("unreachable")


def print_plan(plan: Plan, console: Optional[Console] = None) -> None:
    console = console or Console()
    console.rule(f"[bold]plan[/bold] {plan.run_name}" + (" (resume)" if plan.resuming else ""))
    pipeline = isinstance(plan, PipelinePlan)
    for stage in plan.stages:
        console.print(f"[bold]resolved config[/bold] ({stage.name})" if pipeline else "[bold]resolved config[/bold]")
        console.print(yaml.safe_dump(stage.config, sort_keys=False), highlight=False, markup=False)
    if isinstance(plan, PipelinePlan):
        order = Table(title=f"pipeline {plan.name}: stages in dependency order")
        for column in ("stage", "kind", "reads", "cache key"):
            order.add_column(column)
        for stage in plan.stages:
            reads = ", ".join(f"{role}={reference}" for role, reference in stage.inputs.items())
            order.add_row(stage.name, stage.kind, reads, stage.key[:12])
        console.print(order)
    table = Table(title="stages")
    for column in ("stage", "recipe", "workers", "per worker", "placement", "backend", "precision", "ZeRO"):
        table.add_column(column)
    for stage in plan.stages:
        resources = ", ".join(f"{value:g} {name}" for name, value in stage.resources_per_worker.items())
        table.add_row(
            stage.name,
            stage.recipe,
            f"{stage.num_workers[0]}-{stage.num_workers[1]} (elastic)" if isinstance(stage.num_workers, tuple) else str(stage.num_workers),
            resources,
            stage.placement_strategy,
            stage.backend,
            f"auto: {stage.precision} (fp32 on CPUs without bf16)" if stage.config["trainer"]["precision"] == "auto" else stage.precision,
            str(stage.deepspeed["zero_optimization"]["stage"]),
        )
    console.print(table)
    for stage in plan.stages:
        print_memory(stage.name, stage.memory, stage.config["trainer"], console)
        console.print(f"[bold]DeepSpeed config[/bold] ({stage.name})")
        console.print_json(json.dumps(stage.deepspeed))
    console.print(f"checkpoints: {plan.storage_path}/{plan.run_name}")
    console.print(f"MLflow: {plan.tracking.uri} (experiment {plan.tracking.experiment!r})")


def print_memory(name: str, memory: MemoryEstimate, trainer: dict[str, Any], console: Console) -> None:
    """Per-worker memory: model states, activations, the process baseline, the total and whether it fits."""
    checkpointing = "on" if trainer.get("activation_checkpointing", False) else "off"
    estimate = Table(title=f"memory per worker ({name}: {memory.parameters:,} parameters, activation checkpointing {checkpointing})")
    columns = ["weights", "gradients", "optimizer states", "buffers", "activations", "runtime", "total"]
    values = [memory.weights, memory.gradients, memory.optimizer, memory.buffers, memory.activations, memory.runtime, memory.total]
    if memory.offloaded:
        columns.append("offloaded")
        values.append(memory.offloaded)
    for column in columns:
        estimate.add_column(column)
    cells = [human_bytes(v) for v in values]
    if not memory.activations_known:
        cells[4] = "unknown"
    estimate.add_row(*cells)
    console.print(estimate)
    if memory.budget is None:
        console.print(f"fit: not checked (budget {memory.budget_source})")
    elif memory.fits:
        console.print(f"fit: {human_bytes(memory.total)} fits in {human_bytes(memory.budget)} per worker ({memory.budget_source})")
    else:
        console.print(
            f"fit: [bold red]{human_bytes(memory.total)} does not fit[/bold red] in {human_bytes(memory.budget)} per worker "
            f"({memory.budget_source}); the cheapest change that fits: {memory.suggestion}"
        )


def plan_document(plan: Plan) -> dict[str, Any]:
    """`orch plan --json`: the plan as data, each stage's memory with its derived figures (total, fits)."""
    document = asdict(plan)
    for stage, data in zip(plan.stages, document["stages"]):
        data["memory"].update(model_states=stage.memory.model_states, total=stage.memory.total, fits=stage.memory.fits)
    return document


def print_summary(results: Sequence["StageResult"], console: Optional[Console] = None) -> None:
    console = console or Console()
    for result in results:
        console.rule(f"[bold green]done[/bold green] {result.stage} · {result.run_name}")
        metrics = sorted((key, value) for key, value in result.metrics.items() if key != "rank_weight_digests")
        rows = [[key, f"{value:.4f}" if isinstance(value, float) else str(value)] for key, value in metrics]
        print_table(console, ["metric", "value"], rows, show_header=False)
        console.print(f"MLflow run:  {result.run_id} (experiment {result.experiment_id}, {result.tracking_uri})")
        console.print(f"checkpoint:  {result.checkpoint_path}")
        if result.model_artifact_uri:
            console.print(f"model:       {result.model_artifact_uri} (safetensors + model.yaml; MLflow Model: mlflow_model/)")
        if result.registered_model_uri:
            console.print(f"registered:  {result.registered_model_uri}")
    if results and results[0].tracking_uri.startswith("sqlite:"):
        console.print("open the UI:  orch ui   (then http://127.0.0.1:5000)")
