"""Run a pipeline: a declared list of stages (conf/pipeline/) in dependency order, driven from this process.

`run_pipeline` reads top to bottom:
  parent   one MLflow parent run for the pipeline (reopened by `resume=<name>`)
  stages   for each stage, in dependency order:
             sources  its input/teacher stage names → the MLflow runs whose `model` artifact it will load
             reuse    a FINISHED run with the same cache key that read the same input runs: nothing to run
             run      otherwise a child run, through `orchestrator.stage_runner.run_stage`; Ray starts with the first
                      stage that needs workers and serves all the others (a driver-side recipe, quantize, needs none). Under `resume=`, a
                      stage this pipeline run started and did not finish continues from its last checkpoint.
  report   every stage's model measured on the driver's CPU (`orchestrator.pipeline.report`): printed, and logged
           to the parent run as CSV, markdown and a PNG of accuracy vs size; the final stage against the first as
           the parent's metrics (final_val_accuracy, size_ratio ...), so the runs table compares pipelines
  register the final stage's model in the Model Registry: with `pipeline.promote`, only if every gate passes
           (`orchestrator.pipeline.promote`; the decision is recorded on the parent run); else when
           tracking.register_as names one
A failure marks the parent FAILED; running the same pipeline again reuses the finished stages and starts at the
one that failed.
"""

from __future__ import annotations

import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Mapping, Optional, Sequence

from rich.console import Console

from orchestrator.artifacts.source import fetch_model_dir, model_source
from orchestrator.config.trust import trusted_model_targets
from orchestrator.launch.ray_session import RaySession
from orchestrator.pipeline.lineage import PipelineRun, input_tags
from orchestrator.pipeline.plan import PipelinePlan
from orchestrator.pipeline.promote import is_enabled, promote_final
from orchestrator.pipeline.report import print_report, stage_row, summary_metrics, write_report
from orchestrator.stage_runner import (
    StageResult,
    cluster_session,
    needs_ray,
    register_result,
    resolve_sources,
    run_stage,
)
from orchestrator.track.mlflow_run import closed_with_outcome, log_file_attached


def run_pipeline(
    plan: PipelinePlan, console: Optional[Console] = None, log_file: Optional[Path] = None,
    nested_in: Optional[str] = None, tags: Optional[Mapping[str, str]] = None,
) -> list[StageResult]:
    """`log_file`: the run's log, logged to every stage's MLflow run and to the pipeline's. `nested_in`, `tags`: the
    parent run's own parent and tags (a sweep's trial: `orchestrator.sweep.trial`)."""
    console = console or Console()
    # --- parent ---
    lineage = PipelineRun(plan.tracking)
    lineage.start(plan, nested_in, tags)
    console.rule(f"[bold]pipeline[/bold] {plan.name} · {plan.run_name}")
    Path(plan.storage_path, plan.run_name).mkdir(parents=True, exist_ok=True)  # what resume= looks for
    results: dict[str, StageResult] = {}
    with closed_with_outcome(lineage.finish), log_file_attached(lineage.parent.log_artifact, log_file):
        with ExitStack() as ray:
            session: Optional[RaySession] = None
            # --- stages ---
            for stage in plan.stages:
                stage_runs = {name: result.run_id for name, result in results.items()}
                sources = resolve_sources(stage, stage_runs, plan.tracking.uri)
                reusable = lineage.find_finished(stage, sources) if plan.cache or plan.resuming else None
                if reusable is not None:
                    lineage.record_reuse(stage, reusable)
                    results[stage.name] = _reused(stage.name, stage.run_name, reusable, plan.tracking.uri)
                    console.print(f"[green]reused[/green] {stage.name} ({stage.kind}): run {reusable.info.run_id}")
                else:
                    if needs_ray(stage) and session is None:
                        session = ray.enter_context(cluster_session(stage.config["cluster"], plan.stages))
                    resuming = plan.resuming and lineage.has_unfinished(stage)
                    tags = input_tags(stage, sources, plan.run_name)
                    results[stage.name] = run_stage(
                        plan.tracking, stage, console, resuming, sources, parent_run_id=lineage.run_id, tags=tags,
                        log_file=log_file,
                    )
                lineage.record_stage(stage, results[stage.name].run_id)

        # --- report ---
        rows = []
        with tempfile.TemporaryDirectory(prefix="orch-report-") as scratch:
            for stage in plan.stages:
                source = model_source(results[stage.name].run_id, plan.tracking.uri, {})
                model_dir = fetch_model_dir(source, Path(scratch) / stage.name)
                rows.append(
                    stage_row(stage.name, stage.kind, results[stage.name].run_id, model_dir,
                              stage.config["data"], plan.report_batch_size, trusted_model_targets(stage.config))
                )
            title = f"compression report · {plan.run_name}"
            write_report(rows, Path(scratch) / "report", title)
            lineage.log_report(str(Path(scratch) / "report"))
            lineage.log_summary(summary_metrics(rows))
        print_report(rows, console, title)
        # --- register: the final stage's model, if its promotion gates pass, or if tracking.register_as asks ---
        final = plan.stages[-1]
        promote = plan.config.get("promote")
        if is_enabled(promote):
            result = results[final.name]
            result.registered_model_uri = promote_final(promote, rows, result.tracking_uri, result.run_id, lineage.parent, console)
        else:
            register_result(results[final.name], final.config["tracking"])
    return [results[stage.name] for stage in plan.stages]


def run_shared_stages(plan: PipelinePlan, names: Sequence[str], nested_in: str, console: Console) -> dict[str, str]:
    """The stages in `names` (with their inputs among them), each found FINISHED in the stage cache or else run once,
    as a child of `nested_in`; stage name -> run id. Why: pipeline runs that start together (a sweep's concurrent
    trials) would each miss the cache for a stage none has finished yet and train it once per run; run here first,
    the stage is one run that every pipeline run then reuses (`PipelineRun.find_finished`). Ray is the caller's."""
    lineage = PipelineRun(plan.tracking)
    runs: dict[str, str] = {}
    for stage in plan.stages:
        if stage.name not in names:
            continue
        sources = resolve_sources(stage, runs, plan.tracking.uri)
        found = lineage.find_finished(stage, sources)
        if found is not None:
            console.print(f"[green]reused[/green] {stage.name} ({stage.kind}): run {found.info.run_id}")
            runs[stage.name] = found.info.run_id
            continue
        tags = input_tags(stage, sources, plan.run_name)
        runs[stage.name] = run_stage(plan.tracking, stage, console, False, sources, parent_run_id=nested_in, tags=tags).run_id
    return runs


def _reused(stage: str, run_name: str, run, tracking_uri: str) -> StageResult:
    return StageResult(
        stage=stage,
        run_name=run_name,
        run_id=run.info.run_id,
        experiment_id=run.info.experiment_id,
        tracking_uri=tracking_uri,
        metrics=dict(run.data.metrics),
        checkpoint_path=run.data.tags.get("orch.checkpoint"),
        model_artifact_uri=f"runs:/{run.info.run_id}/model",
        reused=True,
    )
