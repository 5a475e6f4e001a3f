"""Driver side of a run: one Ray Train TorchTrainer per stage, owning that stage's MLflow run.

Per stage: open (or, on resume, reopen) the MLflow run → TorchTrainer with the recipe's worker loop → live progress →
export the final model from the last checkpoint → sparsity table, loss curves → close the run as FINISHED, FAILED or
KILLED. A recipe whose config says `runs_on: driver` (quantize) runs its `run_on_driver` in this process, without
Ray. The recipe module is loaded by name (`recipe.name`); nothing here knows which recipes exist. Pipelines and sweeps
(`orchestrator.pipeline`, `orchestrator.sweep`) are layers above: they call `run_stage` for each stage or trial.
"""

from __future__ import annotations

import importlib
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Optional, Sequence, TypeVar

from rich.console import Console

from orchestrator import timeline
from orchestrator.config.trust import trusted_model_targets
from orchestrator.launch.ray_session import (
    RaySession,
    cluster_capacity,
    ray_session,
    worker_env,
)
from orchestrator.plan import Plan, StagePlan, TrackingPlan
from orchestrator.track.mlflow_run import CACHE_KEY_TAG, closed_with_outcome, source_tags

if TYPE_CHECKING:
    from orchestrator.track.mlflow_run import StageRun

T = TypeVar("T")


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
    registered_model_uri: Optional[str] = None  # models:/NAME/VERSION when tracking.register_as registered it


def recipe_module(stage: StagePlan) -> ModuleType:
    return importlib.import_module(f"orchestrator.recipes.{stage.recipe}")


def needs_ray(stage: StagePlan) -> bool:
    """Read from the recipe's config, not its module (which imports torch), so that Ray can start while the driver
    imports."""
    return stage.config["recipe"]["runs_on"] == "workers"


@contextmanager
def cluster_session(
    cluster: Mapping[str, Any], stages: Sequence[StagePlan], in_background: bool = False
) -> Iterator[RaySession]:
    """One Ray for all of these stages; on an existing cluster, every stage's resources are checked first.
    `in_background`: a local Ray starts while the block runs (see `ray_session`)."""
    with ray_session(cluster, in_background=in_background) as session:
        if cluster["kind"] != "local":
            from orchestrator.config.validate import validate_resources

            cpus, gpus = cluster_capacity()
            for stage in stages:
                if needs_ray(stage):
                    validate_resources(stage.config, cpus, gpus, "the cluster")
        yield session


def resolve_sources(stage: StagePlan, stage_runs: Mapping[str, str], tracking_uri: str) -> dict[str, dict[str, str]]:
    """The stage's model references as sources workers can fetch; a teacher not checked at plan time is checked
    here, before any worker starts."""
    if not stage.inputs:
        return {}
    from orchestrator.artifacts.source import model_source, source_model_config
    from orchestrator.config.reads import recipe_reads
    from orchestrator.config.validate import validate_teacher_matches_student

    keys = {role: f"recipe.{key}" for role, (key, _) in recipe_reads(stage.config["recipe"]).items()}
    sources = {
        role: model_source(reference, tracking_uri, stage_runs, keys.get(role, role))
        for role, reference in stage.inputs.items()
    }
    teacher = sources.get("teacher")
    if teacher is not None and "stage" not in teacher and "run_id" in teacher:
        key = "recipe.distill.teacher"
        teacher_model = source_model_config(teacher, key, trusted_model_targets(stage.config))
        validate_teacher_matches_student(key, teacher_model, stage.config["model"])
    return sources


