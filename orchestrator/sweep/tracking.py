"""A sweep's MLflow structure: a parent run (`orchestrator.track.parent_run.ParentRun`) and one child per trial.

* Parent: tagged orch.run_name=<sweep run name>, orch.recipe=sweep; params: the search space (one param per key,
  e.g. space.trainer.optimizer.lr = loguniform(0.0001, 0.03)), search algorithm, scheduler, metric, mode, trial
  counts; artifacts: sweep/trials.csv, plots/<metric>_vs_<key>.png, plots/parallel_coordinates.png (and
  plots/accuracy_vs_size.png when trials pruned), best/best.yaml; tag orch.best_trial_run_id and metric best_<metric>.
  With sweep.objectives, instead of the best: pareto/pareto_front.{csv,md,yaml,png} and metric pareto_front_size;
  each front trial's child tagged orch.pareto=true.
* Child (one per trial, written by the trial through `run_stage`): mlflow.parentRunId, orch.trial_id,
  orch.sweep_run, the trial's full config as params, its metric history; tagged with its Tune outcome the moment
  Tune decides it (orch.trial_state = completed | early_stopped | failed), closed here with it (an early-stopped
  trial's status is KILLED, a failed one's FAILED) and the best one tagged orch.best_trial=true. A resumed sweep
  reads its trials back from these children alone (`orchestrator.sweep.resume`).
"""

from __future__ import annotations

import json
from typing import Any, Optional

from orchestrator.plan import TrackingPlan
from orchestrator.sweep.plan import SweepPlan
from orchestrator.sweep.trial import BEST_TAG, STATE_TAG, TRIAL_TAG
from orchestrator.track.mlflow_run import PARENT_TAG
from orchestrator.track.parent_run import ParentRun

STATUS_OF_STATE = {"completed": "FINISHED", "early_stopped": "KILLED", "failed": "FAILED"}


class SweepRun:
    def __init__(self, tracking: TrackingPlan) -> None:
        self.parent = ParentRun(tracking)
        self.client, self.experiment_id = self.parent.client, self.parent.experiment_id

    @property
    def run_id(self) -> Optional[str]:
        return self.parent.run_id

    def start_sweep(self, plan: SweepPlan, max_concurrent: int) -> str:
        self.parent.create(plan.run_name, plan.base_plan.storage_path, {"orch.recipe": "sweep", "orch.sweep": plan.name})
        params = {f"space.{dim.key}": dim.describe() for dim in plan.dimensions}
        params.update(
            {
                "search": plan.search,
                "scheduler": plan.scheduler["name"],
                "metric": plan.metric,
                "mode": plan.mode,
                "num_samples": plan.num_samples,
                "max_concurrent_trials": max_concurrent,
                "seed": plan.seed,
                "base_recipe": plan.base_plan.stages[0].recipe,
                "base_overrides": " ".join(plan.overrides),
            }
        )
        if plan.objectives:  # several metrics: the outcome is a Pareto front (pareto/ artifacts), not one best
            params.update({"objectives": ", ".join(f"{m}:{d}" for m, d in plan.objectives.items())})
            del params["metric"], params["mode"]
        if plan.scheduler["name"] == "asha":
            params.update({f"asha.{k}": plan.scheduler[k] for k in ("grace_period", "reduction_factor", "max_t")})
        self.parent.log_params(params)
        self.parent.log_text(json.dumps(plan.config, indent=2, default=str), "config/sweep.json")
        return self.parent.run_id  # type: ignore[return-value]

    def resume_sweep(self, run_name: str, storage_path: str) -> str:
        """`resume=NAME`: the same parent run (same name and storage), RUNNING again, its resumes counted."""
        run_id = self.parent.reopen(run_name, storage_path, "sweep")
        resumes = int(self.client.get_run(run_id).data.tags.get("orch.resumes", "0")) + 1
        self.parent.set_tag("orch.resumes", str(resumes))
        return run_id

    def trial_runs(self) -> dict[str, Any]:
        """Trial id -> its MLflow child run."""
        runs = self.client.search_runs([self.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{self.run_id}'")
        return {run.data.tags[TRIAL_TAG]: run for run in runs if TRIAL_TAG in run.data.tags}

    def close_trial(self, run_id: str, state: str, error: Optional[str]) -> None:
        """Record Tune's outcome on the child; a trial Tune stopped or lost never closed its own run."""
        self.client.set_tag(run_id, STATE_TAG, state)
        if error:
            self.client.set_tag(run_id, "orch.trial_error", error[:4000])
        # a stopped trial may have closed its own run as FAILED while Tune tore it down: its outcome is Tune's
        if state != "completed" or self.client.get_run(run_id).info.status == "RUNNING":
            self.client.set_terminated(run_id, STATUS_OF_STATE[state])

    def mark_best(self, run_id: str, metric: str, value: float) -> None:
        self.client.set_tag(run_id, BEST_TAG, "true")
        self.parent.set_tag("orch.best_trial_run_id", run_id)
        self.parent.log_metrics({f"best_{metric}": value})

    def log_artifacts(self, directory: str, artifact_path: Optional[str] = None) -> None:
        self.parent.log_artifacts(directory, artifact_path)

    def log_metrics(self, metrics: dict[str, Any]) -> None:
        self.parent.log_metrics(metrics)

    def finish(self, status: str) -> None:
        self.parent.finish(status)
