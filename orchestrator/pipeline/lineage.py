"""A pipeline's MLflow structure: one parent run, one child run per stage, lineage tags, and the stage cache.

* Parent: tagged orch.run_name=<pipeline run name>, orch.recipe=pipeline; holds the pipeline config, a tag
  orch.stage.<name>.run_id per stage, and the compression report.
* Child (one per stage, `mlflow.parentRunId` = parent): orch.stage, orch.kind, orch.<role>_run_id and
  orch.<role>_stage for every input it read (role: input, teacher), and, once its model is logged, orch.cache_key.
  The parent's metrics summarize the report: the final stage's quality and size and its ratios to the first stage.
* Cache: a stage is reused when a FINISHED run carries its cache key (a hash of its resolved config and, recursively,
  of its inputs' configs: `orchestrator.plan.stage_key`) *and* read the very same input runs. A reused stage that
  belongs to another pipeline run gets a small FINISHED child here, tagged orch.reused_run_id, so the parent still
  shows every stage; its model stays in the original run, which is what the next stage reads.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import yaml

from orchestrator.config.secrets import redacted

from orchestrator.pipeline.plan import PipelinePlan
from orchestrator.plan import StagePlan, TrackingPlan
from orchestrator.track.mlflow_run import CACHE_KEY_TAG, PARENT_TAG, source_tags
from orchestrator.track.parent_run import ParentRun

REUSED_TAG = "orch.reused_run_id"


def input_tags(stage: StagePlan, sources: Mapping[str, Mapping[str, str]], pipeline_run: str) -> dict[str, str]:
    return {"orch.pipeline_run": pipeline_run, **source_tags(sources)}


class PipelineRun:
    def __init__(self, tracking: TrackingPlan) -> None:
        self.parent = ParentRun(tracking)
        self.client, self.experiment_id = self.parent.client, self.parent.experiment_id

    @property
    def run_id(self) -> Optional[str]:
        return self.parent.run_id

    def start(self, plan: PipelinePlan, nested_in: Optional[str] = None, tags: Optional[Mapping[str, str]] = None) -> str:
        """Create the parent run, or reopen it for `resume=`. `nested_in`: a run this pipeline run belongs under (a
        sweep's parent, when the pipeline is one trial), with `tags` of its own (the trial's id)."""
        if plan.resuming:
            return self.parent.reopen(plan.run_name, plan.storage_path, "pipeline")
        extra = {**(tags or {}), **({PARENT_TAG: nested_in} if nested_in else {})}
        self.parent.create(plan.run_name, plan.storage_path, {"orch.recipe": "pipeline", "orch.pipeline": plan.name, **extra})
        self.parent.log_text(yaml.safe_dump(redacted(plan.config), sort_keys=False), "config/pipeline.yaml")
        self.parent.log_params({"stages": " -> ".join(f"{s.name}:{s.kind}" for s in plan.stages)})
        return self.parent.run_id  # type: ignore[return-value]

    def find_finished(self, stage: StagePlan, sources: Mapping[str, Mapping[str, str]]) -> Any:
        """The newest FINISHED run with the stage's cache key that read the same input runs, or None."""
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{CACHE_KEY_TAG}` = '{stage.key}' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
        )
        expected = {f"orch.{role}_run_id": source["run_id"] for role, source in sources.items() if "run_id" in source}
        for run in runs:
            if all(run.data.tags.get(tag) == run_id for tag, run_id in expected.items()):
                return run
        return None

    def has_unfinished(self, stage: StagePlan) -> bool:
        """Whether this pipeline run already started the stage (same name and key) and did not finish it."""
        run = self.parent.find_by_name(stage.run_name, stage.storage_path)
        return run is not None and run.info.status != "FINISHED"

    def record_reuse(self, stage: StagePlan, run: Any) -> None:
        """A child here that points at the reused run (unless the run is already a child of this parent)."""
        if run.data.tags.get(PARENT_TAG) == self.run_id:
            return
        tags = {
            PARENT_TAG: self.run_id,
            "orch.stage": stage.name,
            "orch.kind": stage.kind,
            REUSED_TAG: run.info.run_id,
        }
        stub = self.client.create_run(self.experiment_id, run_name=f"{stage.name} (reused)", tags=tags)
        for key, value in run.data.metrics.items():
            self.client.log_metric(stub.info.run_id, key, value)
        self.client.set_terminated(stub.info.run_id, "FINISHED")

    def record_stage(self, stage: StagePlan, run_id: str) -> None:
        self.parent.set_tag(f"orch.stage.{stage.name}.run_id", run_id)

    def log_report(self, directory: str) -> None:
        self.parent.log_artifacts(directory, "report")

    def log_summary(self, metrics: Mapping[str, float]) -> None:
        self.parent.log_metrics(metrics)

    def finish(self, status: str) -> None:
        self.parent.finish(status)