def run_plan(plan: Plan, console: Optional[Console] = None, log_file: Optional[Path] = None) -> list[StageResult]:
    """Run a single-stage plan (`orchestrator.plan.build_plan`); its model is registered if the config asks.
    `log_file`: the run's log, logged to its MLflow run."""
    console = console or Console()
    [stage] = plan.stages
    if plan.resuming and needs_ray(stage):
        adopt_resumed_layout(stage)  # a one-line error before Ray starts if the new layout cannot continue the run
    sources = resolve_sources(stage, {}, plan.tracking.uri)
    tags = source_tags(sources)
    if not needs_ray(stage):
        result = run_stage(plan.tracking, stage, console, resuming=plan.resuming, sources=sources, tags=tags, log_file=log_file)
    else:
        # Ray starts while the MLflow run and the trainer are set up
        with cluster_session(stage.config["cluster"], plan.stages, in_background=True) as session:
            result = run_stage(plan.tracking, stage, console, resuming=plan.resuming, sources=sources, tags=tags, session=session,
                               log_file=log_file)
    register_result(result, stage.config["tracking"])
    return [result]


def register_result(result: StageResult, tracking: Mapping[str, Any]) -> None:
    """`tracking.register_as=NAME`: the result's model becomes a new version of NAME, with `tracking.alias` on it."""
    if not tracking.get("register_as"):
        return
    if result.model_artifact_uri is None:
        from orchestrator.config.validate import ConfigError

        raise ConfigError("tracking.register_as", tracking["register_as"], f"stage {result.stage} logged no model to register")
    from orchestrator.track.mlflow_run import register_model

    result.registered_model_uri = register_model(result.tracking_uri, result.run_id, tracking["register_as"], tracking["alias"])


def run_stage(
    tracking_plan: TrackingPlan,
    stage: StagePlan,
    console: Console,
    resuming: bool,
    sources: Mapping[str, Mapping[str, str]],
    parent_run_id: Optional[str] = None,
    tags: Optional[Mapping[str, str]] = None,
    train_callbacks: Sequence[Any] = (),
    session: Optional[RaySession] = None,
    log_file: Optional[Path] = None,
) -> StageResult:
    """`train_callbacks`: Ray Train callbacks added to the fit (a sweep's trial forwards reports to Tune with one).
    `session`: the Ray this stage's workers run on, waited for before the fit (none: Ray is up already).
    `log_file`: the run's log (`orchestrator.launch.run_log`), logged as `logs/driver.log` when the stage ends."""
    from orchestrator.track.mlflow_run import StageRun, log_file_attached

    recipe = recipe_module(stage)
    if resuming and needs_ray(stage):
        adopt_resumed_layout(stage)
    tracking = StageRun(tracking_plan)
    run_id = tracking.start(stage, resuming, parent_run_id, tags)
    with (
        closed_with_outcome(tracking.finish),
        log_file_attached(tracking.log_artifact, log_file),
        tempfile.TemporaryDirectory(prefix="orch-export-") as out,
    ):
        model_dir = Path(out) / "model"
        if not needs_ray(stage):
            metrics = recipe.run_on_driver(stage.config, sources, model_dir)
            tracking.log_metrics(metrics)
            checkpoint_path = None
        else:
            if session is not None:
                session.wait()
            metrics, checkpoint_path = _fit(recipe, stage, sources, tracking, console, model_dir, train_callbacks)
        model_uri = None
        if model_dir.is_dir():
            _save_mlflow_model(model_dir, stage, tracking)
            tracking.log_artifacts(model_dir, "model")
            tracking.log_compression(model_dir, stage.config["recipe"], trusted_model_targets(stage.config))
            model_uri = f"runs:/{run_id}/model"
            tracking.set_tag(CACHE_KEY_TAG, stage.key)  # only a run whose model was logged can be reused
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


def run_storage(stage: StagePlan) -> tuple[Any, str]:
    """(pyarrow filesystem, path) of the stage's run folder in its storage (a local path or a URI)."""
    from pyarrow.fs import FileSystem, LocalFileSystem

    if "://" in stage.storage_path:
        filesystem, root = FileSystem.from_uri(stage.storage_path)
    else:
        filesystem, root = LocalFileSystem(), str(Path(stage.storage_path).resolve())
    return filesystem, f"{root.rstrip('/')}/{stage.ray_name}"


