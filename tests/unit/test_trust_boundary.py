"""Nothing read from a run, a model folder or a checkpoint runs code, and run names are names.

The attacker here is a model folder (or checkpoint) whose model.yaml / orch_model.yaml / .pt files name a callable
of theirs: a module on sys.path that leaves a marker file when imported and another when called. Every way orch
reads such a folder must refuse it with a ConfigError (one `orch: error:` line on the command line) and leave no
marker behind.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from orchestrator.config import compose
from orchestrator.config.trust import (
    BUILT_IN_MODEL_TARGETS,
    checked_model_config,
    trusted_model_targets,
)
from orchestrator.config.validate import ConfigError
from orchestrator.pipeline.plan import build_run_plan

MLP = {"_target_": "orchestrator.models.mlp.MLP", "input_shape": [1, 8, 8], "num_classes": 10, "hidden_sizes": [16]}


class Recorder:
    """A module of the attacker's: `<name>.touch` and `<name>.Model` write `called` when run; importing writes `imported`."""

    def __init__(self, root: Path) -> None:
        self.name = f"orch_recorder_{uuid.uuid4().hex[:8]}"
        self.lib, self.imported, self.called = root / "lib", root / "imported", root / "called"
        self.lib.mkdir()
        (self.lib / f"{self.name}.py").write_text(
            "from pathlib import Path\n"
            f"Path({str(self.imported)!r}).write_text('imported')\n"
            f"def touch(*args, **kwargs):\n    Path({str(self.called)!r}).write_text('called')\n"
            "class Model:\n    def __init__(self, *args, **kwargs):\n        touch()\n"
        )

    @property
    def target(self) -> str:
        return f"{self.name}.touch"

    def ran(self) -> bool:
        return self.imported.exists() or self.called.exists()


@pytest.fixture
def recorder(tmp_path, monkeypatch) -> Recorder:
    recorder = Recorder(tmp_path)
    monkeypatch.syspath_prepend(str(recorder.lib))
    return recorder


def model_folder(path: Path, config: dict) -> Path:
    path.mkdir(parents=True)
    (path / "model.yaml").write_text(yaml.safe_dump(config))
    return path


def orch(args: list[str], cwd: Path, recorder: Recorder) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(recorder.lib), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
        check=False,
    )


# --- the check itself ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, offending",
    [
        ({"_target_": "os.system", "command": "true"}, "os.system"),
        ({"_target_": "orchestrator.models.mlp.MLP ", "num_classes": 2}, "orchestrator.models.mlp.MLP "),
        ({"_target_": ["orchestrator.models.mlp.MLP"]}, ["orchestrator.models.mlp.MLP"]),
        ({"input_shape": [4], "num_classes": 2}, None),
        ({**MLP, "hidden_sizes": [{"_target_": "os.getcwd"}]}, "hidden_sizes.0._target_"),
        ({**MLP, "extra": {"deeper": {"_target_": "os.getcwd"}}}, "extra.deeper._target_"),
        ({**MLP, "_partial_": True}, "_partial_"),
        ({**MLP, "_args_": [1]}, "_args_"),
        ({**MLP, "_recursive_": True}, "_recursive_"),
        ({**MLP, "_convert_": "all"}, "_convert_"),
        ({**MLP, "dropout": "${oc.env:HOME}"}, "dropout"),
        ("orchestrator.models.mlp.MLP", "str"),
    ],
)
def test_a_model_config_from_data_names_one_allowlisted_class_with_plain_values(config, offending):
    with pytest.raises(ConfigError) as refused:
        checked_model_config(config, "recipe.input", BUILT_IN_MODEL_TARGETS, origin="/m/model.yaml")
    assert refused.value.key == "recipe.input"
    assert refused.value.value == offending
    assert "/m/model.yaml" in str(refused.value)


