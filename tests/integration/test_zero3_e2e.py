"""ZeRO-3 end to end on real Ray workers (2, gloo), real DeepSpeed engines and a real MLflow store.

Five fits, made once per module: the MLP on digits (the reference) and the same run with a worker SIGKILLed
mid-run (the suite's one killed-worker run: Ray Train restarts the group, which resumes from the last checkpoint and
replays the same losses); the built-in GPT on text with activation checkpointing; a Hugging Face GPT-2-architecture student
distilled from that GPT; and that student fine-tuned. Every one trains with trainer.zero_stage=3, builds its model
partitioned, checkpoints and exports consolidated fp32 weights from the ZeRO-3 partitions.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from orchestrator.artifacts.export import load_exported
from orchestrator.config import compose
from orchestrator.plan import build_plan
from orchestrator.stage_runner import run_plan

pytestmark = pytest.mark.slow

ZERO3 = ["trainer.zero_stage=3", "trainer.precision=fp32", "trainer.num_workers=2", "tracking.system_metrics=false",
         "tracking.experiment=zero3-e2e"]
DIGESTS = "{_target_: orchestrator.train.callbacks.WeightDigests}"
MLP = ["trainer.max_steps=30", "trainer.log_every=1", "trainer.eval_every=30", "trainer.checkpoint_every=10",
       "trainer.max_failures=1", "model.hidden_sizes=[32]"]
WORDS = "the a cat dog sat ran on under mat log and then".split()
TEXT = ["data=text", "data.block_size=16", "trainer.micro_batch_size=8", "trainer.log_every=5", "trainer.eval_every=0",
        "trainer.checkpoint_every=0", "trainer.optimizer.lr=3e-3"]
HF_STUDENT = ["model=hf_causal_lm", "model.config.n_layer=1", "model.config.n_embd=32", "model.config.n_head=2"]


def fit(workdir: Path, *overrides: str, callbacks: tuple[str, ...] = ()):
    plan = build_plan(compose([*ZERO3, f"trainer.callbacks=[{', '.join([DIGESTS, *callbacks])}]", *overrides]), cwd=workdir)
    assert plan.stages[0].deepspeed["zero_optimization"]["stage"] == 3
    [result] = run_plan(plan)
    return plan, result


def loss_by_step(client: MlflowClient, run_id: str) -> dict[int, float]:
    """Last value logged per step: a restarted attempt re-logs the steps after its checkpoint."""
    return {m.step: m.value for m in sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.timestamp)}


def exported(client: MlflowClient, run_id: str, tmp_path: Path) -> Path:
    return Path(client.download_artifacts(run_id, "model", str(tmp_path)))


@pytest.fixture(scope="module")
def client(workdir) -> MlflowClient:
    return MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("zero3-text") / "corpus.txt"
    path.write_text("".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 8))) + ".\n" for _ in range(600)))
    return path


@pytest.fixture(scope="module")
def mlp(ray_instance, workdir):
    return fit(workdir, "name=zero3-mlp", *MLP)


@pytest.fixture(scope="module")
def mlp_killed(ray_instance, workdir, mlp):
    marker = workdir / "zero3-killed-once"
    kill = f"{{_target_: orchestrator.train.callbacks.KillWorkerOnce, step: 17, rank: 1, marker: '{marker}'}}"
    # compared with the uninterrupted run through its losses and weight digests: no exported model is read
    outcome = fit(workdir, "name=zero3-mlp-killed", *MLP, "tracking.log_model=false", callbacks=(kill,))
    assert marker.exists(), "the worker was never killed: the test would prove nothing"
    return outcome


@pytest.fixture(scope="module")
def gpt(ray_instance, workdir, corpus):
    return fit(workdir, "name=zero3-gpt", "model=gpt", f"data.path={corpus}", *TEXT, "trainer.max_steps=30",
               "trainer.activation_checkpointing=true")


@pytest.fixture(scope="module")
def hf_student(ray_instance, workdir, corpus, gpt):
    _, teacher = gpt
    return fit(workdir, "name=zero3-hf-student", "recipe=distill", f"recipe.distill.teacher={teacher.run_id}",
               f"data.path={corpus}", *TEXT, *HF_STUDENT, "trainer.max_steps=20")


@pytest.fixture(scope="module")
def hf_finetuned(ray_instance, workdir, corpus, hf_student):
    _, student = hf_student
    return fit(workdir, "name=zero3-hf-finetuned", "recipe=finetune", f"recipe.input={student.run_id}",
               "recipe.pruning.schedule=none", f"data.path={corpus}", *TEXT, *HF_STUDENT, "trainer.max_steps=10",
               "trainer.activation_checkpointing=true")


def test_zero3_mlp_trains_and_every_rank_ends_with_the_same_weights(mlp):
    _, result = mlp
    assert result.metrics["val_accuracy"] >= 0.4  # 30 steps of a 32-unit MLP; chance is 0.1
    digests = result.metrics["rank_weight_digests"].split(",")
    assert len(digests) == 2 and len(set(digests)) == 1  # gathered from the partitions on each rank


def test_zero3_export_consolidates_the_partitions_into_the_trained_model(mlp, client, tmp_path):
    from orchestrator.data.digits import load_digits_splits

    _, result = mlp
    model = load_exported(exported(client, result.run_id, tmp_path))
    inputs, targets = load_digits_splits().val.tensors
    with torch.no_grad():
        accuracy = (model(inputs).argmax(-1) == targets).float().mean().item()
    assert accuracy == pytest.approx(result.metrics["val_accuracy"], abs=1e-6)


def test_zero3_killed_worker_resumes_exactly_like_an_uninterrupted_run(mlp, mlp_killed, client):
    _, uninterrupted = mlp
    _, resumed = mlp_killed
    expected, observed = loss_by_step(client, uninterrupted.run_id), loss_by_step(client, resumed.run_id)
    assert sorted(observed) == sorted(expected) == list(range(1, 31))
    for step in expected:
        assert observed[step] == pytest.approx(expected[step], abs=1e-5), f"loss differs at step {step}"
    assert resumed.metrics["rank_weight_digests"] == uninterrupted.metrics["rank_weight_digests"]
    run = client.get_run(resumed.run_id)
    assert run.info.status == "FINISHED"  # one MLflow run through the restart
    assert run.data.tags["orch.resumed_at_step"] == "10"  # the last checkpoint before the kill at step 17
    assert run.data.tags["orch.restarts"] == "1" and run.data.metrics["restarts"] == 1


def test_zero3_gpt_with_activation_checkpointing_learns_and_exports(gpt, client, tmp_path):
    plan, result = gpt
    assert plan.stages[0].config["trainer"]["activation_checkpointing"] is True
    losses = loss_by_step(client, result.run_id)
    assert losses[30] < losses[5]
    model = load_exported(exported(client, result.run_id, tmp_path))
    assert type(model).__name__ == "GPT" and model.lm_head.weight is model.tok_emb.weight  # tied after export too


def test_zero3_distills_a_hugging_face_student_from_a_full_replica_teacher(hf_student, client, tmp_path):
    from transformers import AutoModelForCausalLM

    _, result = hf_student
    losses = loss_by_step(client, result.run_id)
    assert losses[20] < losses[5]
    local = exported(client, result.run_id, tmp_path)
    model = load_exported(local)
    hf = AutoModelForCausalLM.from_pretrained(str(local / "hf"), local_files_only=True)
    assert hf.config.n_embd == 32 and hf.config.n_layer == 1
    tokens = torch.randint(0, hf.config.vocab_size, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=tokens).logits, model(tokens))


def test_zero3_fine_tunes_the_distilled_student(hf_student, hf_finetuned, client, tmp_path):
    _, student = hf_student
    _, finetuned = hf_finetuned
    assert client.get_run(finetuned.run_id).info.status == "FINISHED"
    before = load_exported(exported(client, student.run_id, tmp_path / "student"))
    after = load_exported(exported(client, finetuned.run_id, tmp_path / "finetuned"))
    changed = [name for name, p in after.state_dict().items() if not torch.equal(p, before.state_dict()[name])]
    assert changed, "fine-tuning left every weight as it was"