def adopt_resumed_layout(stage: StagePlan) -> None:
    """`resume=` on another number of workers keeps the run's global batch: gradient accumulation becomes what makes
    it up, read from the newest complete checkpoint's layout. ConfigError (naming the key) where nothing can, or
    where the ZeRO layout cannot be converted. Idempotent; no checkpoint yet: nothing to keep."""
    from orchestrator.config.validate import ConfigError
    from orchestrator.train.checkpoints import (
        ResumeMismatch,
        check_resumable,
        check_zero_stage,
        complete_checkpoints,
        resumed_grad_accum,
    )

    if isinstance(stage.num_workers, tuple):
        # an elastic group's workers make its global batch by accumulation whatever their number (start_worker),
        # and reshard whatever layout they find (restore_latest), checking it there
        return
    filesystem, root = run_storage(stage)
    layouts = [c.layout for c in complete_checkpoints(filesystem, root, stage.num_workers) if c.layout is not None]
    if not layouts:
        return
    trainer, layout = stage.config["trainer"], layouts[0]
    workers, micro, grad_accum = stage.num_workers, trainer["micro_batch_size"], trainer["grad_accum_steps"]
    try:
        check_zero_stage(layout, trainer["zero_stage"])
        if workers * micro * grad_accum != layout.global_batch:
            grad_accum = resumed_grad_accum(layout, workers, micro)
        check_resumable(layout, workers, trainer["zero_stage"], micro, grad_accum)
    except ResumeMismatch as error:
        raise ConfigError(error.key, error.value, error.reason) from None
    trainer["grad_accum_steps"] = grad_accum
    stage.deepspeed["gradient_accumulation_steps"] = grad_accum
    stage.deepspeed["train_batch_size"] = layout.global_batch


def _save_mlflow_model(model_dir: Path, stage: StagePlan, tracking: "StageRun") -> None:
    """The exported model as an MLflow Model as well (model/mlflow_model). A model torch.export cannot trace (a
    custom class of yours) keeps its safetensors export: the run records why and goes on."""
    from orchestrator.artifacts.mlflow_model import input_example, save_mlflow_model

    try:
        save_mlflow_model(model_dir, input_example(stage.config["data"]), trusted_model_targets(stage.config))
    except Exception as error:  # noqa: BLE001 - the safetensors export, which orch loads, is already there
        tracking.set_tag("orch.mlflow_model_error", f"{type(error).__name__}: {error}"[:4000])


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
    import ray

    from orchestrator.launch.progress import run_with_progress, start_board

    trainer_cfg = stage.config["trainer"]
    label = f"{stage.name} · {stage.run_name}"
    # Each attempt writes into a folder of its own (`resume-N` inside the run's folder): Ray's num_to_keep then
    # applies within the attempt and never deletes what an earlier attempt wrote; workers resume from any attempt.
    from orchestrator.train.checkpoints import complete_checkpoints, next_attempt

    filesystem, run_root = run_storage(stage)
    if next_attempt(filesystem, run_root) > 0:
        # a resumed run whose last step is saved already (its driver died after the last checkpoint, before the run
        # was closed) has nothing to train: no worker group; its result is what that checkpoint reported
        newest = next(iter(complete_checkpoints(filesystem, run_root, stage.min_workers)), None)
        if newest is not None and newest.step >= trainer_cfg["max_steps"]:
            console.print(f"{label}: step {newest.step} is saved already (trainer.max_steps={trainer_cfg['max_steps']}): "
                          "nothing left to train")
            tracking.set_tag("orch.resumed_at_step", str(newest.step))
            return _finish_fit(stage, tracking, model_dir, label, newest.checkpoint(), newest.report())

    def fit_once() -> tuple[Any, Any]:
        """(result, progress board) of one Ray Train fit, as the next attempt of the run."""
        attempt = next_attempt(filesystem, run_root)
        board = start_board()
        trainer = _trainer(recipe, stage, sources, tracking, board, attempt, callbacks)
        timeline.mark("fit_start")
        return run_with_progress(trainer.fit, board, trainer_cfg["max_steps"], label, console), board

    result, board = retry_port_race(fit_once, console, label)
    timeline.mark("fit_returned")
    failure = ray.get(board.failure_reported.remote())
    if failure is not None and failure["kind"] == "diverged":
        from orchestrator.train.steps import TrainingDiverged

        raise TrainingDiverged(failure["step"])
    checkpoint, metrics = result.checkpoint, dict(result.metrics or {})
    if checkpoint is None:
        # the workers found no step left after all (a checkpoint completed after the check above): the newest
        # checkpoint of an earlier attempt, and what was reported with it
        [newest, *_] = complete_checkpoints(filesystem, run_root, stage.min_workers)
        checkpoint, metrics = newest.checkpoint(), {**newest.report(), **metrics}
    return _finish_fit(stage, tracking, model_dir, label, checkpoint, metrics)


