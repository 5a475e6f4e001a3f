"""One trial: a Ray Tune function trainable whose body is a full `orch run` of the base recipe with the trial's values.

Ray Train inside Ray Tune, as Ray documents it for Train V2: the trial's function plans the run, builds the
TorchTrainer (through `orchestrator.stage_runner.run_stage`, so the MLflow run, export and plots are those of any
run) and calls fit(); a Train callback forwards the workers' checkpoint reports to Tune, where the scheduler (ASHA)
reads them. The trial's MLflow run is a child of the sweep's parent run.

The final report is held back until the run is closed: ASHA may stop a trial on any report, including the last
one, and a trial stopped while it exports its model would leave its MLflow run half-written. So the callback
forwards every report before the last step, and the function reports the final metrics itself once `run_stage`
has returned.

A sweep whose base recipe is a pipeline (recipe=pipeline) runs each trial as a whole pipeline run instead
(`_run_pipeline_trial`), reporting the pipeline's summary once, at its end.

A sweep resumed after its driver died (`orch sweep resume=NAME`, `orchestrator.sweep.resume`) runs the trials the
driver left running again in a new Tuner, which gives them new Tune ids; each carries its own id in its config
(`RESUMED_TRIAL_KEY`), so it finds its MLflow child and reopens it, continuing its Ray Train run from its
checkpoints; one whose run had already finished reports what that run recorded instead.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig

from orchestrator.sweep.space import Dimension, decode

TRIAL_TAG = "orch.trial_id"
SWEEP_TAG = "orch.sweep_run"
STATE_TAG = "orch.trial_state"  # completed | early_stopped | failed
BEST_TAG = "orch.best_trial"
PARETO_TAG = "orch.pareto"  # "true" on each trial of a multi-objective sweep's Pareto front
# A trial's config key that carries an interrupted trial's own id into a resumed sweep's new Tuner (None for new
# trials): Tune gives each trial of that Tuner a new id, and the id names the trial's Ray Train run and MLflow child.
RESUMED_TRIAL_KEY = "orch_resumed_trial_id"


def trial_run_name(sweep_run: str, trial_id: str) -> str:
    return f"{sweep_run}-{trial_id}"


def run_trial(config: dict[str, Any], spec: Mapping[str, Any]) -> None:
    """Tune's trainable. `spec`: base config, choices, dimensions, sweep run name and id, tracking, storage."""
    import ray.tune
    from rich.console import Console

    from orchestrator.config import Composed
    from orchestrator.plan import build_plan
    from orchestrator.stage_runner import resolve_sources, run_stage
    from orchestrator.sweep.plan import apply

    started = time.monotonic()
    # an interrupted trial run again by a resumed sweep keeps its own id (its Ray Train run, its MLflow child)
    trial_id = config.get(RESUMED_TRIAL_KEY) or ray.tune.get_context().get_trial_id()
    dimensions: list[Dimension] = spec["dimensions"]
    params = decode(dimensions, config)
    name = trial_run_name(spec["sweep_run"], trial_id)
    if spec.get("pipeline"):
        _run_pipeline_trial(spec, params, trial_id, name, started)
        return
    cfg: DictConfig = apply(spec["base"], {**params, **spec["fixed"]}, name=name)
    # A trial started again (the sweep resumed after its driver died) continues its own Ray Train run from its
    # checkpoints, and reopens its own MLflow child: never a second child for one trial.
    if Path(spec["fixed"]["trainer.storage_path"], name).is_dir():
        cfg.resume = name
    plan = build_plan(Composed(cfg, dict(spec["choices"])), cwd=Path(spec["cwd"]))
    [stage] = plan.stages
    stage.name = f"trial-{trial_id}"  # the child run's name in the MLflow UI, under the sweep's parent run
    max_steps = stage.config["trainer"]["max_steps"]
    tags = {SWEEP_TAG: spec["sweep_run"], TRIAL_TAG: trial_id}
    quiet = Console(file=io.StringIO())  # Tune prints the trials' progress; per-trial bars would interleave
    sources = resolve_sources(stage, {}, plan.tracking.uri)
    child = _trial_child(plan.tracking, spec["parent_run_id"], trial_id)
    if child is not None and child.info.status == "FINISHED":
        # its run ended, but the driver died before Tune heard: what the run recorded is the result; nothing retrains
        ray.tune.report({**child.data.metrics, "step": max_steps, "mlflow_run_id": child.info.run_id,
                         "trial_wall_s": time.monotonic() - started})
        return
    result = run_stage(
        plan.tracking, stage, quiet, resuming=child is not None, sources=sources, parent_run_id=spec["parent_run_id"],
        tags=tags, train_callbacks=[_forward_reports_before(max_steps)],
    )
    final = {key: value for key, value in result.metrics.items() if isinstance(value, (int, float))}
    final.update(_size_metrics(plan.tracking.uri, result.run_id))
    # trial_wall_s: the whole trial as its function saw it (plan, Ray Train fit, export), for the overhead benchmark
    final.update(step=max_steps, mlflow_run_id=result.run_id, trial_wall_s=time.monotonic() - started)
    ray.tune.report(final)


