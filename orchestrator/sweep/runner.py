"""Driver of a sweep: one Ray, one MLflow parent run, a Ray Tune Tuner whose trials are `orch run`s.

`run_sweep` reads top to bottom:
  ray       the base plan's cluster session (a private local Ray, or the cluster)
  parent    the sweep's MLflow parent run (search space, algorithm, scheduler as params)
  tune      Tuner(with_resources(run_trial, 0 CPU), search algorithm, ASHA, max_concurrent_trials): the trial
            function holds no CPU itself; its Ray Train workers reserve theirs, and at most as many trials run at
            once as the cluster holds workers for, so concurrent trials never oversubscribe it. `resume=NAME`:
            the parent reopened, its trials read from MLflow (`orchestrator.sweep.resume`: data only, no pickle),
            and a fresh Tuner in tune-resume-<n> runs what is left: interrupted trials first, under their own ids
  outcome   every trial's MLflow child closed with its Tune state; the best tagged; trials table, plots, the
            best config as a YAML `orch run` accepts, all logged to the parent (a resumed sweep's outcome counts
            the earlier attempts' finished trials too). With sweep.objectives: the Pareto front instead of one best
            (`orchestrator.sweep.pareto`), its trials tagged orch.pareto=true
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from rich.console import Console

from orchestrator.stage_runner import cluster_session
from orchestrator.sweep.best import write_best
from orchestrator.sweep.plan import IDENTITY_FILE, SIZE_METRICS, SweepPlan, apply
from orchestrator.sweep.progress import trial_progress
from orchestrator.sweep.resume import RecordedTrial
from orchestrator.sweep.space import decode, encode_options, to_tune
from orchestrator.sweep.tracking import SweepRun
from orchestrator.sweep.trial import PARETO_TAG, RESUMED_TRIAL_KEY, run_trial
from orchestrator.track.mlflow_run import closed_with_outcome, log_file_attached
from orchestrator.track.tables import csv_table, format_cell, markdown_table, print_table

# The trial's own process only drives its Ray Train run (whose controller asks for no CPU either); the workers
# reserve the CPUs/GPUs in their own placement group. Tune needs a non-empty request: one byte of Ray's memory
# resource, so that the trial holds nothing its workers need.
TRIAL_DRIVER_RESOURCES = {"cpu": 0, "memory": 1}


@dataclass
class SweepOutcome:
    run_name: str
    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    trials: list[dict[str, Any]]  # one row per trial: trial_id, run_id, state, params, metric, step
    best: Optional[dict[str, Any]]  # None with sweep.objectives: the front is the outcome
    best_config_dir: Optional[Path]  # holds best.yaml
    rerun_command: Optional[str]
    tune_wall_s: float = 0.0  # wall time of Tuner.fit(): every trial, from the first start to the last end
    concurrency: int = 1
    front: list[dict[str, Any]] = field(default_factory=list)  # sweep.objectives: the non-dominated trials' rows
    objectives: dict[str, str] = field(default_factory=dict)


def max_concurrent(plan: SweepPlan) -> int:
    """As many trials as the cluster holds workers for (never more than asked)."""
    import ray

    stage = plan.base_plan.stages[0]
    resources = ray.cluster_resources()
    fits = [int(resources.get(name, 0) // (amount * stage.min_workers)) for name, amount in stage.resources_per_worker.items() if amount]
    fit = max(1, min(fits)) if fits else 1
    return min(plan.max_concurrent_trials or fit, fit)


def _search_algorithm(plan: SweepPlan, concurrency: int):
    points = [{k: encode_options([v])[0] for k, v in point.items()} for point in plan.points_to_evaluate] or None
    if plan.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        if plan.objectives:
            # several objectives: Optuna's multi-objective study (its TPESampler handles both); Tune's own
            # metric/mode stay unset, as Ray requires for a list
            return OptunaSearch(metric=list(plan.objectives), mode=list(plan.objectives.values()), seed=plan.seed,
                                points_to_evaluate=points)
        return OptunaSearch(seed=plan.seed, points_to_evaluate=points)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # a generator instance ignores TuneConfig.max_concurrent_trials: it is given the limit itself
    return BasicVariantGenerator(random_state=plan.seed, points_to_evaluate=points, max_concurrent=concurrency)


def _scheduler(plan: SweepPlan):
    if plan.scheduler["name"] != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr="step",  # the optimizer step trials report, so rungs are in training steps
        max_t=plan.scheduler["max_t"],
        grace_period=plan.scheduler["grace_period"],
        reduction_factor=plan.scheduler["reduction_factor"],
    )


def run_sweep(
    plan: SweepPlan, console: Optional[Console] = None, cwd: Optional[Path] = None, log_file: Optional[Path] = None
) -> SweepOutcome:
    """`log_file`: the sweep's log (`orchestrator.launch.run_log`), logged to the parent run as `logs/driver.log`."""
    import ray.tune

    console = console or Console()
    cwd = cwd or Path.cwd()
    base = plan.base_plan
    sweep_dir = plan.sweep_dir
    # --- ray ---
    with cluster_session(base.stages[0].config["cluster"], base.stages):
        concurrency = max_concurrent(plan)
        # --- parent ---
        parent = SweepRun(base.tracking)
        if plan.resuming:
            parent.resume_sweep(plan.run_name, base.storage_path)
        else:
            parent.start_sweep(plan, concurrency)
            write_identity(plan)
        console.rule(f"[bold]sweep[/bold] {plan.name} · {plan.run_name} · {concurrency} trial(s) at a time")
        with closed_with_outcome(parent.finish), log_file_attached(parent.parent.log_artifact, log_file):
            # --- tune ---
            spec = {
                "base": plan.base,
                "choices": plan.choices,
                "dimensions": plan.dimensions,
                "fixed": {  # where trials write: the sweep's folder and the parent's MLflow store, as resolved here
                    "trainer.storage_path": str(sweep_dir),
                    "tracking.uri": base.tracking.uri,
                    "tracking.experiment": base.tracking.experiment,
                    "tracking.artifact_location": base.tracking.artifact_location,
                },
                "sweep_run": plan.run_name,
                "parent_run_id": parent.run_id,
                "cwd": str(cwd),
                "pipeline": plan.pipeline,
                "overrides": plan.overrides,  # a pipeline trial composes each stage again from them
            }
            if plan.shared_stages:
                _run_shared_stages(plan, spec, parent, console)
            trainable = ray.tune.with_resources(ray.tune.with_parameters(run_trial, spec=spec), TRIAL_DRIVER_RESOURCES)
            earlier: list[RecordedTrial] = []
            if plan.resuming:
                tuner, earlier = _resumed_tuner(plan, trainable, concurrency, parent, console)
            else:
                tuner = _new_tuner(plan, trainable, concurrency, sweep_dir, parent, console)
            started = time.monotonic()
            grid = tuner.fit() if tuner is not None else []
            # --- outcome ---
            outcome = _record_outcome(plan, parent, grid, cwd, earlier)
            outcome.tune_wall_s, outcome.concurrency = time.monotonic() - started, concurrency
            return outcome


