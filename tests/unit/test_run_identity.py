"""A run name is one run: a new name never continues stored checkpoints, whatever the storage's spelling or kind,
and `resume=` reopens only the MLflow run written to the same storage in the same experiment.

Storage kinds covered offline: a local path, the same folder spelled another way (`a/../a`), and a `file://` URI,
all listed through pyarrow.fs (the layer s3://, gs:// and hdfs:// go through too; none of those is reachable here).
No Ray: the MLflow store is a sqlite file in tmp.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.config import compose
from orchestrator.config.validate import ConfigError, canonical_storage, validate_run_name
from orchestrator.pipeline.plan import build_run_plan


@pytest.fixture()
def stored_run(tmp_path):
    storage = tmp_path / "store"
    (storage / "taken").mkdir(parents=True)
    return storage


@pytest.mark.parametrize("spelling", ["path", "dotdot", "file_uri"])
def test_a_new_run_with_a_stored_name_is_refused_in_every_spelling(stored_run, spelling):
    storage = {
        "path": str(stored_run),
        "dotdot": str(stored_run / ".." / stored_run.name),
        "file_uri": stored_run.as_uri(),
    }[spelling]
    with pytest.raises(ConfigError) as refused:
        validate_run_name("taken", None, storage)
    assert refused.value.key == "name" and "resume=taken" in str(refused.value)
    validate_run_name("taken", "taken", storage)  # resume finds it under the same spelling
    validate_run_name("fresh", None, storage)
    with pytest.raises(ConfigError) as missing:
        validate_run_name("fresh", "fresh", storage)
    assert missing.value.key == "resume"


def test_a_file_uri_storage_is_checked_through_the_plan(stored_run, tmp_path):
    with pytest.raises(ConfigError) as refused:
        build_run_plan(compose(["name=taken", f"trainer.storage_path={stored_run.as_uri()}"]), cwd=tmp_path)
    assert refused.value.key == "name"
    assert sorted(p.name for p in stored_run.iterdir()) == ["taken"]  # nothing written


def test_a_storage_pyarrow_cannot_open_is_one_line_naming_the_key(tmp_path):
    with pytest.raises(ConfigError) as refused:
        validate_run_name("x", None, "nosuchscheme://bucket/runs")
    assert refused.value.key == "trainer.storage_path" and "\n" not in str(refused.value)


def test_storage_spellings_are_one(tmp_path):
    assert canonical_storage(str(tmp_path / "a" / ".." / "b")) == str(tmp_path / "b")
    assert canonical_storage((tmp_path / "b").as_uri()) == str(tmp_path / "b")
    assert canonical_storage("s3://bucket/runs/") == "s3://bucket/runs"


def _plan(tmp_path, storage, *overrides):
    return build_run_plan(
        compose([f"trainer.storage_path={storage}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", *overrides]),
        cwd=tmp_path,
    )


def test_resume_reopens_only_the_run_of_its_own_storage(tmp_path):
    """Two users of one MLflow server, each with a run named `shared`: resume=shared from the second user's storage
    must not reopen (and overwrite) the first user's run."""
    from mlflow import MlflowClient

    from orchestrator.track.mlflow_run import STORAGE_TAG, StageRun

    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    first = _plan(tmp_path, theirs, "name=shared", "+cluster.env={API_KEY: hunter2, LOG_LEVEL: debug}")
    tracking = StageRun(first.tracking)
    their_run = tracking.start(first.stages[0], resuming=False)
    tracking.finish("FINISHED")
    client = MlflowClient(first.tracking.uri)
    assert client.get_run(their_run).data.tags[STORAGE_TAG] == str(theirs)
    # cluster.env reaches the workers, but its values are never recorded: names only
    assert first.stages[0].config["cluster"]["env"]["API_KEY"] == "hunter2"
    params = client.get_run(their_run).data.params
    assert params["cluster.env.API_KEY"] == params["cluster.env.LOG_LEVEL"] == "<redacted>"
    resolved = (Path(client.download_artifacts(their_run, "config/resolved.yaml", str(tmp_path)))).read_text()
    assert "hunter2" not in resolved and "API_KEY: <redacted>" in resolved

    (mine / "shared").mkdir(parents=True)  # my checkpoints of a run of the same name
    mine_plan = _plan(tmp_path, mine, "resume=shared")
    with pytest.raises(ConfigError) as refused:
        StageRun(mine_plan.tracking).start(mine_plan.stages[0], resuming=True)
    assert refused.value.key == "resume" and str(theirs) in str(refused.value)
    assert client.get_run(their_run).info.status == "FINISHED"  # untouched

    # from their own storage (spelled another way), resume reopens their run
    (theirs / "shared").mkdir(parents=True, exist_ok=True)
    again = _plan(tmp_path, f"{theirs}/../{theirs.name}", "resume=shared")
    assert StageRun(again.tracking).start(again.stages[0], resuming=True) == their_run

    # another experiment on the same server is another namespace
    other = _plan(tmp_path, theirs, "resume=shared", "tracking.experiment=elsewhere")
    with pytest.raises(LookupError):
        StageRun(other.tracking).start(other.stages[0], resuming=True)