def test_a_refused_class_names_what_is_allowed_and_how_to_trust_more():
    with pytest.raises(ConfigError) as refused:
        checked_model_config({"_target_": "my_pkg.Net"}, "recipe.distill.teacher")
    message = str(refused.value)
    assert message.startswith("recipe.distill.teacher='my_pkg.Net'")
    assert all(target in message for target in BUILT_IN_MODEL_TARGETS) and "trust.model_targets" in message


def test_every_built_in_model_passes_and_comes_back_as_a_plain_dict():
    for option in ("mlp", "cnn", "gpt", "hf_causal_lm", "hf_llama"):
        data = "text" if option in ("gpt", "hf_causal_lm", "hf_llama") else "digits"
        model = OmegaConf.to_container(compose([f"model={option}", f"data={data}"]).cfg, resolve=True)["model"]
        assert checked_model_config(model, "model") == model


def test_only_your_own_config_widens_the_allowlist():
    config = OmegaConf.to_container(compose(["trust.model_targets=[my_pkg.models.Net]"]).cfg, resolve=True)
    trusted = trusted_model_targets(config)
    assert trusted[: len(BUILT_IN_MODEL_TARGETS)] == BUILT_IN_MODEL_TARGETS and "my_pkg.models.Net" in trusted
    checked_model_config({"_target_": "my_pkg.models.Net", "width": 3}, "recipe.input", trusted)
    assert trusted_model_targets(None) == BUILT_IN_MODEL_TARGETS


def test_trust_is_typed_and_not_part_of_the_cache_key(tmp_path):
    with pytest.raises(ConfigCompositionException, match="trust.model_target"):
        compose(["trust.model_target=[x.Y]"])
    with pytest.raises(ConfigCompositionException, match="trust.model_targets"):
        compose(["trust.model_targets=3"])
    plain, trusting = (build_run_plan(compose(o), cwd=tmp_path) for o in ([], ["trust.model_targets=[my_pkg.Net]"]))
    assert plain.stages[0].key == trusting.stages[0].key


# --- every reader of model folders and checkpoints -------------------------------------------------------------------


def test_plan_refuses_a_folder_whose_model_yaml_names_code_and_imports_nothing(tmp_path, recorder):
    folder = model_folder(tmp_path / "model", {"_target_": recorder.target})
    with pytest.raises(ConfigError) as refused:
        build_run_plan(compose(["recipe=prune", f"recipe.input={folder}"]), cwd=tmp_path)
    assert refused.value.key == "recipe.input" and refused.value.value == recorder.target
    assert not recorder.ran()


def test_plan_refuses_a_checkpoint_whose_spec_names_code(tmp_path, recorder):
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / "orch_model.yaml").write_text(yaml.safe_dump({"model": {**MLP, "_target_": f"{recorder.name}.Model"}}))
    with pytest.raises(ConfigError) as refused:
        build_run_plan(compose(["recipe=distill", f"recipe.distill.teacher={folder}"]), cwd=tmp_path)
    assert refused.value.key == "recipe.distill.teacher"
    assert not recorder.ran()


@pytest.mark.parametrize("command", ["plan", "run"])
def test_the_cli_refuses_it_in_one_line_and_writes_nothing(tmp_path, recorder, command):
    folder = model_folder(tmp_path / "model", {"_target_": recorder.target})
    work = tmp_path / "work"
    work.mkdir()
    out = orch([command, "recipe=prune", f"recipe.input={folder}"], work, recorder)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("orch: error: recipe.input=") and recorder.target in lines[0], out.stderr
    assert list(work.iterdir()) == []
    assert not recorder.ran()


def test_load_exported_refuses_before_building(tmp_path, recorder):
    from orchestrator.artifacts.export import load_exported

    folder = model_folder(tmp_path / "model", {"_target_": recorder.target})
    with pytest.raises(ConfigError) as refused:
        load_exported(folder)
    assert refused.value.key == str(folder / "model.yaml")
    assert not recorder.ran()