def _run_shared_stages(plan: SweepPlan, spec: dict[str, Any], parent: SweepRun, console: Console) -> None:
    """A pipeline sweep's stages that no searched value changes (the teacher, typically), run once as children of
    the sweep's parent before any trial starts: concurrent trials would each miss the stage cache and train them
    again. Each trial's pipeline run then reuses them through the cache (same key, same inputs)."""
    from orchestrator.pipeline.runner import run_shared_stages
    from orchestrator.sweep.pipeline_trials import plan_pipeline_trial

    shared = plan_pipeline_trial(apply(plan.base, spec["fixed"], name=f"{plan.run_name}-shared"), plan.choices,
                                 plan.overrides, {}, Path(spec["cwd"]))
    console.print(f"stages every trial shares, run once first: {', '.join(plan.shared_stages)}", highlight=False)
    runs = run_shared_stages(shared, plan.shared_stages, parent.run_id, console)
    for name, run_id in runs.items():
        parent.parent.set_tag(f"orch.shared_stage.{name}.run_id", run_id)


def write_identity(plan: SweepPlan) -> None:
    """What `resume=` checks a later command line against (`orchestrator.sweep.plan._check_resumable`)."""
    import json

    plan.sweep_dir.mkdir(parents=True, exist_ok=True)
    (plan.sweep_dir / IDENTITY_FILE).write_text(json.dumps(plan.identity(), indent=2, default=str))


