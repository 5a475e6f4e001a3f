"""Driver side of a run: one Ray Train TorchTrainer per stage, owning that stage's MLflow run.

Per stage: open (or, on resume, reopen) the MLflow run → TorchTrainer with the recipe's worker loop → live progress →
export the final model from the last checkpoint → sparsity table, loss curves → close the run as FINISHED, FAILED or
KILLED. A recipe with `run_on_driver` instead of a worker loop (quantize) runs in this process, without Ray. A
pipeline (`plan.pipeline`) is driven by the `pipeline` recipe, which calls `run_stage` for every stage it runs.
"""

from __future__ import annotations

import importlib
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Optional, Sequence

from rich.console import Console

from orchestrator.launch.ray_session import cluster_capacity, ray_session, wait_for_ray, worker_env
from orchestrator.plan import Plan, StagePlan, TrackingPlan
from orchestrator.recipes import DRIVER_RECIPES
from orchestrator.track.lineage import CACHE_KEY_TAG
from orchestrator.train import timeline

if TYPE_CHECKING:
    from orchestrator.track.mlflow_run import StageRun


@dataclass
class StageResult:
    stage: str
    run_name: str
    run_id: str
    experiment_id: str
    tracking_uri: str
    metrics: dict[str, Any]
    checkpoint_path: Optional[str]
    model_artifact_uri: Optional[str]
    reused: bool = False  # a pipeline found this stage finished with the same config and inputs


def recipe_module(stage: StagePlan) -> ModuleType:
    return importlib.import_module(f"orchestrator.recipes.{stage.recipe}")


def needs_ray(stage: StagePlan) -> bool:
    """Known without importing the recipe (which imports torch), so that Ray can start while the driver imports."""
    return stage.recipe not in DRIVER_RECIPES


@contextmanager
def cluster_session(plan: Plan, in_background: bool = False) -> Iterator[None]:
    """One Ray for all of the plan's stages; on an existing cluster, every stage's resources are checked first.
    `in_background`: a local Ray starts while the block runs (see `ray_session`)."""
    cluster = plan.stages[0].config["cluster"]
    with ray_session(cluster, in_background=in_background):
        if cluster["kind"] != "local":
            from orchestrator.config.validate import validate_resources

            cpus, gpus = cluster_capacity()
            for stage in plan.stages:
                if needs_ray(stage):
                    validate_resources(stage.config, cpus, gpus, "the cluster")
        yield


def resolve_sources(stage: StagePlan, stage_runs: Mapping[str, str], tracking_uri: str) -> dict[str, dict[str, str]]:
    """The stage's model references as sources workers can fetch; a teacher not checked at plan time is checked
    here, before any worker starts."""
    if not stage.inputs:
        return {}
    from orchestrator.config.validate import validate_teacher_matches_student
    from orchestrator.track.model_source import model_source, source_model_config

    sources = {role: model_source(reference, tracking_uri, stage_runs) for role, reference in stage.inputs.items()}
    teacher = sources.get("teacher")
    if teacher is not None and "stage" not in teacher and "run_id" in teacher:
        key = "recipe.distill.teacher"
        validate_teacher_matches_student(key, source_model_config(teacher, key), stage.config["model"])
    return sources


def run_plan(plan: Plan, console: Optional[Console] = None) -> list[StageResult]:
    console = console or Console()
    if plan.pipeline is not None:
        from orchestrator.recipes.pipeline import run_pipeline

        return run_pipeline(plan, console)
    [stage] = plan.stages
    sources = resolve_sources(stage, {}, plan.tracking.uri)
    if not needs_ray(stage):
        return [run_stage(plan.tracking, stage, console, resuming=plan.resuming, sources=sources)]
    with cluster_session(plan, in_background=True):  # Ray starts while the MLflow run and the trainer are set up
        return [run_stage(plan.tracking, stage, console, resuming=plan.resuming, sources=sources)]