# Ray Train picks rank 0's rendezvous port on the worker (bind to port 0, close) and torch's TCPStore binds it a moment
# later: another process of the machine can take it in between, and the fit fails in its process-group set-up with
# EADDRINUSE before any step. Ray Train 2.60 reports that as a controller error that its FailureConfig does not retry.
PORT_RACE_RETRIES = 2


def lost_port_race(error: BaseException) -> bool:
    """Whether a failed fit lost that race: EADDRINUSE raised while Ray Train set up torch's process group."""
    text = str(error)
    return "_setup_torch_process_group" in text and "EADDRINUSE" in text


def retry_port_race(fit_once: Callable[[], T], console: Console, label: str, retries: int = PORT_RACE_RETRIES) -> T:
    """`fit_once()`, started again (as the run's next attempt) when it lost the port race; any other error, or a
    race lost `retries` times more, is raised."""
    from ray.train import TrainingFailedError

    for _ in range(retries):
        try:
            return fit_once()
        except TrainingFailedError as error:
            if not lost_port_race(error):
                raise
            console.print(f"{label}: another process took the port Ray Train chose for the process group before it "
                          "was bound (EADDRINUSE); starting the workers again")
    return fit_once()


def _trainer(recipe: ModuleType, stage: StagePlan, sources: Mapping[str, Mapping[str, str]], tracking: "StageRun",
             board: Any, attempt: int, callbacks: Sequence[Any]) -> Any:
    """The TorchTrainer of one attempt of the stage's fit."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer_cfg = stage.config["trainer"]
    storage_path, ray_name = (stage.storage_path, stage.ray_name) if attempt == 0 else (
        f"{stage.storage_path.rstrip('/')}/{stage.ray_name}", f"resume-{attempt}")
    return TorchTrainer(
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
            "attempt": attempt,
        },
        torch_config=TorchConfig(backend=stage.backend),
        scaling_config=ray.train.ScalingConfig(
            num_workers=stage.num_workers,
            use_gpu=stage.use_gpu,
            resources_per_worker=stage.resources_per_worker,
            placement_strategy=stage.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=ray_name,
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=trainer_cfg["max_failures"]),
            # one more than asked: a marker completes the newest checkpoint after Ray registered it (and pruned the
            # older ones), so the last complete checkpoint stays until its successor is complete
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=trainer_cfg["keep_checkpoints"] + 1),
            worker_runtime_env={"env_vars": worker_env(stage.config["cluster"], stage.use_gpu,
                                                          stage.config["trainer"]["zero_stage"])},
            # Ray Train's own INFO (worker group start, reports, checkpoints): in the run's log file, or live with -v
            logging_config=ray.train.LoggingConfig(log_level="INFO"),
            callbacks=list(callbacks) or None,
        ),
    )


def _finish_fit(stage: StagePlan, tracking: "StageRun", model_dir: Path, label: str, checkpoint: Any,
                metrics: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Export the model of the fit's last checkpoint (when tracked), record that checkpoint and draw the curves."""
    if stage.config["tracking"]["log_model"]:
        from orchestrator.artifacts.export import export_model

        with checkpoint.as_directory() as checkpoint_dir:
            export_model(checkpoint_dir, stage.config["model"], model_dir, trusted_model_targets(stage.config))
    tracking.set_tag("orch.checkpoint", checkpoint.path)
    tracking.log_curves(label)
    return metrics, checkpoint.path
