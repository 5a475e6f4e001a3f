"""Where a stage's model comes from: an MLflow run's `model` artifact (by run id, runs:/ URI, or a Model Registry
version, models:/), an exported model dir, or an orch checkpoint.

The driver turns each reference written in the config (a pipeline stage name, a run id, a `runs:/` URI, a path) into
a *source*: a small plain dict that crosses into Ray. Workers and the driver then fetch the model from it. Loading
is always safetensors plus a YAML config (`orchestrator.artifacts.export.load_exported`): no pickle from another run is
ever executed, and the config may only name the classes the caller's own config trusts
(`orchestrator.config.trust.trusted_model_targets`). On a cluster, a path must be visible to every worker; MLflow sources work anywhere the tracking
server is reachable.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import yaml
from torch import nn

from orchestrator.artifacts.export import (
    CONFIG_FILE,
    MODEL_SPEC_FILE,
    export_model,
    load_exported,
)
from orchestrator.config.trust import BUILT_IN_MODEL_TARGETS, checked_model_config
from orchestrator.config.validate import REGISTERED_MODEL, RUN_ID, ConfigError

MODEL_ARTIFACT = "model"
# a progress bar per download floods the logs of every worker of every stage
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def model_source(reference: str, tracking_uri: str, stage_runs: Mapping[str, str], key: str = "model") -> dict[str, str]:
    """`stage_runs` maps the pipeline's finished stages to their MLflow run ids. A registered model (models:/) is
    looked up here, on the driver: the source names the run that logged that version (`key`: the config key that
    holds the reference, for errors)."""
    if reference in stage_runs:
        return {"run_id": stage_runs[reference], "artifact_path": MODEL_ARTIFACT, "tracking_uri": tracking_uri, "stage": reference}
    if reference.startswith("models:/"):
        return registered_model_source(reference, tracking_uri, key)
    if reference.startswith("runs:/"):
        run_id, _, path = reference[len("runs:/"):].partition("/")
        return {"run_id": run_id, "artifact_path": path or MODEL_ARTIFACT, "tracking_uri": tracking_uri}
    if RUN_ID.fullmatch(reference):
        return {"run_id": reference, "artifact_path": MODEL_ARTIFACT, "tracking_uri": tracking_uri}
    return {"path": str(Path(reference).expanduser().resolve())}


def registered_model_source(reference: str, tracking_uri: str, key: str) -> dict[str, str]:
    """The run behind a Model Registry version (models:/NAME@alias or models:/NAME/VERSION). orch reads that run's
    `model` folder (safetensors + model.yaml), never the registered MLflow Model itself (a version's source is the
    run's model/mlflow_model, as `tracking.register_as` registers it)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    match = REGISTERED_MODEL.fullmatch(reference)
    if match is None:
        raise ConfigError(key, reference, "expected models:/NAME@alias or models:/NAME/VERSION")
    client = MlflowClient(tracking_uri)
    try:
        if match["alias"]:
            version = client.get_model_version_by_alias(match["name"], match["alias"])
        elif match["version"] == "latest":
            newest = client.search_model_versions(f"name = '{match['name']}'", order_by=["version_number DESC"], max_results=1)
            if not newest:
                raise ConfigError(key, reference, f"registered model {match['name']!r} has no versions at {tracking_uri}")
            version = newest[0]
        else:
            version = client.get_model_version(match["name"], match["version"])
    except MlflowException as error:
        raise ConfigError(key, reference, f"no such registered model version at {tracking_uri} ({error.message})") from error
    if not version.run_id:
        raise ConfigError(key, reference, "this version was not logged by a run: orch reads a run's model folder")
    artifact_path = MODEL_ARTIFACT
    if version.source.startswith("runs:/"):  # runs:/<id>/<folder>/mlflow_model: the folder beside it
        path = version.source[len("runs:/"):].partition("/")[2]
        artifact_path = path.rsplit("/", 1)[0] if path.endswith("/mlflow_model") else (path or MODEL_ARTIFACT)
    return {
        "run_id": version.run_id, "artifact_path": artifact_path, "tracking_uri": tracking_uri,
        "model_uri": f"models:/{match['name']}/{version.version}",
    }


def fetch_model_dir(source: Mapping[str, str], scratch: str | Path, allowed: Iterable[str] = BUILT_IN_MODEL_TARGETS) -> Path:
    """A local directory with model.yaml + model.safetensors for `source`; downloads or exports into `scratch`.
    `allowed`: the classes a checkpoint's model spec may name, when a checkpoint is exported."""
    if "run_id" in source:
        import mlflow

        local = mlflow.artifacts.download_artifacts(
            run_id=source["run_id"], artifact_path=source["artifact_path"], dst_path=str(scratch),
            tracking_uri=source["tracking_uri"],
        )
        return Path(local)
    path = Path(source["path"])
    if (path / CONFIG_FILE).is_file():
        return path
    checkpoint = _latest_checkpoint(path)
    if checkpoint is None:
        raise FileNotFoundError(f"{path} holds neither an exported model ({CONFIG_FILE}) nor an orch checkpoint")
    if not (checkpoint / MODEL_SPEC_FILE).is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} has no {MODEL_SPEC_FILE}: it was not written by orch's loop")
    return export_model(checkpoint, {}, Path(scratch) / "exported", allowed)


