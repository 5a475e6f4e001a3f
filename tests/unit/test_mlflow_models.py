"""Models in MLflow the standard way, against a real local MLflow store (sqlite), without Ray.

* every exported model is also an MLflow Model (pytorch flavour, pt2) with a signature and an input example, and
  `mlflow.pytorch.load_model` loads it in a process where orchestrator (and transformers) cannot be imported;
* `tracking.register_as` registers a version and moves the alias; models:/NAME@alias and models:/NAME/VERSION
  resolve to the run that logged the version, whose safetensors orch loads;
* the experiment is a model-training experiment, the data a dataset input, a pipeline's parent carries a summary;
* `orch eval MODEL` evaluates a model folder or a registered model on the driver and logs an evaluation run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient

from orchestrator.artifacts.export import CONFIG_FILE, WEIGHTS_FILE, load_exported
from orchestrator.artifacts.mlflow_model import MLFLOW_MODEL_DIR, input_example, save_mlflow_model
from orchestrator.artifacts.source import load_model, model_source
from orchestrator.config import compose
from orchestrator.config.validate import ConfigError, reference_kind, validate_reference
from orchestrator.data.digits import load_digits_splits
from orchestrator.plan import build_plan, resolve_tracking
from orchestrator.track.mlflow_run import EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND, StageRun, register_model
from orchestrator.train.objective import evaluate_module

REPO = Path(__file__).resolve().parents[2]
DIGITS = {"_target_": "orchestrator.data.digits.load_digits_splits", "input_shape": [1, 8, 8], "num_classes": 10,
          "val_fraction": 0.2, "split_seed": 0, "limit_train": None, "task": "classification"}
MLP = {"_target_": "orchestrator.models.mlp.MLP", "input_shape": [1, 8, 8], "num_classes": 10, "hidden_sizes": [32],
       "dropout": 0.0}


def trained_mlp_folder(path: Path, steps: int = 150) -> Path:
    """A model folder as orch exports it (safetensors + model.yaml) of an MLP trained for a moment on digits."""
    from safetensors.torch import save_model

    from orchestrator.models.mlp import MLP as Net

    torch.manual_seed(0)
    data = load_digits_splits()
    model = Net([1, 8, 8], 10, [32])
    inputs, targets = data.train.tensors
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(inputs), targets).backward()
        optimizer.step()
    path.mkdir(parents=True)
    save_model(model, str(path / WEIGHTS_FILE))
    (path / CONFIG_FILE).write_text(yaml.safe_dump(MLP, sort_keys=False))
    return path


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A tracking plan on a fresh sqlite store under tmp_path, and a stage plan to open runs with."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    tracking = resolve_tracking({"uri": None, "experiment": "models-unit", "artifact_location": None}, tmp_path)
    plan = build_plan(compose(["name=unit-run"]), cwd=tmp_path)
    return tracking, plan.stages[0]


def logged_run(tracking, stage, model_dir: Path) -> str:
    """A FINISHED run whose `model` artifact is `model_dir` (as run_stage logs it)."""
    run = StageRun(tracking)
    run_id = run.start(stage, resuming=False)
    run.log_artifacts(model_dir, "model")
    run.finish("FINISHED")
    return run_id


# --- the MLflow Model ----------------------------------------------------------------------------------------------


LOADER = textwrap.dedent(
    """
    import importlib.abc, sys
    class Refuse(importlib.abc.MetaPathFinder):  # neither orch nor transformers can be imported in this process
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("orchestrator", "transformers"):
                raise ImportError(f"{name} is not installed here")
    sys.meta_path.insert(0, Refuse())
    import numpy as np, torch, mlflow.pytorch
    for folder in sys.argv[1:]:
        model = mlflow.pytorch.load_model(folder + "/mlflow_model")
        batch = torch.from_numpy(np.load(folder + "/batch.npy"))
        np.save(folder + "/out.npy", model(batch).detach().numpy())
    """
)


def test_exported_models_are_mlflow_models_that_load_without_orchestrator(tmp_path):
    """An MLP (digits) and a GPT (tokens; batch and sequence length both vary) in one clean process."""
    from safetensors.torch import save_model

    from orchestrator.models.gpt import GPT

    mlp = trained_mlp_folder(tmp_path / "mlp")
    gpt = tmp_path / "gpt"
    gpt.mkdir()
    save_model(GPT(256, 16, 1, 2, 16), str(gpt / WEIGHTS_FILE))
    (gpt / CONFIG_FILE).write_text(yaml.safe_dump({"_target_": "orchestrator.models.gpt.GPT", "vocab_size": 256,
                                                   "block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 16}))
    cases = [  # folder, input example, a batch of another size (and length), the signature's input shape
        (mlp, input_example(DIGITS), torch.rand(5, 1, 8, 8), [-1, 1, 8, 8]),
        (gpt, torch.randint(0, 256, (2, 16)), torch.randint(0, 256, (3, 9)), [-1, -1]),
    ]
    for folder, example, batch, shape in cases:
        target = save_mlflow_model(folder, example)
        mlmodel = yaml.safe_load((target / "MLmodel").read_text())
        assert (target / "data" / "model.pt2").is_file() and not list(target.rglob("*.pth"))  # no pickled module
        assert json.loads(mlmodel["signature"]["inputs"])[0]["tensor-spec"]["shape"] == shape
        assert mlmodel["saved_input_example_info"] and mlmodel["metadata"]["orch_model"]["_target_"].startswith("orchestrator.models.")
        np.save(folder / "batch.npy", batch.numpy())

    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    loaded = subprocess.run([sys.executable, "-c", LOADER, str(mlp), str(gpt)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300, check=False)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    for folder, _, batch, _ in cases:
        expected = load_exported(folder)(batch).detach().numpy()
        np.testing.assert_allclose(np.load(folder / "out.npy"), expected, atol=1e-5)


def test_a_quantized_model_goes_out_as_its_fp32_weights_marked_in_the_metadata(tmp_path):
    from orchestrator.artifacts.export import mark_quantized

    folder = trained_mlp_folder(tmp_path / "model", steps=1)
    mark_quantized(folder, ["head"])
    (folder / MLFLOW_MODEL_DIR).mkdir()  # a copy of the input's, as recipe=quantize copies the folder: replaced
    (folder / MLFLOW_MODEL_DIR / "stale").write_text("from the input")
    target = save_mlflow_model(folder, input_example(DIGITS))
    assert not (target / "stale").exists()
    metadata = yaml.safe_load((target / "MLmodel").read_text())["metadata"]
    assert metadata["orch_quantization"]["method"] == "int8_dynamic" and "fp32" in metadata["orch_quantization"]["note"]


# --- the Model Registry --------------------------------------------------------------------------------------------


def test_register_as_adds_a_version_moves_the_alias_and_models_uris_resolve_to_the_run(tmp_path, store, monkeypatch):
    tracking, stage = store
    folder = trained_mlp_folder(tmp_path / "model")
    save_mlflow_model(folder, input_example(DIGITS))
    first, second = logged_run(tracking, stage, folder), logged_run(tracking, stage, folder)

    assert register_model(tracking.uri, first, "digits-mlp", "newest") == "models:/digits-mlp/1"
    assert register_model(tracking.uri, second, "digits-mlp", "newest") == "models:/digits-mlp/2"
    client = MlflowClient(tracking.uri)
    latest = client.get_model_version_by_alias("digits-mlp", "newest")
    assert str(latest.version) == "2" and latest.run_id == second
    assert latest.source == f"runs:/{second}/model/mlflow_model"

    for reference, run_id in (("models:/digits-mlp@newest", second), ("models:/digits-mlp/1", first),
                              ("models:/digits-mlp/latest", second)):
        assert reference_kind(reference) == "registered" and validate_reference("recipe.input", reference) == "registered"
        source = model_source(reference, tracking.uri, {}, "recipe.input")
        assert source["run_id"] == run_id and source["artifact_path"] == "model"
        model, config = load_model(source)  # orch's own loading: safetensors + model.yaml, never the MLflow Model
        assert config["_target_"] == MLP["_target_"] and isinstance(model, torch.nn.Module)
    assert client.get_registered_model("digits-mlp").aliases == {"newest": 2}
    # and the registered MLflow Model is what MLflow's own tools load
    import mlflow.pytorch

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking.uri)
    (tmp_path / "download").mkdir()

    registered = mlflow.pytorch.load_model("models:/digits-mlp@newest", dst_path=str(tmp_path / "download"))
    batch = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(registered(batch), load_exported(folder)(batch))


def test_a_run_without_an_mlflow_model_is_not_registered(tmp_path, store):
    tracking, stage = store
    run_id = logged_run(tracking, stage, trained_mlp_folder(tmp_path / "model", steps=1))  # safetensors only
    with pytest.raises(ConfigError) as error:
        register_model(tracking.uri, run_id, "digits-mlp", "newest")
    assert error.value.key == "tracking.register_as" and "no MLflow Model" in str(error.value)
    assert not MlflowClient(tracking.uri).search_registered_models()


def test_a_missing_registered_model_is_an_error_naming_the_key(store):
    tracking, _ = store
    with pytest.raises(ConfigError) as error:
        model_source("models:/nobody@latest", tracking.uri, {}, "recipe.input")
    assert error.value.key == "recipe.input" and "models:/nobody@latest" in str(error.value)
    assert reference_kind("models:/a/b/c") is None


@pytest.mark.parametrize("override, key", [("tracking.alias=latest", "tracking.alias"), ("tracking.alias=v3", "tracking.alias"),
                                           ("tracking.register_as=a/b", "tracking.register_as")])
def test_registration_settings_mlflow_would_refuse_are_refused_before_the_run(tmp_path, override, key):
    with pytest.raises(ConfigError) as error:
        build_plan(compose(["tracking.register_as=digits", override]), cwd=tmp_path)
    assert error.value.key == key


# --- experiment, dataset, summaries --------------------------------------------------------------------------------


def test_the_experiment_is_a_model_training_experiment_and_the_data_a_dataset_input(store):
    tracking, stage = store
    runs = [StageRun(tracking) for _ in range(2)]
    run_ids = [run.start(stage, resuming=False) for run in runs]
    client = MlflowClient(tracking.uri)
    experiment = client.get_experiment_by_name(tracking.experiment)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND == "custom_model_development"
    inputs = [client.get_run(run_id).inputs.dataset_inputs for run_id in run_ids]
    assert [len(found) for found in inputs] == [1, 1]
    first, second = inputs[0][0], inputs[1][0]
    assert first.dataset.name == "digits" and first.dataset.source_type == "code"
    assert {tag.key: tag.value for tag in first.tags} == {"mlflow.data.context": "training"}
    assert first.dataset.digest == second.dataset.digest  # same data config, same digest
    assert json.loads(json.loads(first.dataset.source)["tags"]["orch.data"])["split_seed"] == 0


def test_an_experiment_of_another_kind_keeps_it(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracking = resolve_tracking({"uri": None, "experiment": "genai", "artifact_location": None}, tmp_path)
    client = MlflowClient(tracking.uri)
    client.create_experiment("genai", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    StageRun(tracking)
    assert client.get_experiment_by_name("genai").tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_a_pipeline_summary_compares_the_final_stage_with_the_first():
    from orchestrator.pipeline.report import summary_metrics

    rows = [
        {"stage": "teacher", "parameters": 1000, "nonzero_parameters": 1000, "sparsity": 0.0, "size_bytes": 4000,
         "size_gzip_bytes": 3600, "latency_ms": 2.0, "val_accuracy": 0.97},
        {"stage": "int8", "parameters": 1000, "nonzero_parameters": 100, "sparsity": 0.9, "size_bytes": 1000,
         "size_gzip_bytes": 400, "latency_ms": 1.0, "val_accuracy": 0.95},
    ]
    summary = summary_metrics(rows)
    assert summary["final_val_accuracy"] == 0.95 and summary["size_ratio"] == 4.0 and summary["size_gzip_ratio"] == 9.0
    assert summary["nonzero_parameters_ratio"] == 10.0 and summary["latency_speedup"] == 2.0
    assert summary["val_accuracy_change"] == pytest.approx(-0.02) and summary["final_sparsity"] == 0.9


# --- orch eval -----------------------------------------------------------------------------------------------------


def orch(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300, check=False)


def test_orch_eval_evaluates_a_folder_and_a_registered_model_on_the_driver(tmp_path, store):
    tracking, stage = store
    folder = trained_mlp_folder(tmp_path / "my model")  # a space in the path: the reference is quoted for Hydra
    expected = evaluate_module(load_exported(folder), load_digits_splits().val, "classification", 256)
    assert expected["val_accuracy"] > 0.8

    done = orch(["eval", str(folder), "data=digits", "tracking.experiment=models-unit", "--json"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    [result] = json.loads(done.stdout)
    assert result["metrics"]["val_accuracy"] == pytest.approx(expected["val_accuracy"])
    assert result["model_artifact_uri"] is None  # an evaluation logs no model
    client = MlflowClient(tracking.uri)
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["orch.recipe"] == "evaluate"
    assert run.data.params["recipe.input"] == str(folder) and run.data.params["data.split_seed"] == "0"
    assert run.data.tags["orch.input_path"] == str(folder)
    assert run.data.metrics["val_accuracy"] == pytest.approx(expected["val_accuracy"])
    [dataset] = run.inputs.dataset_inputs
    assert dataset.dataset.name == "digits" and dataset.tags[0].value == "evaluation"

    # a registered version: the evaluation run is tagged with the run it evaluated
    save_mlflow_model(folder, input_example(DIGITS))
    logged = logged_run(tracking, stage, folder)
    register_model(tracking.uri, logged, "digits-mlp", "newest")
    done = orch(["eval", "models:/digits-mlp@newest", "tracking.experiment=models-unit", "--json"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    [result] = json.loads(done.stdout)
    tags = client.get_run(result["run_id"]).data.tags
    assert tags["orch.input_run_id"] == logged and tags["orch.input_model_uri"] == "models:/digits-mlp/1"
    assert result["metrics"]["val_accuracy"] == pytest.approx(expected["val_accuracy"])


# --- a pipeline's promotion gate (pipeline.promote) ----------------------------------------------------------------

GATE = {"register_as": "digits-gate", "alias": "champion",
        "max_quality_drop": {"vs": "teacher", "metric": "val_accuracy", "max_drop": 0.02},
        "min_size_ratio": {"vs": None, "min": 4.0}, "min_latency_ratio": {"vs": None, "min": None}}
REPORT = [{"stage": "teacher", "val_accuracy": 0.97, "size_bytes": 400_000, "latency_ms": 2.0},
          {"stage": "pruned", "val_accuracy": 0.90, "size_bytes": 400_000, "latency_ms": 2.0},
          {"stage": "student", "val_accuracy": 0.96, "size_bytes": 50_000, "latency_ms": 0.5}]


def test_gates_read_the_report_rows_against_the_named_stage():
    from orchestrator.pipeline.promote import evaluate_gates

    results = {r.gate: r for r in evaluate_gates({**GATE, "min_latency_ratio": {"vs": "pruned", "min": 5.0}}, REPORT)}
    drop, size, latency = results["max_quality_drop"], results["min_size_ratio"], results["min_latency_ratio"]
    assert drop.passed and drop.value == pytest.approx(0.01) and drop.margin == pytest.approx(0.01)
    assert size.passed and size.vs == "teacher" and size.value == pytest.approx(8.0)  # vs: null = the first stage
    assert not latency.passed and latency.value == pytest.approx(4.0) and latency.margin == pytest.approx(-1.0)
    assert "FAILED by 1.0000" in latency.describe()
    # perplexity: lower is better, so a rise is the drop; gates left at null are not checked
    lm = [{"stage": "teacher", "val_perplexity": 10.0}, {"stage": "student", "val_perplexity": 10.5}]
    only_quality = {"max_quality_drop": {"vs": "teacher", "metric": "val_perplexity", "max_drop": 0.4},
                    "min_size_ratio": {"vs": None, "min": None}, "min_latency_ratio": {"vs": None, "min": None}}
    [perplexity] = evaluate_gates(only_quality, lm)
    assert not perplexity.passed and perplexity.value == pytest.approx(0.5)


def test_a_promotion_gate_registers_and_moves_the_alias_only_when_every_gate_passes(tmp_path, store):
    """Against a real sqlite registry: a passing pipeline becomes version 1 under the alias; a failing one registers
    nothing, the alias stays on version 1, and its parent run says which gate failed and by how much."""
    from rich.console import Console

    from orchestrator.pipeline.promote import promote_final
    from orchestrator.track.parent_run import ParentRun

    tracking, stage = store
    folder = trained_mlp_folder(tmp_path / "model", steps=1)
    save_mlflow_model(folder, input_example(DIGITS))
    good_run, bad_run = logged_run(tracking, stage, folder), logged_run(tracking, stage, folder)
    console = Console(record=True, width=300)
    client = MlflowClient(tracking.uri)

    good_parent = ParentRun(tracking)
    good_parent.create("pipe-good", str(tmp_path / "runs"), {"orch.recipe": "pipeline"})
    assert promote_final(GATE, REPORT, tracking.uri, good_run, good_parent, console) == "models:/digits-gate/1"
    champion = client.get_model_version_by_alias("digits-gate", "champion")
    assert str(champion.version) == "1" and champion.run_id == good_run
    tags = client.get_run(good_parent.run_id).data.tags
    assert tags["orch.promote.status"] == "promoted" and tags["orch.promote.version"] == "models:/digits-gate/1"

    worse = [REPORT[0], REPORT[1], {**REPORT[2], "val_accuracy": 0.92}]  # 5 points below the teacher
    bad_parent = ParentRun(tracking)
    bad_parent.create("pipe-bad", str(tmp_path / "runs"), {"orch.recipe": "pipeline"})
    assert promote_final(GATE, worse, tracking.uri, bad_run, bad_parent, console) is None
    assert [str(v.version) for v in client.search_model_versions("name='digits-gate'")] == ["1"]
    assert client.get_registered_model("digits-gate").aliases == {"champion": 1}
    bad = client.get_run(bad_parent.run_id).data
    assert bad.tags["orch.promote.status"] == "refused" and bad.tags["orch.promote.failed"] == "max_quality_drop"
    assert "FAILED by 0.0300" in bad.tags["orch.promote.max_quality_drop"]
    assert bad.metrics["promote.max_quality_drop.value"] == pytest.approx(0.05)
    assert bad.metrics["promote.max_quality_drop.margin"] == pytest.approx(-0.03)
    assert bad.metrics["promote.min_size_ratio.value"] == pytest.approx(8.0)  # the gates that passed are shown too
    printed = console.export_text()
    assert "promotion refused" in printed and "max_quality_drop: val_accuracy drop vs teacher +0.0500" in printed
