"""The driver's MLflow run for one stage: created once, found again on resume, closed with the stage's outcome.

One logical run ↔ one MLflow run: the run is keyed by the orch run name (tag `orch.run_name`), so `resume=` and a
driver restarted with the same name continue the same MLflow run id instead of creating another.
"""

from __future__ import annotations

import json
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

import yaml

from orchestrator.config.secrets import redacted
from orchestrator.config.trust import BUILT_IN_MODEL_TARGETS
from orchestrator.plan import StagePlan, TrackingPlan

RUN_NAME_TAG = "orch.run_name"
# where the run keeps its checkpoints (canonical spelling): resume= reopens a run of this name only when it was
# written to the same storage, so a shared MLflow server never hands one user's run to another's same-named run
STORAGE_TAG = "orch.storage_path"
PARENT_TAG = "mlflow.parentRunId"
# a hash of what shaped a stage's model (orchestrator.plan.stage_key), set once its model is logged: a pipeline
# reuses a FINISHED run that carries its stage's key
CACHE_KEY_TAG = "orch.cache_key"
METRICS_PLOTTED = ("loss", "val_loss", "val_accuracy", "val_perplexity")
# MLflow 3's experiment kind (the UI reads it to pick its layout): "custom_model_development" opens on the runs table,
# where genai_development would open on traces
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"


def check_tracking_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """An MLflow server that does not answer fails the run in seconds, before Ray starts, with the key to fix: MLflow's
    own client retries for minutes and ends in a traceback. One request to the server's /health; any HTTP answer
    (an auth error included) means a server is there. Other stores (sqlite, files, databricks) are not probed."""
    import urllib.error
    import urllib.request

    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s).close()  # noqa: S310 - http(s) only
    except urllib.error.HTTPError:
        return
    except (OSError, ValueError) as error:
        from orchestrator.config.validate import ConfigError

        reason = getattr(error, "reason", None) or error
        raise ConfigError("tracking.uri", uri, f"no MLflow server answers there ({reason}); start it, or fix tracking.uri "
                          "(or MLFLOW_TRACKING_URI)") from None


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


def experiment_id(client: Any, tracking: TrackingPlan) -> str:
    """The id of the plan's experiment, created (with its artifact location) the first time it is used, and marked
    as a model-training experiment unless it already has a kind (someone else's choice stays)."""
    experiment = client.get_experiment_by_name(tracking.experiment)
    if experiment is None:
        return client.create_experiment(
            tracking.experiment, artifact_location=tracking.artifact_location,
            tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND},
        )
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    return experiment.experiment_id


def data_name(data_cfg: Mapping[str, Any]) -> str:
    """A dataset's name in MLflow: the data module (digits, synthetic, text), and the files of a text dataset."""
    target = str(data_cfg.get("_target_", "data"))
    name = target.rsplit(".", 2)[-2] if target.count(".") >= 2 else target
    return f"{name}:{Path(str(data_cfg['path'])).name}" if data_cfg.get("path") else name


def log_dataset_input(client: Any, run_id: str, data_cfg: Mapping[str, Any], context: str) -> None:
    """The run's data as an MLflow dataset input (the runs table's Datasets column): metadata only, nothing is
    uploaded. Its source holds the data config and its digest is a hash of it, so runs on the same data (same
    split, same limit) show the same digest."""
    import hashlib

    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    config = json.dumps(dict(data_cfg), sort_keys=True, default=str)
    dataset = MetaDataset(
        CodeDatasetSource(tags={"orch.data": config}),
        name=data_name(data_cfg),
        digest=hashlib.sha256(config.encode()).hexdigest()[:16],
    )
    client.log_inputs(
        run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])]
    )


