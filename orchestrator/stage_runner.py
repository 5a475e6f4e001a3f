"""Driver side of a run: one Ray Train TorchTrainer per stage, owning that stage's MLflow run.

Per stage: open (or, on resume, reopen) the MLflow run → TorchTrainer with the recipe's worker loop → live progress →
export the final model from the last checkpoint → loss curves → close the run as FINISHED, FAILED or KILLED.
"""

from __future__ import annotations

import importlib
import tempfile
from dataclasses import dataclass
from typing import Any, Optional

from rich.console import Console

from orchestrator.launch.ray_session import cluster_capacity, ray_session, worker_env
from orchestrator.plan import Plan, StagePlan


@dataclass
class StageResult:
    stage: str
    run_name: str
    run_id: str
    experiment_id: str
    tracking_uri: str
    metrics: dict[str, Any]
    checkpoint_path: str
    model_artifact_uri: Optional[str]


def run_plan(plan: Plan, console: Optional[Console] = None) -> list[StageResult]:
    console = console or Console()
    cluster = plan.stages[0].config["cluster"]
    with ray_session(cluster):
        if cluster["kind"] != "local":
            from orchestrator.config.validate import validate_resources

            cpus, gpus = cluster_capacity()
            for stage in plan.stages:
                validate_resources(stage.config, cpus, gpus, "the cluster")
        return [run_stage(plan, stage, console) for stage in plan.stages]


def run_stage(plan: Plan, stage: StagePlan, console: Console) -> StageResult:
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from orchestrator.launch.progress import ProgressBoard, run_with_progress
    from orchestrator.track.mlflow_run import StageRun

    recipe = importlib.import_module(f"orchestrator.recipes.{stage.recipe}")
    trainer_cfg = stage.config["trainer"]
    tracking = StageRun(plan.tracking)
    run_id = tracking.start(plan, stage)
    status = "FAILED"
    try:
        board = ProgressBoard.remote()
        trainer = TorchTrainer(
            recipe.train_loop_per_worker,
            train_loop_config={
                "config": stage.config,
                "deepspeed": stage.deepspeed,
                "precision_auto": trainer_cfg["precision"] == "auto",
                "tracking": {
                    "uri": plan.tracking.uri,
                    "run_id": run_id,
                    "system_metrics": stage.config["tracking"]["system_metrics"],
                },
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
                name=plan.run_name,
                storage_path=plan.storage_path,
                failure_config=ray.train.FailureConfig(max_failures=trainer_cfg["max_failures"]),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=trainer_cfg["keep_checkpoints"]),
                worker_runtime_env={"env_vars": worker_env(stage.config["cluster"], stage.use_gpu)},
                logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            ),
        )
        label = f"{stage.name} · {plan.run_name}"
        result = run_with_progress(trainer.fit, board, trainer_cfg["max_steps"], label, console)

        model_uri = None
        with result.checkpoint.as_directory() as checkpoint_dir:
            if stage.config["tracking"]["log_model"]:
                from orchestrator.train.export import export_model

                with tempfile.TemporaryDirectory(prefix="orch-export-") as out:
                    export_model(checkpoint_dir, stage.config["model"], out)
                    tracking.mlflow.log_artifacts(out, "model")
                model_uri = f"runs:/{run_id}/model"
        tracking.mlflow.set_tag("orch.checkpoint", result.checkpoint.path)
        tracking.log_curves(label)
        status = "FINISHED"
        return StageResult(
            stage=stage.name,
            run_name=plan.run_name,
            run_id=run_id,
            experiment_id=tracking.experiment_id,
            tracking_uri=plan.tracking.uri,
            metrics=dict(result.metrics or {}),
            checkpoint_path=result.checkpoint.path,
            model_artifact_uri=model_uri,
        )
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracking.finish(status)