def run_stage(
    tracking_plan: TrackingPlan,
    stage: StagePlan,
    console: Console,
    resuming: bool,
    sources: Mapping[str, Mapping[str, str]],
    parent_run_id: Optional[str] = None,
    tags: Optional[Mapping[str, str]] = None,
    train_callbacks: Sequence[Any] = (),
) -> StageResult:
    """`train_callbacks`: Ray Train callbacks added to the fit (a sweep's trial forwards reports to Tune with one)."""
    from orchestrator.track.mlflow_run import StageRun

    recipe = recipe_module(stage)
    tracking = StageRun(tracking_plan)
    run_id = tracking.start(stage, resuming, parent_run_id, tags)
    status = "FAILED"
    try:
        with tempfile.TemporaryDirectory(prefix="orch-export-") as out:
            model_dir = Path(out) / "model"
            if hasattr(recipe, "run_on_driver"):
                metrics = recipe.run_on_driver(stage.config, sources, model_dir)
                tracking.mlflow.log_metrics(metrics)
                checkpoint_path = None
            else:
                metrics, checkpoint_path = _fit(recipe, stage, sources, tracking, console, model_dir, train_callbacks)
            model_uri = None
            if model_dir.is_dir():
                tracking.mlflow.log_artifacts(str(model_dir), "model")
                tracking.log_compression(model_dir, stage.config["recipe"])
                model_uri = f"runs:/{run_id}/model"
                tracking.mlflow.set_tag(CACHE_KEY_TAG, stage.key)  # only a run whose model was logged can be reused
        status = "FINISHED"
        return StageResult(
            stage=stage.name,
            run_name=stage.run_name,
            run_id=run_id,
            experiment_id=tracking.experiment_id,
            tracking_uri=tracking_plan.uri,
            metrics=metrics,
            checkpoint_path=checkpoint_path,
            model_artifact_uri=model_uri,
        )
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracking.finish(status)


def _fit(
    recipe: ModuleType,
    stage: StagePlan,
    sources: Mapping[str, Mapping[str, str]],
    tracking: "StageRun",
    console: Console,
    model_dir: Path,
    callbacks: Sequence[Any] = (),
) -> tuple[dict[str, Any], str]:
    """One Ray Train fit of the recipe's worker loop; exports the final model into `model_dir` when tracked."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from orchestrator.launch.progress import ProgressBoard, run_with_progress

    trainer_cfg = stage.config["trainer"]
    wait_for_ray()
    board = ProgressBoard.remote()
    trainer = TorchTrainer(
        recipe.train_loop_per_worker,
        train_loop_config={
            "config": stage.config,
            "deepspeed": stage.deepspeed,
            "precision_auto": trainer_cfg["precision"] == "auto",
            "tracking": {
                "uri": tracking.tracking.uri,
                "run_id": tracking.run_id,
                "system_metrics": stage.config["tracking"]["system_metrics"],
            },
            "sources": dict(sources),
            "progress": board,
        },
        torch_config=TorchConfig(backend=stage.backend),
        scaling_config=ray.train.ScalingConfig(
            num_workers=stage.num_workers,
            use_gpu=stage.use_gpu,
            resources_per_worker=stage.resources_per_worker,
            placement_strategy=stage.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=stage.ray_name,
            storage_path=stage.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=trainer_cfg["max_failures"]),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=trainer_cfg["keep_checkpoints"]),
            worker_runtime_env={"env_vars": worker_env(stage.config["cluster"], stage.use_gpu)},
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            callbacks=list(callbacks) or None,
        ),
    )
    label = f"{stage.name} · {stage.run_name}"
    timeline.mark("fit_start")
    result = run_with_progress(trainer.fit, board, trainer_cfg["max_steps"], label, console)
    failure = ray.get(board.failure_reported.remote())
    if failure is not None and failure["kind"] == "diverged":
        from orchestrator.train.steps import TrainingDiverged

        raise TrainingDiverged(failure["step"])
    if stage.config["tracking"]["log_model"]:
        from orchestrator.train.export import export_model

        with result.checkpoint.as_directory() as checkpoint_dir:
            export_model(checkpoint_dir, stage.config["model"], model_dir)
    tracking.mlflow.set_tag("orch.checkpoint", result.checkpoint.path)
    tracking.log_curves(label)
    return dict(result.metrics or {}), result.checkpoint.path