def register_model(tracking_uri: str, run_id: str, name: str, alias: str) -> str:
    """A new version of registered model `name` from the run's MLflow Model, with `alias` pointing at it (moved from
    an older version). Returns its URI, models:/NAME/VERSION."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from orchestrator.artifacts.mlflow_model import MLFLOW_MODEL_DIR
    from orchestrator.artifacts.source import MODEL_ARTIFACT

    client = MlflowClient(tracking_uri)
    source = f"{MODEL_ARTIFACT}/{MLFLOW_MODEL_DIR}"
    if not client.list_artifacts(run_id, source):
        from orchestrator.config.validate import ConfigError

        reason = client.get_run(run_id).data.tags.get("orch.mlflow_model_error", "it was not logged")
        raise ConfigError("tracking.register_as", name, f"run {run_id} has no MLflow Model ({source}) to register: {reason}")
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="registered by orch (tracking.register_as)")
    version = client.create_model_version(
        name, f"runs:/{run_id}/{source}", run_id=run_id,
        tags={"orch.run_name": client.get_run(run_id).data.tags.get(RUN_NAME_TAG, "")},
    )
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return f"models:/{name}/{version.version}"


def new_run_tags(run_name: str, storage_path: str, **tags: str) -> dict[str, str]:
    """Tags every new run of orch's carries: its orch run name, its storage and, from a git checkout, the commit."""
    from orchestrator.config.validate import canonical_storage

    all_tags = {RUN_NAME_TAG: run_name, STORAGE_TAG: canonical_storage(storage_path), **tags}
    commit = git_commit()
    if commit:
        all_tags["mlflow.source.git.commit"] = commit
    return all_tags


def find_run(client: Any, experiment: str, experiment_id: str, run_name: str, storage_path: str) -> Any:
    """The newest run of the experiment with this orch run name that was written to `storage_path`, or None. When
    only runs of that name with another storage exist (someone else's run on a shared server), resuming is refused:
    continuing it would overwrite their run. A run older than the storage tag matches by name alone."""
    from orchestrator.config.validate import ConfigError, canonical_storage

    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=100,
        order_by=["attributes.start_time DESC"],
    )
    storage = canonical_storage(storage_path)
    for run in runs:
        if run.data.tags.get(STORAGE_TAG, storage) == storage:
            return run
    if runs:
        elsewhere = runs[0].data.tags[STORAGE_TAG]
        raise ConfigError(
            "resume", run_name, f"the MLflow run of this name in experiment {experiment!r} belongs to storage {elsewhere}, "
            f"not trainer.storage_path={storage}; resume it with that storage_path, or start a new run with another name",
        )
    return None