def _latest_checkpoint(path: Path) -> Optional[Path]:
    """`path` itself when it is a DeepSpeed checkpoint, else its newest checkpoint_* (a Ray Train run directory)."""
    if (path / "latest").is_file():
        return path
    candidates = sorted(p for p in path.glob("checkpoint_*") if (p / "latest").is_file())
    return candidates[-1] if candidates else None


def load_model(source: Mapping[str, str], allowed: Iterable[str] = BUILT_IN_MODEL_TARGETS) -> tuple[nn.Module, dict[str, Any]]:
    """The model `source` names (eval mode, CPU; fp32, or quantized if its stage quantized it) and its config, which
    is the architecture it really has (a structured-pruning stage upstream made it smaller than its stage config).
    `allowed`: the classes its config may name (`trusted_model_targets` of the loading run's config)."""
    with tempfile.TemporaryDirectory(prefix="orch-model-") as scratch:
        model_dir = fetch_model_dir(source, scratch, allowed)
        model = load_exported(model_dir, allowed=allowed)
        return model, checked_model_config(yaml.safe_load((model_dir / CONFIG_FILE).read_text()), str(model_dir / CONFIG_FILE), allowed)


def source_model_config(source: Mapping[str, str], key: str, allowed: Iterable[str] = BUILT_IN_MODEL_TARGETS) -> dict[str, Any]:
    """The config of the model a source names (for checks on the driver), checked against `allowed` by name (nothing
    is built); a missing model is a ConfigError on `key`, and so is a config that names another class."""
    try:
        with tempfile.TemporaryDirectory(prefix="orch-model-") as scratch:
            if "run_id" in source:
                import mlflow

                local = Path(mlflow.artifacts.download_artifacts(
                    run_id=source["run_id"], artifact_path=f"{source['artifact_path']}/{CONFIG_FILE}",
                    dst_path=scratch, tracking_uri=source["tracking_uri"],
                ))
            else:
                local = fetch_model_dir(source, scratch, allowed) / CONFIG_FILE
            loaded, origin = yaml.safe_load(local.read_text()), str(local)
    except ConfigError:
        raise
    except Exception as error:  # noqa: BLE001 - any way of not finding it is the same user error
        raise ConfigError(key, source.get("run_id") or source.get("path"), f"no model found there ({error})") from error
    if "run_id" in source:
        origin = f"runs:/{source['run_id']}/{source['artifact_path']}/{CONFIG_FILE}"  # not the temporary download
    return checked_model_config(loaded, key, allowed, origin=origin)