def _run_pipeline_trial(spec: Mapping[str, Any], params: dict[str, Any], trial_id: str, name: str, started: float) -> None:
    """A trial that is a pipeline run: its MLflow run is the pipeline's parent (a child of the sweep's parent, tagged
    with the trial's id), its stages children of that. Stages no searched value changes were run once by the sweep's
    driver before the trials (`orchestrator.pipeline.runner.run_shared_stages`): the stage cache finds them here.
    Reports the pipeline's summary (final_val_accuracy, final_nonzero_parameters, size_ratio ...) once, at the end."""
    import ray.tune
    from rich.console import Console

    from orchestrator.pipeline.runner import run_pipeline
    from orchestrator.sweep.pipeline_trials import plan_pipeline_trial
    from orchestrator.sweep.plan import apply

    base = apply(spec["base"], spec["fixed"], name=name)
    if Path(spec["fixed"]["trainer.storage_path"], name).is_dir():
        base.resume = name  # started before the sweep's driver died: the pipeline's resume= continues it
    plan = plan_pipeline_trial(base, spec["choices"], spec["overrides"], params, Path(spec["cwd"]))
    max_steps = plan.stages[0].config["trainer"]["max_steps"]
    child = _trial_child(plan.tracking, spec["parent_run_id"], trial_id)
    if child is None or child.info.status != "FINISHED":
        quiet = Console(file=io.StringIO())  # Tune prints the trials' progress; per-stage bars would interleave
        run_pipeline(plan, quiet, nested_in=spec["parent_run_id"], tags={SWEEP_TAG: spec["sweep_run"], TRIAL_TAG: trial_id})
        child = _trial_child(plan.tracking, spec["parent_run_id"], trial_id)
    ray.tune.report({**child.data.metrics, "step": max_steps, "mlflow_run_id": child.info.run_id,
                     "trial_wall_s": time.monotonic() - started})


def _size_metrics(uri: str, run_id: str) -> dict[str, float]:
    """The exported model's size, which `run_stage` logged on the run after training (a pruned stage's): reported
    with the final metrics so that a sweep can search on it (sweep.objectives: nonzero_parameters: min)."""
    from mlflow import MlflowClient

    from orchestrator.sweep.plan import SIZE_METRICS

    logged = MlflowClient(uri).get_run(run_id).data.metrics
    return {key: logged[key] for key in SIZE_METRICS if key in logged}


def _trial_child(tracking, parent_run_id: str, trial_id: str):
    """This trial's MLflow child under the sweep's parent, if an attempt the driver lost already opened it."""
    from mlflow import MlflowClient

    from orchestrator.track.mlflow_run import PARENT_TAG, experiment_id

    client = MlflowClient(tracking.uri)
    runs = client.search_runs(
        [experiment_id(client, tracking)],
        filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'",
        max_results=1,
    )
    return runs[0] if runs else None


def _forward_reports_before(max_steps: int):
    """Ray's TuneReportCallback, minus the last step's report (the trial sends that one itself, see above)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ForwardIntermediateReports(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics and metrics[0].get("step", 0) < max_steps:
                super().after_report(run_context, metrics, checkpoint)

    return ForwardIntermediateReports()
