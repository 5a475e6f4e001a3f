"""The driver's MLflow run for one stage: created once, found again on resume, closed with the stage's outcome.

One logical run ↔ one MLflow run: the run is keyed by the orch run name (tag `orch.run_name`), so `resume=` and a
driver restarted with the same name continue the same MLflow run id instead of creating another.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

from orchestrator.plan import StagePlan, TrackingPlan

RUN_NAME_TAG = "orch.run_name"
PARENT_TAG = "mlflow.parentRunId"
METRICS_PLOTTED = ("loss", "val_loss", "val_accuracy", "val_perplexity")


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, dict)) else value
    return flat


def git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


class StageRun:
    def __init__(self, tracking: TrackingPlan) -> None:
        import mlflow

        self.mlflow = mlflow
        # set_tracking_uri also exports MLFLOW_TRACKING_URI; put it back in finish() so that the next run in this
        # process (a Hydra multirun job, a notebook cell) resolves its own tracking settings
        self._previous_uri_env = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(tracking.uri)
        self.client = mlflow.MlflowClient(tracking.uri)
        experiment = self.client.get_experiment_by_name(tracking.experiment)
        if experiment is None:
            self.experiment_id = self.client.create_experiment(
                tracking.experiment, artifact_location=tracking.artifact_location
            )
        else:
            self.experiment_id = experiment.experiment_id
        self.tracking = tracking
        self.run_id: Optional[str] = None

    def find(self, run_name: str) -> Optional[str]:
        runs = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1
        )
        return runs[0].info.run_id if runs else None

    def start(
        self,
        stage: StagePlan,
        resuming: bool,
        parent_run_id: Optional[str] = None,
        tags: Optional[Mapping[str, str]] = None,
    ) -> str:
        """Open the stage's run (a child of `parent_run_id` in a pipeline), or reopen it when `resuming`."""
        existing = self.find(stage.run_name)
        if resuming:
            if existing is None:
                raise LookupError(
                    f"resume={stage.run_name}: no MLflow run tagged {RUN_NAME_TAG}={stage.run_name} in experiment "
                    f"{self.tracking.experiment!r} at {self.tracking.uri}"
                )
            self.mlflow.start_run(run_id=existing)  # reopens it as RUNNING
        else:
            all_tags = {RUN_NAME_TAG: stage.run_name, "orch.recipe": stage.recipe, "orch.stage": stage.name, **(tags or {})}
            if stage.kind:
                all_tags["orch.kind"] = stage.kind
            if parent_run_id:
                all_tags[PARENT_TAG] = parent_run_id  # how MLflow nests a run under another
            commit = git_commit()
            if commit:
                all_tags["mlflow.source.git.commit"] = commit
            display_name = stage.name if parent_run_id else stage.run_name
            self.mlflow.start_run(experiment_id=self.experiment_id, run_name=display_name, tags=all_tags)
        self.run_id = self.mlflow.active_run().info.run_id
        suffix = ""
        if resuming:  # params are immutable in MLflow: a resumed run keeps those it started with
            resumes = int(self.client.get_run(self.run_id).data.tags.get("orch.resumes", "0")) + 1
            self.mlflow.set_tag("orch.resumes", str(resumes))
            suffix = f"_resume_{resumes}"
        else:
            self.mlflow.log_params(flatten(stage.config), synchronous=True)
        self.mlflow.log_text(yaml.safe_dump(stage.config, sort_keys=False), f"config/resolved{suffix}.yaml")
        self.mlflow.log_dict(stage.deepspeed, f"config/deepspeed{suffix}.json")
        return self.run_id

    def log_curves(self, title: str) -> None:
        from orchestrator.track.plots import loss_curve

        history = {
            key: [(m.step, m.value) for m in self.client.get_metric_history(self.run_id, key)] for key in METRICS_PLOTTED
        }
        figure = loss_curve(history, title)
        self.mlflow.log_figure(figure, "plots/loss_curve.png")

    def log_compression(self, model_dir: str | Path, recipe: Mapping[str, Any]) -> None:
        """For a stage that pruned: the per-layer sparsity table (MLflow table + markdown) and the totals."""
        pruned = (recipe.get("pruning") or {}).get("schedule", "none") != "none"
        if not pruned and not (recipe.get("structured") or {}).get("ratio", 0):
            return
        from orchestrator.compress import count_parameters, prunable_parameters, realized_sparsity, sparsity_table
        from orchestrator.track.tables import markdown_table
        from orchestrator.train.export import load_exported

        model = load_exported(model_dir)
        rows = [{**row, "shape": "x".join(map(str, row["shape"]))} for row in sparsity_table(model)]
        self.mlflow.log_table({key: [row[key] for row in rows] for key in rows[0]}, "sparsity/table.json")
        self.mlflow.log_text(markdown_table(rows), "sparsity/table.md")
        nonzero = sum(int(p.count_nonzero()) for p in model.parameters())
        self.mlflow.log_metrics(
            {
                "final_sparsity": realized_sparsity(dict(prunable_parameters(model))),
                "parameters": count_parameters(model),
                "nonzero_parameters": nonzero,
            }
        )

    def finish(self, status: str) -> None:
        self.mlflow.end_run(status=status)
        if self._previous_uri_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = self._previous_uri_env
