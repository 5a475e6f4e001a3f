"""Attention-head pruning of the built-in GPT through the shipped pipeline, on real Ray workers and DeepSpeed.

pipeline=text_structured at tiny sizes: teacher (byte-level GPT, 4 heads per block) → fewer_heads (half the heads
and half the MLP units removed, fine-tuned under ZeRO-2) → quantized. Two fits, once per module.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient

from orchestrator.compress import count_parameters
from orchestrator.config import compose
from orchestrator.pipeline.plan import build_pipeline_plan
from orchestrator.pipeline.runner import run_pipeline
from orchestrator.artifacts.export import load_exported

pytestmark = pytest.mark.slow

PIPELINE = ["recipe=pipeline", "pipeline=text_structured", "name=gpt-heads"]
OVERRIDES = [  # what a user would type after `orch run recipe=pipeline pipeline=text_structured`; every stage gets them
    "data.block_size=32",
    "trainer.micro_batch_size=16",
    "trainer.num_workers=1",  # data parallelism is other modules' subject: the cheapest fit
    "trainer.log_every=10",
    "trainer.eval_every=0",
    "trainer.checkpoint_every=0",
    "tracking.system_metrics=false",
    "tracking.experiment=gpt-structured-e2e",
    # the stages' own sizes and lengths, shrunk for the test
    'pipeline.stages.0.overrides=["model.n_layer=2","model.n_head=4","model.n_embd=32","trainer.max_steps=60","trainer.optimizer.lr=3e-3"]',
    'pipeline.stages.1.overrides=["recipe.structured.ratio=0.5","recipe.pruning.schedule=none","trainer.max_steps=30","trainer.zero_stage=2"]',
]


@pytest.fixture(scope="module")
def pipeline(ray_instance, workdir):
    top_level = [o for o in OVERRIDES if not o.startswith("data.")]  # the pipeline's own config has no text data
    plan = build_pipeline_plan(compose([*PIPELINE, *top_level]), OVERRIDES, cwd=workdir)
    return {result.stage: result for result in run_pipeline(plan)}


@pytest.fixture(scope="module")
def client(workdir) -> MlflowClient:
    return MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")


def exported(client: MlflowClient, run_id: str, tmp_path: Path):
    local = client.download_artifacts(run_id, "model", str(tmp_path / run_id))
    return load_exported(local), yaml.safe_load(Path(local, "model.yaml").read_text())


def test_pruned_gpt_has_half_the_heads_and_mlp_units_and_still_models_text(pipeline, client, tmp_path):
    import orchestrator.data
    from orchestrator.data.text import load_text_splits

    teacher, teacher_cfg = exported(client, pipeline["teacher"].run_id, tmp_path)
    pruned, pruned_cfg = exported(client, pipeline["fewer_heads"].run_id, tmp_path)
    assert teacher_cfg.get("n_heads") is None and pruned_cfg["n_heads"] == [2, 2] and pruned_cfg["mlp_hidden"] == [64, 64]
    assert [block.attn.n_head for block in pruned.blocks] == [2, 2]
    assert tuple(pruned.blocks[0].attn.qkv.weight.shape) == (48, 32)  # 3 x 2 heads x 8 dims, from 3 x 4 x 8
    assert count_parameters(pruned) < count_parameters(teacher)

    val = load_text_splits(str(Path(orchestrator.data.__file__).with_name("sample.txt")), pruned_cfg["block_size"]).val
    inputs, targets = val[0][0][None], val[0][1][None]
    with torch.no_grad():
        logits = pruned(inputs)
    assert logits.shape == (1, 32, 256) and torch.isfinite(logits).all()
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), targets.reshape(-1)).item()
    assert math.exp(loss) < 60  # a uniform guess over bytes scores 256: the pruned, fine-tuned model still learned

    logged = pipeline["fewer_heads"].metrics["val_perplexity"]
    assert math.isfinite(logged) and logged < 60 and math.isfinite(pipeline["teacher"].metrics["val_perplexity"])


def test_report_lists_perplexity_and_size_per_stage(pipeline, client, tmp_path):
    parent_id = client.get_run(pipeline["teacher"].run_id).data.tags["mlflow.parentRunId"]
    local = client.download_artifacts(parent_id, "report", str(tmp_path))
    header, *lines = Path(local, "compression_report.csv").read_text().splitlines()
    columns = header.split(",")
    rows = {line.split(",")[0]: dict(zip(columns, line.split(","))) for line in lines}
    assert set(rows) == {"teacher", "fewer_heads", "quantized"} and "val_perplexity" in columns
    assert int(rows["fewer_heads"]["parameters"]) < int(rows["teacher"]["parameters"])
    assert int(rows["quantized"]["size_bytes"]) < int(rows["fewer_heads"]["size_bytes"])
    assert all(math.isfinite(float(row["val_perplexity"])) for row in rows.values())