def _resumed_tuner(plan: SweepPlan, trainable, concurrency: int, parent: SweepRun, console: Console):
    """A fresh Tuner for what an interrupted sweep left (`orchestrator.sweep.resume`), and the finished trials it
    keeps. Nothing is restored from Tune's pickled state: the trials come from MLflow, the searcher is warmed with
    the finished ones, and the new attempt writes its own folder (tune-resume-<n>), leaving the earlier ones as they
    are. None for the tuner when every trial already finished (the driver died while recording the outcome)."""
    import ray.tune

    from orchestrator.sweep import resume

    recorded = resume.read_trials(parent.client, parent.experiment_id, parent.run_id, plan.dimensions, plan.metric)
    finished, _ = resume.split_trials(recorded)
    attempt = resume.next_attempt(plan.sweep_dir)
    search_alg, num_samples = resume.resume_search(plan, recorded, concurrency, attempt)
    if search_alg is None:
        return None, finished
    tuner = ray.tune.Tuner(
        trainable,
        param_space={**to_tune(plan.dimensions), RESUMED_TRIAL_KEY: None},
        tune_config=ray.tune.TuneConfig(
            metric=None if plan.objectives else plan.metric, mode=None if plan.objectives else plan.mode,
            search_alg=search_alg, scheduler=_scheduler(plan),
            num_samples=num_samples, max_concurrent_trials=concurrency,
        ),
        run_config=ray.tune.RunConfig(name=f"{resume.ATTEMPT_PREFIX}{attempt}", storage_path=str(plan.sweep_dir), verbose=1,
                                      callbacks=[_outcome_tagger(plan, parent), _progress(plan, console, num_samples)]),
    )
    return tuner, finished


def _progress(plan: SweepPlan, console: Console, trials: int):
    """The console's line per trial start and end (`orchestrator.sweep.progress`); `trials`: this attempt's."""
    return trial_progress(console, plan.dimensions, plan.metric, plan.mode,
                          int(plan.base_plan.stages[0].config["trainer"]["max_steps"]), trials)


def _new_tuner(plan: SweepPlan, trainable, concurrency: int, sweep_dir: Path, parent: SweepRun, console: Console):
    import ray.tune

    return ray.tune.Tuner(
        trainable,
        param_space=to_tune(plan.dimensions),
        tune_config=ray.tune.TuneConfig(
            metric=None if plan.objectives else plan.metric,
            mode=None if plan.objectives else plan.mode,
            search_alg=_search_algorithm(plan, concurrency),
            scheduler=_scheduler(plan),
            num_samples=plan.num_samples,
            max_concurrent_trials=concurrency,
        ),
        run_config=ray.tune.RunConfig(name="tune", storage_path=str(sweep_dir), verbose=1,
                                      callbacks=[_outcome_tagger(plan, parent), _progress(plan, console, plan.num_samples)]),
    )


def _trial_max_steps(plan: SweepPlan, params: dict[str, Any]) -> int:
    return int(params.get("trainer.max_steps", plan.base_plan.stages[0].config["trainer"]["max_steps"]))