def source_tags(sources: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
    """What a stage read, as tags: orch.<role>_run_id, _stage, _model_uri (a registered version), _path."""
    tags = {}
    for role, source in sources.items():
        for field_name in ("run_id", "stage", "model_uri", "path"):
            if field_name in source:
                tags[f"orch.{role}_{field_name}"] = source[field_name]
    return tags


@contextmanager
def closed_with_outcome(finish: Callable[[str], None]) -> Iterator[None]:
    """Close a run as FINISHED when the block completes, KILLED on Ctrl-C, FAILED on any other error."""
    status = "FAILED"
    try:
        yield
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        finish(status)


@contextmanager
def log_file_attached(log_artifact: Callable[[str, str], None], log_file: Optional[Path]) -> Iterator[None]:
    """Log the run's log file as the artifact `logs/<its name>` when the block ends, however it ends: a failed run's
    log is the one most worth keeping. `log_artifact(path, artifact_dir)`: the run's own method."""
    try:
        yield
    finally:
        if log_file is not None and log_file.is_file():
            log_artifact(str(log_file), "logs")


class StageRun:
    """One stage's MLflow run, through its own client: no process-global MLflow state (active run, tracking URI)
    is read or written, so two runs in one process cannot cross."""

    def __init__(self, tracking: TrackingPlan) -> None:
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking.uri)
        self.experiment_id = experiment_id(self.client, tracking)
        self.tracking = tracking
        self.run_id: Optional[str] = None

    def find(self, run_name: str, storage_path: str) -> Optional[str]:
        run = find_run(self.client, self.tracking.experiment, self.experiment_id, run_name, storage_path)
        return run.info.run_id if run is not None else None

    def start(
        self,
        stage: StagePlan,
        resuming: bool,
        parent_run_id: Optional[str] = None,
        tags: Optional[Mapping[str, str]] = None,
    ) -> str:
        """Open the stage's run (a child of `parent_run_id` in a pipeline), or reopen it when `resuming`."""
        suffix = ""
        if resuming:
            existing = self.find(stage.run_name, stage.storage_path)
            if existing is None:
                raise LookupError(
                    f"resume={stage.run_name}: no MLflow run tagged {RUN_NAME_TAG}={stage.run_name} in experiment "
                    f"{self.tracking.experiment!r} at {self.tracking.uri}"
                )
            self.run_id = existing
            self.client.update_run(existing, status="RUNNING")
            # params are immutable in MLflow: a resumed run keeps those it started with
            resumes = int(self.client.get_run(existing).data.tags.get("orch.resumes", "0")) + 1
            self.client.set_tag(existing, "orch.resumes", str(resumes))
            suffix = f"_resume_{resumes}"
        else:
            extra = {"orch.recipe": stage.recipe, "orch.stage": stage.name, **(tags or {})}
            if stage.kind:
                extra["orch.kind"] = stage.kind
            if parent_run_id:
                extra[PARENT_TAG] = parent_run_id  # how MLflow nests a run under another
            display_name = stage.name if parent_run_id else stage.run_name
            run = self.client.create_run(self.experiment_id, run_name=display_name, tags=new_run_tags(stage.run_name, stage.storage_path, **extra))
            self.run_id = run.info.run_id
            from mlflow.entities import Param

            params = [Param(key, str(value)) for key, value in flatten(redacted(stage.config)).items()]
            self.client.log_batch(self.run_id, params=params, synchronous=True)
            context = "training" if stage.config["recipe"]["runs_on"] == "workers" else "evaluation"
            log_dataset_input(self.client, self.run_id, stage.config["data"], context)
        recorded = yaml.safe_dump(redacted(stage.config), sort_keys=False)
        self.client.log_text(self.run_id, recorded, f"config/resolved{suffix}.yaml")
        self.client.log_dict(self.run_id, stage.deepspeed, f"config/deepspeed{suffix}.json")
        return self.run_id

    def log_metrics(self, metrics: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, 0) for key, value in metrics.items() if isinstance(value, (int, float))]
        self.client.log_batch(self.run_id, metrics=batch, synchronous=True)

    def log_artifacts(self, directory: str | Path, artifact_path: str) -> None:
        self.client.log_artifacts(self.run_id, str(directory), artifact_path)

    def log_artifact(self, path: str | Path, artifact_path: str) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def log_curves(self, title: str) -> None:
        from orchestrator.track.plots import loss_curve

        history = {
            key: [(m.step, m.value) for m in self.client.get_metric_history(self.run_id, key)] for key in METRICS_PLOTTED
        }
        self.client.log_figure(self.run_id, loss_curve(history, title), "plots/loss_curve.png")

    def log_compression(self, model_dir: str | Path, recipe: Mapping[str, Any], allowed: Iterable[str] = BUILT_IN_MODEL_TARGETS) -> None:
        """For a stage that pruned: the per-layer sparsity table (MLflow table + markdown) and the totals.
        `allowed`: the classes the exported model.yaml may name (the stage config's trusted model targets)."""
        pruned = (recipe.get("pruning") or {}).get("schedule", "none") != "none"
        if not pruned and not (recipe.get("structured") or {}).get("ratio", 0):
            return
        from orchestrator.artifacts.export import load_exported
        from orchestrator.compress import (
            count_parameters,
            prunable_parameters,
            realized_sparsity,
            sparsity_table,
        )
        from orchestrator.track.tables import markdown_table

        model = load_exported(model_dir, allowed=allowed)
        rows = [{**row, "shape": "x".join(map(str, row["shape"]))} for row in sparsity_table(model)]
        self.client.log_table(self.run_id, {key: [row[key] for row in rows] for key in rows[0]}, "sparsity/table.json")
        self.client.log_text(self.run_id, markdown_table(rows), "sparsity/table.md")
        nonzero = sum(int(p.count_nonzero()) for p in model.parameters())
        self.log_metrics(
            {
                "final_sparsity": realized_sparsity(dict(prunable_parameters(model))),
                "parameters": count_parameters(model),
                "nonzero_parameters": nonzero,
            }
        )

    def finish(self, status: str) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status)
