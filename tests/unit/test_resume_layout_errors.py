"""`orch run resume=NAME` with a layout the run's checkpoints cannot continue in: exit 2, one line naming the key,
before Ray is imported, and the stored checkpoints untouched. The stored run is its checkpoint manifests (data)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pyarrow.fs import LocalFileSystem

from orchestrator.train.checkpoints import Layout, write_marker


@pytest.fixture()
def stored_run(tmp_path) -> Path:
    """A run trained on 2 workers at ZeRO-2 with a global batch of 2 x 16 x 1 = 32: one complete checkpoint."""
    checkpoint = tmp_path / "orch_runs" / "wide" / "checkpoint_step_00000010"
    checkpoint.mkdir(parents=True)
    (checkpoint / "payload").write_text("x")
    for rank in (0, 1):
        write_marker(LocalFileSystem(), str(checkpoint), rank, "step_00000010", Layout(2, 2, 16, 1), {"payload": 1})
    return tmp_path


@pytest.mark.parametrize(
    "arguments, names",
    [
        (["trainer.zero_stage=2", "trainer.num_workers=1", "trainer.micro_batch_size=24"],
         "trainer.num_workers=1: the run trained with a global batch of 32"),
        (["trainer.zero_stage=0"], "trainer.zero_stage=0: the run's checkpoints were written with ZeRO-2"),
    ],
    ids=["global-batch", "zero-stage"],
)
def test_a_layout_that_cannot_continue_the_run_stops_in_one_line_before_ray(stored_run, arguments, names):
    fake = stored_run.parent / f"{stored_run.name}-no-ray" / "ray"  # importing Ray would end in an ImportError
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('Ray was imported before the layout was checked')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(fake.parent), os.environ.get("PYTHONPATH")]))}
    checkpoints = stored_run / "orch_runs" / "wide" / "checkpoint_step_00000010"
    before = {p: p.read_bytes() for p in checkpoints.rglob("*") if p.is_file()}
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", "resume=wide", *arguments], cwd=stored_run,
                         capture_output=True, text=True, timeout=300, env=env)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("orch: error: "), out.stdout[-500:] + out.stderr
    assert names in lines[0]
    assert {p: p.read_bytes() for p in checkpoints.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in (stored_run / "orch_runs" / "wide").iterdir()) == ["checkpoint_step_00000010", "logs"]
    assert not (stored_run / "mlflow.db").exists()  # no MLflow run was reopened