def _outcome_tagger(plan: SweepPlan, parent: SweepRun):
    """A Tune callback that tags each trial's MLflow child with Tune's outcome (orch.trial_state) the moment Tune
    has it. A driver killed later leaves that outcome recorded, so a resume counts the trial as finished (an
    ASHA-stopped trial is not run again) and reads only data to know it. Holds plain values only: Tune pickles its
    callbacks with its own experiment state."""
    from ray.tune import Callback

    from orchestrator.sweep.trial import STATE_TAG, TRIAL_TAG
    from orchestrator.track.mlflow_run import PARENT_TAG

    uri, experiment_id, parent_run_id = plan.base_plan.tracking.uri, parent.experiment_id, parent.run_id
    dimensions, default_steps = plan.dimensions, plan.base_plan.stages[0].config["trainer"]["max_steps"]

    class TagTrialOutcome(Callback):
        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            params = decode(dimensions, {d.key: trial.config[d.key] for d in dimensions})
            max_steps = int(params.get("trainer.max_steps", default_steps))
            self._tag(trial, "completed" if (trial.last_result or {}).get("step", 0) >= max_steps else "early_stopped")

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._tag(trial, "failed")

        def _tag(self, trial: Any, state: str) -> None:
            from mlflow import MlflowClient

            client = MlflowClient(uri)
            trial_id = trial.config.get(RESUMED_TRIAL_KEY) or trial.trial_id
            runs = client.search_runs([experiment_id], max_results=1, filter_string=(
                f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'"))
            if runs:
                client.set_tag(runs[0].info.run_id, STATE_TAG, state)

    return TagTrialOutcome()


def trial_state(result, max_steps: int) -> str:
    if result.error is not None:
        return "failed"
    step = (result.metrics or {}).get("step", 0)
    return "completed" if step >= max_steps else "early_stopped"


def _trial_id(result) -> str:
    """The trial's id: an interrupted trial run again keeps its own (`RESUMED_TRIAL_KEY`); else Tune's, in every
    report, else (a trial that failed before reporting) in its folder's name."""
    if (result.config or {}).get(RESUMED_TRIAL_KEY):
        return result.config[RESUMED_TRIAL_KEY]
    reported = (result.metrics or {}).get("trial_id")
    return reported or Path(result.path).name.split("_")[2]  # run_trial_<id>_<n>_<params>


def _earlier_row(plan: SweepPlan, trial: RecordedTrial) -> dict[str, Any]:
    """A trial an earlier attempt finished, as a row of the outcome: what its MLflow child recorded."""
    row: dict[str, Any] = {"trial_id": trial.trial_id, "run_id": trial.run_id, "state": trial.outcome, **trial.params}
    row[plan.metric] = trial.value
    row.update({metric: trial.metrics.get(metric) for metric in plan.objectives})
    row["step"] = trial.step
    row["trial_wall_s"] = None  # timed by the earlier attempt's trial function, which Tune did not hear from
    return row


def _record_outcome(plan: SweepPlan, parent: SweepRun, grid, cwd: Path, earlier: Sequence[RecordedTrial] = ()) -> SweepOutcome:
    """Every trial of the sweep: this attempt's (from Tune's results) and, on a resume, the earlier attempts'
    finished ones (from MLflow)."""
    children = parent.trial_runs()
    rows: list[dict[str, Any]] = []
    for trial in earlier:
        rows.append(_earlier_row(plan, trial))
        parent.close_trial(trial.run_id, trial.outcome, None)
        run = children.get(trial.trial_id)
        for key in SIZE_METRICS:
            if run is not None and key in run.data.metrics:
                rows[-1][key] = run.data.metrics[key]
    for result in grid:
        trial_id = _trial_id(result)
        params = decode(plan.dimensions, {k: result.config[k] for k in (d.key for d in plan.dimensions)})
        state = trial_state(result, _trial_max_steps(plan, params))
        run = children.get(trial_id)
        row: dict[str, Any] = {"trial_id": trial_id, "run_id": run.info.run_id if run else None, "state": state, **params}
        row[plan.metric] = (result.metrics or {}).get(plan.metric)
        row.update({metric: (result.metrics or {}).get(metric) for metric in plan.objectives})
        row["step"] = (result.metrics or {}).get("step")
        row["trial_wall_s"] = (result.metrics or {}).get("trial_wall_s")
        if run is not None:
            parent.close_trial(run.info.run_id, state, str(result.error) if result.error else None)
            for key in SIZE_METRICS:  # logged by a trial that pruned (its exported model measured)
                if key in run.data.metrics:
                    row[key] = run.data.metrics[key]
        rows.append(row)
    scored = [row for row in rows if row[plan.metric] is not None and row["state"] == "completed"]
    best = (max if plan.mode == "max" else min)(scored, key=lambda row: row[plan.metric]) if scored else None
    out = Path(tempfile.mkdtemp(prefix="orch-sweep-"))
    best_dir, command, front = None, None, []
    if plan.objectives:
        best, front = None, _record_front(plan, parent, rows, out)
    if best is not None:
        if best["run_id"]:
            parent.mark_best(best["run_id"], plan.metric, best[plan.metric])
        params = {dim.key: best[dim.key] for dim in plan.dimensions}
        best_dir = Path(plan.base_plan.storage_path, plan.run_name, "best")
        command = write_best(apply(plan.base, params), plan, best, best_dir)
        parent.log_artifacts(str(best_dir), "best")
    _write_tables_and_plots(plan, rows, out)
    parent.log_artifacts(str(out))
    parent.log_metrics({"trials": len(rows), "trials_completed": sum(r["state"] == "completed" for r in rows),
                        "trials_early_stopped": sum(r["state"] == "early_stopped" for r in rows),
                        "trials_failed": sum(r["state"] == "failed" for r in rows)})
    return SweepOutcome(
        run_name=plan.run_name,
        parent_run_id=parent.run_id,
        experiment_id=parent.experiment_id,
        tracking_uri=plan.base_plan.tracking.uri,
        trials=rows,
        best=best,
        best_config_dir=best_dir,
        rerun_command=command,
        front=front,
        objectives=dict(plan.objectives),
    )


def _record_front(plan: SweepPlan, parent: SweepRun, rows: list[dict[str, Any]], out: Path) -> list[dict[str, Any]]:
    """The Pareto front of the finished trials: pareto/pareto_front.{csv,md,yaml,png} on the parent, each front
    trial's child tagged orch.pareto=true, the front's size as the parent's metric."""
    from orchestrator.sweep.pareto import front_table, front_yaml, pareto_front, pareto_plot

    front = pareto_front(rows, plan.objectives)
    keys = [dim.key for dim in plan.dimensions]
    table = front_table(front, plan.objectives, keys)
    entries = [{"trial_id": row["trial_id"], "run_id": row["run_id"],
                "values": {metric: float(row[metric]) for metric in plan.objectives},
                "params": {key: row[key] for key in keys}, **_trial_overrides(plan, row)} for row in front]
    (out / "pareto").mkdir(parents=True, exist_ok=True)
    (out / "pareto" / "pareto_front.csv").write_text(csv_table(table) if table else "")
    (out / "pareto" / "pareto_front.md").write_text(f"# Pareto front · {plan.run_name}\n\n" + (markdown_table(table) if table else "no trial completed\n"))
    (out / "pareto" / "pareto_front.yaml").write_text(front_yaml(entries, plan.objectives, plan.run_name))
    pareto_plot(rows, front, plan.objectives).savefig(out / "pareto" / "pareto_front.png", dpi=110)
    for row in front:
        if row["run_id"]:
            parent.client.set_tag(row["run_id"], PARETO_TAG, "true")
    parent.log_metrics({"pareto_front_size": len(front)})
    return [dict(row) for row in front]


def _trial_overrides(plan: SweepPlan, row: dict[str, Any]) -> dict[str, Any]:
    """How to train a trial's configuration again: `orch run` arguments and, for a pipeline trial, the overrides its
    searched stages got after their own (`orchestrator.sweep.pipeline_trials.pipeline_trial_config`)."""
    from orchestrator.sweep.pipeline_trials import STAGE_PREFIX, override_text

    overrides, stages = list(plan.overrides), {}
    for dim in plan.dimensions:
        if plan.pipeline and dim.key.startswith(STAGE_PREFIX):
            _, stage, key = dim.key.split(".", 2)
            stages.setdefault(stage, []).append(override_text(key, row[dim.key]))
        else:
            overrides.append(override_text(dim.key, row[dim.key]))
    return {"overrides": overrides, **({"stage_overrides": stages} if stages else {})}


def _write_tables_and_plots(plan: SweepPlan, rows: list[dict[str, Any]], out: Path) -> None:
    from orchestrator.sweep.plots import (
        metric_vs_key,
        metric_vs_size,
        parallel_coordinates,
    )

    (out / "sweep").mkdir(parents=True, exist_ok=True)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    (out / "sweep" / "trials.csv").write_text(csv_table(rows))
    (out / "sweep" / "trials.md").write_text(f"# {plan.run_name}\n\n" + markdown_table(rows))
    figures = {f"{plan.metric}_vs_{dim.key}.png": metric_vs_key(rows, dim, plan.metric) for dim in plan.dimensions}
    figures["parallel_coordinates.png"] = parallel_coordinates(rows, plan.dimensions, plan.metric, plan.mode)
    if any(row.get("nonzero_parameters") for row in rows):
        figures["accuracy_vs_size.png"] = metric_vs_size(rows, plan.metric, plan.dimensions)
    for name, figure in figures.items():
        figure.savefig(out / "plots" / name, dpi=110)


def print_outcome(outcome: SweepOutcome, metric: str, console: Console) -> None:
    columns = [key for key in outcome.trials[0] if key != "run_id"] if outcome.trials else []
    print_table(
        console,
        columns,
        [[format_cell(row[c]) for c in columns] for row in outcome.trials],
        title=f"sweep {outcome.run_name}",
        row_styles=["bold green" if row is outcome.best else None for row in outcome.trials],
    )
    console.print(f"MLflow parent run {outcome.parent_run_id} ({outcome.tracking_uri}); one child run per trial")
    if outcome.objectives:
        console.print(f"Pareto front: {len(outcome.front)} trial(s) not beaten on every objective at once "
                      "(parent run artifacts pareto/pareto_front.csv, .yaml, .png)")
        for row in outcome.front:
            values = ", ".join(f"{metric} {format_cell(row[metric])}" for metric in outcome.objectives)
            console.print(f"  trial {row['trial_id']}: {values} (run {row['run_id']})", highlight=False)
        return
    if outcome.best is None:
        console.print("[red]no trial completed[/red]: no best configuration")
        return
    console.print(f"best {metric}: {outcome.best[metric]:.4f} (trial {outcome.best['trial_id']}, run {outcome.best['run_id']})")
    console.print(f"best config: {outcome.best_config_dir}/best.yaml\nrerun it:\n  {outcome.rerun_command}")

