"""End to end on real Ray workers, real DeepSpeed engines and a real MLflow store (digits, 2 workers).

Fits are the expensive part (~25 CPU-s each), so each is made once and asserted on by several tests: ZeRO-0 fp32 (the
reference), a `resume=` of it, and a run that diverges (a second `resume=`, with no step left, starts no fit). A worker SIGKILLed mid-run is test_zero3_e2e's (the restart
through Ray Train and the exact replay from the checkpoint), and ZeRO-2 bf16 with identical weights on every rank is
test_pipeline_e2e's pruned stage: fits shared between modules, since the suite's time is mostly fits.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from orchestrator.config import compose
from orchestrator.plan import build_plan
from orchestrator.stage_runner import run_plan

pytestmark = pytest.mark.slow

COMMON = [
    "trainer.max_steps=100",
    "trainer.log_every=1",
    "trainer.eval_every=50",
    "trainer.checkpoint_every=25",
    "trainer.max_failures=1",
]
# every rank's weight digest in the final report: data parallelism must leave them identical
DIGESTS = "{_target_: orchestrator.train.callbacks.WeightDigests}"


def fit(workdir: Path, *overrides: str):
    plan = build_plan(compose([*COMMON, f"trainer.callbacks=[{DIGESTS}]", *overrides]), cwd=workdir)
    [result] = run_plan(plan)
    return plan, result


def loss_by_step(client: MlflowClient, run_id: str) -> dict[int, float]:
    """Last value logged per step: a restarted attempt re-logs the steps after its checkpoint."""
    return {m.step: m.value for m in sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.timestamp)}


@pytest.fixture(scope="module")
def client(workdir) -> MlflowClient:
    return MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")


@pytest.fixture(scope="module")
def reference(ray_instance, workdir):
    return fit(workdir, "name=zero0", "trainer.zero_stage=0", "trainer.precision=fp32")


def test_zero0_reaches_accuracy_with_identical_weights_on_every_rank(reference):
    _, result = reference
    assert result.metrics["val_accuracy"] >= 0.90
    digests = result.metrics["rank_weight_digests"].split(",")
    assert len(digests) == 2 and len(set(digests)) == 1


def test_one_mlflow_run_with_params_metrics_and_artifacts(reference, client):
    plan, result = reference
    runs = client.search_runs([result.experiment_id], filter_string="tags.`orch.run_name` = 'zero0'")
    assert len(runs) == 1, "one logical run must be one MLflow run, never one per worker"
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert "MLFLOW_TRACKING_URI" not in os.environ  # the run's URI does not leak into the next run in this process
    assert run.data.params["trainer.zero_stage"] == "0"
    assert run.data.params["model._target_"] == "orchestrator.models.mlp.MLP"
    assert run.data.tags["orch.recipe"] == "train"
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 100
    assert len(client.get_metric_history(run.info.run_id, "val_accuracy")) == 2
    assert "samples_per_s" in run.data.metrics and "lr" in run.data.metrics
    assert any(key.startswith("system/") for key in run.data.metrics), "system metrics missing"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)} | {
        a.path for d in ("config", "model", "plots") for a in client.list_artifacts(run.info.run_id, d)
    }
    for expected in ("config/resolved.yaml", "config/deepspeed.json", "model/model.safetensors", "model/model.yaml", "plots/loss_curve.png"):
        assert expected in artifacts
    # artifacts live where the experiment says, not in a worker's temp dir
    assert Path(run.info.artifact_uri.removeprefix("file://")).is_relative_to(plan.tracking.artifact_location.removeprefix("file://"))


def test_exported_model_loads_without_deepspeed_and_predicts(reference, client, tmp_path):
    from orchestrator.data.digits import load_digits_splits
    from orchestrator.artifacts.export import load_exported

    _, result = reference
    local = client.download_artifacts(result.run_id, "model", str(tmp_path))
    model = load_exported(local)
    val = load_digits_splits().val
    inputs, targets = val.tensors
    with torch.no_grad():
        accuracy = (model(inputs).argmax(-1) == targets).float().mean().item()
    assert accuracy == pytest.approx(result.metrics["val_accuracy"], abs=1e-6)


def test_explicit_resume_skips_a_corrupt_latest_checkpoint_and_continues_the_same_run(reference, client, workdir):
    _, first = reference
    before = loss_by_step(client, first.run_id)
    latest = workdir / "orch_runs" / "zero0" / "checkpoint_step_00000100" / "step_00000100" / "mp_rank_00_model_states.pt"
    latest.write_bytes(latest.read_bytes()[:100])  # truncated, as by a full disk
    # same max_steps: the LR schedule's length is part of the run, so the replay must match exactly
    plan, result = fit(workdir, "resume=zero0", "trainer.zero_stage=0", "trainer.precision=fp32")
    assert plan.resuming and result.run_id == first.run_id
    assert result.metrics["step"] == 100
    run = client.get_run(result.run_id)
    assert run.data.tags["orch.resumed_at_step"] == "75"  # the previous good checkpoint
    assert run.data.tags["orch.resumes"] == "1" and run.info.status == "FINISHED"
    after = loss_by_step(client, result.run_id)
    assert max(after) == 100 and len(after) == 100
    for step in range(76, 101):  # replayed from step 75: the same data and the same losses as the first time
        assert after[step] == pytest.approx(before[step], abs=1e-5)


def test_a_resume_with_no_step_left_reports_what_its_last_checkpoint_reported(reference, client, workdir):
    """A driver that died after the last checkpoint but before it closed the run: `resume=` has nothing to train,
    so it starts no worker group, and its result (what `orch run` prints, what a sweep's trial reports to Tune) is
    what that checkpoint reported."""
    _, first = reference
    logged = {key: sorted(client.get_metric_history(first.run_id, key), key=lambda m: (m.step, m.timestamp))
              for key in ("loss", "val_accuracy")}
    attempts = sorted(p.name for p in (workdir / "orch_runs" / "zero0").glob("resume-*"))
    plan, result = fit(workdir, "resume=zero0", "trainer.zero_stage=0", "trainer.precision=fp32")
    assert plan.resuming and result.run_id == first.run_id
    assert sorted(p.name for p in (workdir / "orch_runs" / "zero0").glob("resume-*")) == attempts, "a fit was started"
    assert client.get_run(result.run_id).data.tags["orch.resumed_at_step"] == "100"
    assert result.metrics["step"] == 100
    assert result.metrics["val_accuracy"] == pytest.approx(logged["val_accuracy"][-1].value)
    assert result.metrics["loss"] == pytest.approx(logged["loss"][-1].value)
    assert len(client.get_metric_history(first.run_id, "loss")) == len(logged["loss"])  # nothing trained again


def test_non_finite_loss_stops_every_rank_with_a_typed_error_and_keeps_the_last_good_checkpoint(ray_instance, workdir, client):
    from orchestrator.train.steps import TrainingDiverged

    overrides = [
        "name=diverges",
        "trainer.optimizer.name=sgd",
        "trainer.optimizer.lr=1e30",  # the first update overflows the weights
        "trainer.grad_clip=0",
        "trainer.precision=fp32",
        "trainer.max_steps=60",
        "trainer.log_every=5",
        "trainer.checkpoint_every=5",
    ]
    plan = build_plan(compose(overrides), cwd=workdir)
    with pytest.raises(TrainingDiverged) as error:
        run_plan(plan)
    step = error.value.step
    assert 1 <= step < 60 and f"step {step}" in str(error.value)
    experiment = client.get_experiment_by_name(plan.tracking.experiment)
    [run] = client.search_runs([experiment.experiment_id], filter_string="tags.`orch.run_name` = 'diverges'")
    assert run.info.status == "FAILED"
    assert all(m.step < step for m in client.get_metric_history(run.info.run_id, "loss"))
    saved = sorted(int(p.name.rsplit("_", 1)[1]) for p in (workdir / "orch_runs" / "diverges").glob("checkpoint_step_*"))
    assert all(s < step for s in saved), "a checkpoint of the diverged state was saved"


def test_the_run_logs_its_predicted_memory_beside_the_measured_peak(reference, client):
    plan, result = reference
    metrics = client.get_run(result.run_id).data.metrics
    predicted, measured = metrics["memory/predicted_bytes"], metrics["memory/measured_peak_bytes"]
    # the plan's figure for this run (precision as the worker resolved it: fp32 here)
    assert predicted == plan.stages[0].memory.total
    assert metrics["memory/measured_over_predicted"] == pytest.approx(measured / predicted)
    # a tiny MLP: the process baseline is nearly all of it, and the plan's baseline must be of the right size
    assert 0.5 < measured / predicted < 2.0


def test_a_fit_that_lost_the_rendezvous_port_race_is_started_again_and_other_failures_are_not(ray_instance):
    """Ray Train picks rank 0's port, and torch binds it a moment later: a port taken in between fails the fit in
    Ray Train's own process-group set-up (EADDRINUSE). The real failure, made on a Ray worker whose port is taken,
    wrapped as Ray Train's controller reports it; the retry starts the fit again only for that."""
    import io
    import socket

    import ray
    from ray.train.v2.api.exceptions import ControllerError
    from rich.console import Console

    from orchestrator.stage_runner import lost_port_race, retry_port_race

    @ray.remote(num_cpus=0)
    def set_up_on_a_taken_port() -> None:
        from ray.train.torch.config import _setup_torch_process_group

        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            _setup_torch_process_group("gloo", 0, 1, f"tcp://127.0.0.1:{taken.getsockname()[1]}", timeout_s=30)

    with pytest.raises(ray.exceptions.RayTaskError) as raised:
        ray.get(set_up_on_a_taken_port.remote(), timeout=120)
    race, other = ControllerError(raised.value), ControllerError(ValueError("EADDRINUSE in a message of the user's"))
    assert lost_port_race(race) and not lost_port_race(other)

    def failing(errors: list[Exception]):
        def fit_once() -> str:
            if errors:
                raise errors.pop(0)
            return "trained"
        return fit_once

    console = Console(file=io.StringIO(), width=300)
    assert retry_port_race(failing([race, race]), console, "train · x") == "trained"
    assert console.file.getvalue().count("EADDRINUSE") == 2
    with pytest.raises(ControllerError):  # a third loss in a row is a failure
        retry_port_race(failing([race, race, race]), console, "train · x")
    with pytest.raises(ControllerError):  # not the race: raised at once
        retry_port_race(failing([other]), console, "train · x")
