"""Language models end to end on real Ray workers, DeepSpeed engines and an MLflow store, on generated text.

Two module-scoped runs: a Hugging Face GPT-2-architecture model trained by 2 DeepSpeed workers (perplexity drops,
samples logged, exported in Hugging Face format), and the shipped lm_compress pipeline on tiny settings (Llama-style
teacher -> heads and MLP units pruned -> distilled, one worker per stage), whose report and final model are checked.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient
from omegaconf import OmegaConf

from orchestrator.config import compose
from orchestrator.config.schema import PipelineStageConfig
from orchestrator.pipeline.plan import build_pipeline_plan
from orchestrator.pipeline.runner import run_pipeline
from orchestrator.plan import build_plan
from orchestrator.stage_runner import run_plan

pytestmark = pytest.mark.slow

WORDS = "the a cat dog sat ran on under mat log and then".split()
COMMON = ["data=text", "trainer.log_every=5", "tracking.system_metrics=false", "trainer.precision=fp32"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("lm-text") / "corpus.txt"
    path.write_text("".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 8))) + ".\n" for _ in range(1500)))
    return path


@pytest.fixture(scope="module")
def client(workdir) -> MlflowClient:
    return MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")


@pytest.fixture(scope="module")
def gpt2_run(ray_instance, workdir, corpus):
    overrides = [
        *COMMON, "model=hf_causal_lm", f"data.path={corpus}", "data.block_size=32", "name=hf-gpt2",
        "model.config.n_embd=96", "trainer.num_workers=2", "trainer.micro_batch_size=16", "trainer.max_steps=60",
        "trainer.eval_every=20", "trainer.checkpoint_every=0", "trainer.optimizer.lr=3e-3", "tracking.experiment=lm-e2e",
    ]
    plan = build_plan(compose(overrides), cwd=workdir)
    [result] = run_plan(plan)
    return plan, result


def test_a_hugging_face_gpt2_trains_on_two_deepspeed_workers_and_perplexity_drops(gpt2_run, client):
    plan, result = gpt2_run
    assert plan.stages[0].num_workers == 2 and 200_000 < plan.stages[0].memory.parameters < 500_000
    perplexity = sorted(client.get_metric_history(result.run_id, "val_perplexity"), key=lambda m: m.step)
    assert [m.step for m in perplexity] == [20, 40, 60]
    assert perplexity[-1].value < perplexity[0].value and perplexity[-1].value < 256 / 4  # uniform over bytes: 256
    assert client.get_metric_history(result.run_id, "tokens_per_s")


def test_samples_from_a_fixed_prompt_are_logged_at_every_evaluation(gpt2_run, client, tmp_path):
    _, result = gpt2_run
    files = sorted(a.path for a in client.list_artifacts(result.run_id, "samples"))
    assert files == ["samples/step_000020.txt", "samples/step_000040.txt", "samples/step_000060.txt"]
    text = Path(client.download_artifacts(result.run_id, files[-1], str(tmp_path))).read_text()
    assert "--- prompt: 'The '" in text and len(text) > 60


def test_the_exported_model_is_a_hugging_face_directory(gpt2_run, client, tmp_path):
    from transformers import AutoModelForCausalLM

    from orchestrator.artifacts.export import load_exported

    _, result = gpt2_run
    local = Path(client.download_artifacts(result.run_id, "model", str(tmp_path)))
    hf = AutoModelForCausalLM.from_pretrained(str(local / "hf"), local_files_only=True)
    ours = load_exported(local)
    tokens = torch.randint(0, 256, (1, 16))
    assert torch.allclose(hf(input_ids=tokens).logits, ours(tokens), atol=1e-5)
    assert yaml.safe_load((local / "model.yaml").read_text())["config"]["n_embd"] == 96
    # an MLflow Model beside it, so the run's model can be registered
    client.create_registered_model("lm-e2e-gpt2")
    version = client.create_model_version("lm-e2e-gpt2", f"runs:/{result.run_id}/model/mlflow_model", run_id=result.run_id)
    assert version.status == "READY" and (local / "mlflow_model" / "MLmodel").is_file()
    # a torch.export archive, not a pickle: MLflow loads it with torch alone, sequence length free up to the block
    import mlflow.pytorch

    assert (local / "mlflow_model" / "data" / "model.pt2").is_file()
    served = mlflow.pytorch.load_model(str(local / "mlflow_model"))
    tokens = torch.randint(0, 256, (3, 10))
    assert torch.allclose(served(tokens), ours(tokens), atol=1e-5)


@pytest.fixture(scope="module")
def pipeline_run(ray_instance, workdir, corpus):
    shipped = OmegaConf.load(Path(__file__).resolve().parents[2] / "conf" / "pipeline" / "lm_compress.yaml")
    steps = {"teacher": 60, "pruned": 10, "student": 30}  # the quantize stage does not train
    stages = []
    for stage in OmegaConf.to_container(shipped.stages):
        kept = [o for o in stage["overrides"] if not o.startswith("trainer.max_steps=")]
        shorter = [f"trainer.max_steps={steps[stage['name']]}"] if stage["name"] in steps else []
        stages.append({**stage, "overrides": [*kept, *shorter]})
    # one worker per stage: data parallelism is gpt2_run's subject here, and test_pipeline_e2e's pruned stage's
    command_line = [*COMMON, "model=hf_llama", f"data.path={corpus}", "data.block_size=32", "trainer.eval_every=0",
                    "trainer.num_workers=1",
                    "trainer.checkpoint_every=0", "tracking.experiment=lm-pipeline-e2e"]
    composed = compose(["recipe=pipeline", "pipeline=lm_compress", "name=lm-pipe", *command_line])
    composed.cfg.pipeline.stages = [OmegaConf.merge(OmegaConf.structured(PipelineStageConfig), s) for s in stages]
    plan = build_pipeline_plan(composed, command_line, cwd=workdir)
    return plan, run_pipeline(plan)


def test_the_lm_pipeline_prunes_distills_quantizes_and_reports_every_stage(pipeline_run, client, tmp_path):
    """The shipped pipeline: depth + width pruning, transfer-set distillation, int8 weight-only quantization."""
    from transformers import AutoModelForCausalLM

    plan, results = pipeline_run
    ids = {result.stage: result.run_id for result in results}
    assert sorted(ids) == ["pruned", "quantized", "student", "teacher"]
    [parent] = client.search_runs(
        [client.get_experiment_by_name("lm-pipeline-e2e").experiment_id],
        filter_string=f"tags.`orch.run_name` = '{plan.run_name}'",
    )
    report_file = client.download_artifacts(parent.info.run_id, "report/compression_report.csv", str(tmp_path))
    header, *rows = [line.split(",") for line in Path(report_file).read_text().splitlines()]
    table = {row[0]: dict(zip(header, row)) for row in rows}
    assert {"val_perplexity", "parameters", "size_bytes", "tokens_per_s"} <= set(header)
    assert int(table["pruned"]["parameters"]) < int(table["teacher"]["parameters"])
    assert table["student"]["parameters"] == table["pruned"]["parameters"]
    # one of the teacher's two blocks and half of the other's heads and MLP units: under half its parameters
    assert int(table["pruned"]["parameters"]) < 0.5 * int(table["teacher"]["parameters"])
    assert float(table["teacher"]["val_perplexity"]) < 256 / 4 and float(table["student"]["val_perplexity"]) < 256 / 2
    # int8 weights: smaller on disk than the fp32 student, perplexity within 5 % of it
    assert int(table["quantized"]["size_bytes"]) < 0.7 * int(table["student"]["size_bytes"])
    assert float(table["quantized"]["val_perplexity"]) == pytest.approx(float(table["student"]["val_perplexity"]), rel=0.05)
    # the student's soft loss ran on the transfer set the teacher labelled
    student_run = client.get_run(ids["student"])
    assert student_run.data.params["recipe.distill.transfer_data"] == "all_inputs"
    # the distilled student loads with transformers alone, smaller by its saved config
    local = Path(client.download_artifacts(ids["student"], "model", str(tmp_path / "student")))
    student = AutoModelForCausalLM.from_pretrained(str(local / "hf"), local_files_only=True)
    assert student.config.num_hidden_layers == 1
    assert student.config.num_attention_heads == 2 and student.config.intermediate_size == 128
    assert torch.isfinite(student(input_ids=torch.randint(0, 256, (1, 16))).logits).all()


@pytest.fixture(scope="module")
def compressed_gpt2(ray_instance, workdir, corpus, gpt2_run):
    """The trained GPT-2 through `prune` (one block dropped, wanda 2:4 on every Conv1D, 4 fine-tuning steps at fixed
    masks) and then `quantize` (int8 weight-only): one worker, a few seconds of training."""
    _, trained = gpt2_run
    common = [*COMMON, "model=hf_causal_lm", "model.config.n_embd=96", f"data.path={corpus}", "data.block_size=32",
              "tracking.experiment=lm-e2e",
              "trainer.checkpoint_every=0", "trainer.eval_every=0"]
    prune = [*common, "recipe=prune", f"recipe.input={trained.run_id}", "name=gpt2-depth-wanda",
             "recipe.structured.drop_blocks=1", "recipe.structured.calibration_batches=2",
             "recipe.pruning.schedule=one_shot", "recipe.pruning.method=wanda", "recipe.pruning.pattern=2:4",
             "recipe.pruning.calibration_batches=2", "trainer.num_workers=1", "trainer.micro_batch_size=8",
             "trainer.max_steps=4", "trainer.optimizer.lr=1e-3"]
    [pruned] = run_plan(build_plan(compose(prune), cwd=workdir))
    quantize = [*common, "recipe=quantize", f"recipe.input={pruned.run_id}", "name=gpt2-int8wo",
                "recipe.method=int8_weight_only", "recipe.eval_batch_size=16"]
    [quantized] = run_plan(build_plan(compose(quantize), cwd=workdir))
    return trained, pruned, quantized


def test_a_gpt2_loses_a_block_keeps_two_of_four_weights_and_serves_int8(compressed_gpt2, client, tmp_path):
    from transformers.pytorch_utils import Conv1D

    from orchestrator.artifacts.export import load_exported

    trained, pruned, quantized = compressed_gpt2
    local = Path(client.download_artifacts(pruned.run_id, "model", str(tmp_path / "pruned")))
    assert yaml.safe_load((local / "model.yaml").read_text())["config"]["n_layer"] == 1  # rebuilt smaller, no masks
    model = load_exported(local)
    conv1d = [m for m in model.modules() if isinstance(m, Conv1D)]
    assert len(conv1d) == 4
    for layer in conv1d:  # [in, out]: along the input, at most 2 of every 4 survive fine-tuning
        nonzero = (layer.weight != 0).t().reshape(layer.weight.shape[1], -1, 4).sum(-1)
        assert (nonzero <= 2).all() and nonzero.float().mean() > 1.9
    assert pruned.metrics["val_perplexity"] < 256 / 2
    served = Path(client.download_artifacts(quantized.run_id, "model", str(tmp_path / "quantized")))
    assert (served / "quantized.pt").is_file()
    assert yaml.safe_load((served / "quantization.yaml").read_text())["method"] == "int8_weight_only"
    assert quantized.metrics["size_bytes_quantized"] < 0.6 * quantized.metrics["size_bytes_fp32"]
    assert quantized.metrics["latency_ms_quantized_1thread"] > 0
    assert quantized.metrics["val_perplexity"] == pytest.approx(pruned.metrics["val_perplexity"], rel=0.05)
    tokens = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        int8, fp32 = load_exported(served)(tokens), load_exported(served, quantized=False)(tokens)
    assert not torch.equal(int8, fp32) and (int8 - fp32).abs().max() < 0.1 * fp32.abs().max()
