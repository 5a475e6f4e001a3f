"""`resume=` on another number of workers (ZeRO-2, through DeepSpeed's universal checkpoint): the same MLflow run
continues at the same optimizer step with the same global batch, in a new attempt folder, and every file the first
attempt wrote is byte-identical afterwards. Two fits in all (1 worker, then 2), shared by the tests of this module."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from mlflow import MlflowClient

from orchestrator.config import compose
from orchestrator.config.validate import ConfigError
from orchestrator.plan import build_plan
from orchestrator.stage_runner import run_plan

pytestmark = pytest.mark.slow

COMMON = [
    "trainer.zero_stage=2",
    "trainer.precision=fp32",
    "trainer.micro_batch_size=16",
    "trainer.log_every=1",
    "trainer.eval_every=0",
    "trainer.checkpoint_every=10",
    "trainer.keep_checkpoints=1",
    "tracking.system_metrics=false",
    "tracking.log_model=false",  # checkpoints are the subject: no test reads an exported model here (~4 CPU-s a fit)
]


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def client(workdir) -> MlflowClient:
    return MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")


@pytest.fixture(scope="module")
def first(ray_instance, workdir):
    plan = build_plan(compose([*COMMON, "name=resize", "trainer.num_workers=1", "trainer.grad_accum_steps=2",
                               "trainer.max_steps=20"]), cwd=workdir)
    [result] = run_plan(plan)
    run_dir = workdir / "orch_runs" / "resize"
    return result, run_dir, {name: digests(run_dir / name) for name in ("checkpoint_step_00000010", "checkpoint_step_00000020")}


@pytest.fixture(scope="module")
def resumed(first, workdir):
    plan = build_plan(compose([*COMMON, "resume=resize", "trainer.num_workers=2", "trainer.max_steps=30"]), cwd=workdir)
    [result] = run_plan(plan)
    return plan, result


def test_the_first_attempt_keeps_its_last_good_checkpoint_beside_the_newest(first):
    _, run_dir, saved = first
    assert set(saved) == {"checkpoint_step_00000010", "checkpoint_step_00000020"}  # keep_checkpoints=1, plus one
    assert ".orch_complete_rank0" in saved["checkpoint_step_00000020"]


def test_resume_on_two_workers_continues_the_same_run_at_the_same_step(first, resumed, client):
    original, _, _ = first
    plan, result = resumed
    assert result.run_id == original.run_id
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["orch.resumed_at_step"] == "20"
    steps = [m.step for m in client.get_metric_history(result.run_id, "loss")]
    assert sorted(steps) == list(range(1, 31)), "a step was logged twice or lost"
    # the global batch of the run (1 x 16 x 2) is kept: 2 workers x 16 x 1
    assert plan.stages[0].config["trainer"]["grad_accum_steps"] == 1
    assert plan.stages[0].deepspeed["train_batch_size"] == 32


def test_the_first_attempts_checkpoints_are_byte_identical_and_the_resume_wrote_elsewhere(first, resumed):
    _, run_dir, saved = first
    _, result = resumed
    for name, files in saved.items():
        assert digests(run_dir / name) == files, f"{name} changed"
    assert Path(result.checkpoint_path) == run_dir / "resume-1" / "checkpoint_step_00000030"
    universal = run_dir / "checkpoint_step_00000020.universal"
    assert (universal / ".orch_universal_complete").is_file() and list(universal.glob("step_00000020/zero/*"))


def test_a_world_size_that_cannot_keep_the_global_batch_is_refused_before_ray(first, resumed, workdir):
    # the newest checkpoint (2 workers x 16 x 1 = 32): 1 worker x 24 cannot make 32 up
    plan = build_plan(compose([*COMMON, "resume=resize", "trainer.num_workers=1", "trainer.micro_batch_size=24",
                               "trainer.max_steps=40"]), cwd=workdir)
    with pytest.raises(ConfigError, match=r"^trainer.num_workers=1: .*global batch of 32.*trainer.micro_batch_size=24"):
        run_plan(plan)
    plan = build_plan(compose([*COMMON, "resume=resize", "trainer.zero_stage=0", "trainer.max_steps=40"]), cwd=workdir)
    with pytest.raises(ConfigError, match=r"^trainer.zero_stage=0: .*ZeRO-2"):
        run_plan(plan)