def test_load_model_from_a_folder_refuses_it(tmp_path, recorder):
    from orchestrator.artifacts.source import (
        load_model,
        model_source,
        source_model_config,
    )

    folder = model_folder(tmp_path / "model", {**MLP, "hidden_sizes": [{"_target_": recorder.target}]})
    source = model_source(str(folder), "sqlite:///unused.db", {})
    with pytest.raises(ConfigError):
        load_model(source)
    with pytest.raises(ConfigError) as refused:
        source_model_config(source, "recipe.distill.teacher")
    assert refused.value.key == "recipe.distill.teacher" and refused.value.value == "hidden_sizes.0._target_"
    assert not recorder.ran()


def test_export_model_refuses_a_checkpoint_spec_that_names_code(tmp_path, recorder):
    from orchestrator.artifacts.export import export_model

    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "orch_model.yaml").write_text(yaml.safe_dump({"model": {"_target_": recorder.target}}))
    with pytest.raises(ConfigError) as refused:
        export_model(checkpoint, MLP, tmp_path / "out")
    assert refused.value.key == str(checkpoint / "orch_model.yaml")
    assert not (tmp_path / "out").exists()
    assert not recorder.ran()


class _Payload:
    """Pickles as a call of the attacker's function: what a poisoned checkpoint file holds."""

    def __init__(self, function) -> None:
        self.function = function

    def __reduce__(self):
        return self.function, ()


@pytest.mark.parametrize("files", [("mp_rank_00_model_states.pt",), ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt")],
                         ids=["zero0", "zero_to_fp32"])
def test_a_checkpoint_pickle_that_would_run_code_is_refused_unrun(tmp_path, recorder, files):
    """zero0: orch's own torch.load. zero_to_fp32: DeepSpeed's loader, which asks for weights_only=False itself."""
    import importlib

    import torch

    from orchestrator.artifacts.export import export_model

    touch = importlib.import_module(recorder.name).touch
    recorder.imported.unlink()
    checkpoint = tmp_path / "checkpoint"
    (checkpoint / "step_1").mkdir(parents=True)
    (checkpoint / "latest").write_text("step_1")
    (checkpoint / "orch_model.yaml").write_text(yaml.safe_dump({"model": MLP}))
    for name in files:
        torch.save({"module": {}, "buffer_names": [], "payload": _Payload(touch)}, checkpoint / "step_1" / name)
    with pytest.raises(ConfigError) as refused:
        export_model(checkpoint, MLP, tmp_path / "out")
    assert recorder.target in str(refused.value)
    assert not recorder.called.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # put back after the load


# --- run names -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, key",
    [
        ("name=../../x", "name"),
        ("name=a/b", "name"),
        ("""name="it's\"""", "name"),
        ("name=.hidden", "name"),
        ("name=" + "a" * 129, "name"),
        ("name='two words'", "name"),
        ("resume=/etc", "resume"),
        ("resume=..", "resume"),
        ("resume=../other", "resume"),
    ],
)
def test_run_names_are_names_not_paths(tmp_path, override, key):
    with pytest.raises(ConfigError) as refused:
        build_run_plan(compose([override]), cwd=tmp_path)
    assert refused.value.key == key
    assert not (tmp_path / "orch_runs").exists()


def test_a_pipeline_run_name_follows_the_same_rule(tmp_path):
    with pytest.raises(ConfigError) as refused:
        build_run_plan(compose(["recipe=pipeline", "pipeline=digits_compress", "name=../x"]), ["name=../x"], cwd=tmp_path)
    assert refused.value.key == "name"


@pytest.mark.parametrize("name", ["run-1", "a.b_c", "A" * 128, "_x", "2026-11-29"])
def test_plain_names_are_taken(tmp_path, name):
    assert build_run_plan(compose([f"name={name}"]), cwd=tmp_path).run_name == name


def test_the_cli_refuses_a_path_as_resume_before_anything_starts(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "run", "resume=/etc"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("orch: error: resume='/etc'") and "not a path" in lines[0], out.stderr
    assert list(tmp_path.iterdir()) == []
