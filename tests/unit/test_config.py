"""Every shipped config composes and plans; every bad input fails before Ray, naming the key."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from orchestrator.config import compose
from orchestrator.config.validate import ConfigError
from orchestrator.pipeline.plan import build_run_plan

CONF = Path(__file__).resolve().parents[2] / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


# An MLflow run id: recipes that read a model accept it when planning (it is looked up when the run starts).
RUN_ID = "0123456789abcdef0123456789abcdef"
NEEDS_A_MODEL = {
    "prune": [f"recipe.input={RUN_ID}"],
    "finetune": [f"recipe.input={RUN_ID}"],
    "quantize": [f"recipe.input={RUN_ID}"],
    "evaluate": [f"recipe.input={RUN_ID}"],
    "distill": [f"recipe.distill.teacher={RUN_ID}"],
}


def plan(tmp_path: Path, *overrides: str):
    return build_run_plan(compose(list(overrides)), cwd=tmp_path)


@pytest.mark.parametrize(
    "overrides",
    [[f"model={m}", f"data={d}"] for m, d in [("mlp", "digits"), ("cnn", "digits"), ("mlp", "synthetic"), ("gpt", "text"), ("hf_causal_lm", "text"), ("hf_llama", "text")]]
    + [[f"trainer={t}"] for t in options("trainer")]
    + [[f"cluster={c}"] for c in options("cluster")]
    + [[f"tracking={t}"] for t in options("tracking")]
    + [[f"recipe={r}", *NEEDS_A_MODEL.get(r, [])] for r in options("recipe")]
    + [["recipe=pipeline", f"pipeline={p}"] for p in options("pipeline")],
)
def test_every_shipped_option_composes_and_plans(tmp_path, overrides):
    if "trainer=gpu" in overrides:
        # on this CPU machine a local GPU run must say why it cannot run; on a cluster it is checked after connecting
        with pytest.raises(ConfigError, match="trainer.num_workers"):
            build_run_plan(compose(overrides), cwd=tmp_path)
        overrides = [*overrides, "cluster=ray"]
    composed = compose(overrides)
    result = build_run_plan(composed, cwd=tmp_path)
    cfg = composed.cfg
    assert result.stages[0].backend == ("nccl" if cfg.trainer.use_gpu else "gloo")
    assert result.stages[0].num_workers == cfg.trainer.num_workers
    assert result.stages[0].memory.parameters > 0


def test_every_yaml_opens_with_how_to_run_it():
    for path in CONF.rglob("*.yaml"):
        lines = path.read_text().splitlines()
        header = list(itertools.takewhile(lambda line: line.startswith("#"), lines))
        assert header, f"{path} must open with a comment showing how to run it"
        commands = [line for line in header if line.lstrip("# ").startswith("orch ")]
        assert any(" -m " in c for c in commands), f"{path}: show a multirun/sweep command"
        assert any("submit" in c or "cluster=ray" in c for c in commands), f"{path}: show a cluster command"


@pytest.mark.parametrize(
    "override, key_in_message",
    [
        ("trainer.zero_stag=1", "zero_stag"),
        ("trainer.max_steps=abc", "trainer.max_steps"),
        ("trainer.precision=fp8", "trainer.precision"),
        ("model=resnet", "model"),
    ],
)
def test_schema_errors_name_the_key(override, key_in_message):
    with pytest.raises((ConfigCompositionException, ValidationError, ConfigKeyError)) as error:
        compose([override])
    text = str(error.value) + str(error.value.__cause__)
    assert key_in_message in text


@pytest.mark.parametrize(
    "overrides, key, allowed",
    [
        (["trainer.zero_stage=4"], "trainer.zero_stage", "0, 1, 2, 3"),
        (["trainer.precision=fp16"], "trainer.precision", "GPUs only"),
        (["trainer.num_workers=64"], "trainer.num_workers", "CPUs"),
        (["trainer.micro_batch_size=0"], "trainer.micro_batch_size", ">= 1"),
        (["trainer.scheduler.warmup_steps=500"], "trainer.scheduler.warmup_steps", "max_steps"),
        (["model=gpt", "data=text", "data.path=/no/such/corpus.txt"], "data.path", "no such file"),
        (["model=cnn", "data=text"], "model", "model=gpt"),
        (["model=gpt"], "model", "classification dataset"),
        (["model=cnn", "data=synthetic"], "model", "image-shaped"),
        (["model=gpt", "data=text", "model.n_head=3"], "model.n_head", "divide"),
        (["resume=never-ran"], "resume", "no run named"),
    ],
)
def test_cross_field_errors_name_key_value_and_allowed(tmp_path, overrides, key, allowed):
    with pytest.raises(ConfigError) as error:
        plan(tmp_path, *overrides)
    assert error.value.key == key
    assert allowed in str(error.value)


def test_a_new_run_never_reuses_an_existing_name(tmp_path):
    (tmp_path / "orch_runs" / "mine").mkdir(parents=True)
    with pytest.raises(ConfigError, match="resume=mine"):
        plan(tmp_path, "name=mine")
    assert plan(tmp_path, "resume=mine").resuming


def test_cli_user_error_is_one_clear_line_and_starts_nothing(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "run", "trainer.zero_stage=4"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "trainer.zero_stage=4" in out.stderr and "0, 1, 2, 3" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "orch_runs").exists()


def test_plan_does_not_import_torch_ray_or_mlflow(tmp_path):
    code = (
        "import sys; from orchestrator.config import compose; from orchestrator.plan import build_plan; "
        f"build_plan(compose(['trainer.zero_stage=3']), cwd=__import__('pathlib').Path({str(tmp_path)!r})); "
        "print(sorted(m for m in ('torch', 'ray', 'mlflow', 'deepspeed') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_orch_plan_prints_deepspeed_config_and_memory(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "plan", "trainer.zero_stage=2", "model=cnn"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    for expected in ('"stage": 2', "memory per worker", "WarmupCosineLR", "gloo", "orchestrator.models.cnn.CNN"):
        assert expected in out.stdout
    assert not (tmp_path / "orch_runs").exists()


def test_run_help_lists_config_groups():
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "run", "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0
    for group in ("model: cnn, gpt, hf_causal_lm, hf_llama, mlp", "data: digits, synthetic, text", "trainer: default, gpu", "cluster: local, ray"):
        assert group in out.stdout


def test_orch_plan_composes_the_config_once(monkeypatch, tmp_path, capsys):
    # hydra.main composes twice (the first only reads hydra.mode); `orch plan` is the quick check users run often
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    from orchestrator import cli

    calls = []
    original = ConfigLoaderImpl.load_configuration
    monkeypatch.setattr(ConfigLoaderImpl, "load_configuration", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    monkeypatch.chdir(tmp_path)
    cli.main(["plan", "trainer.zero_stage=1"])
    assert len(calls) == 1
    assert '"stage": 1' in capsys.readouterr().out


def test_orch_plan_names_an_unknown_key(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "plan", "trainer.nope=1"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2
    # one line naming the key; no Hydra hint to append it with `+` (that would silently add an unused key)
    assert out.stderr.strip() == "orch: error: trainer.nope: no such key"


@pytest.mark.parametrize(
    "command, override, line",
    [
        ("plan", "trainer.zero_stag=1", "trainer.zero_stag: no such key; did you mean trainer.zero_stage?"),
        ("run", "trainer.optimizer.lrr=1", "trainer.optimizer.lrr: no such key; did you mean trainer.optimizer.lr?"),
        ("run", "model=cnnn", "model=cnnn: no such option; did you mean cnn? (options: cnn, gpt, hf_causal_lm, hf_llama, mlp)"),
        ("run", "trainer.zero_stage=two", "trainer.zero_stage=two: expected integer"),
        ("sweep", "sweep.num_sampls=3", "sweep.num_sampls: no such key; did you mean sweep.num_samples?"),
    ],
)
def test_a_bad_override_is_one_line_with_the_closest_name(tmp_path, command, override, line):
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", command, override], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.strip() == f"orch: error: {line}"
    assert not (tmp_path / "orch_runs").exists() and not (tmp_path / "mlflow.db").exists()


def test_free_form_mappings_take_plain_overrides_as_the_readme_writes_them(tmp_path):
    composed = compose(["trainer.deepspeed={zero_optimization: {overlap_comm: true}}", "cluster.env.FOO=bar", "cluster.env={BAZ: qux}"])
    assert composed.cfg.trainer.deepspeed == {"zero_optimization": {"overlap_comm": True}}
    assert dict(composed.cfg.cluster.env) == {"FOO": "bar", "BAZ": "qux"}
    plan = build_run_plan(composed, cwd=tmp_path)
    assert plan.stages[0].deepspeed["zero_optimization"] == {"stage": 0, "overlap_comm": True}
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "sweep", "--plan", "sweep.space={trainer.optimizer.weight_decay: {choice: [0.0, 0.01]}}"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "trainer.optimizer.weight_decay: choice(0.0, 0.01)" in out.stdout and "trainer.optimizer.lr: loguniform" in out.stdout


@pytest.mark.parametrize("command", [["plan"], ["run", "--plan"], ["submit", "--address", "http://127.0.0.1:9"]])
def test_plan_run_and_submit_validate_every_pipeline_stage_with_the_command_line(tmp_path, command):
    # the prune stage refuses ZeRO-3: found only if the command line's override reaches the stages, as it does in a run
    extra = ["trainer.storage_path=/tmp/x", "tracking.uri=http://127.0.0.1:9"] if command[0] == "submit" else []
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *command, "recipe=pipeline", "trainer.zero_stage=3", *extra],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr
    assert "pipeline.stages[pruned]" in out.stderr and "ZeRO-3" in out.stderr
    assert not (tmp_path / "orch_runs").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize(
    "overrides",
    [
        ["model=gpt", "data=text", "data.path=/shared/corpus.txt"],  # the example in conf/data/text.yaml
        ["resume=a-run-on-the-cluster"],
        ["recipe=prune", "recipe.input=/mnt/shared/models/teacher"],
        ["recipe=pipeline", "pipeline=text_structured", "model=gpt", "data=text", "data.path=/shared/corpus.txt"],
    ],
)
def test_submit_leaves_what_lives_on_the_cluster_to_the_cluster(tmp_path, overrides):
    # paths and runs on the cluster are not looked for on the laptop: validation passes and the submission goes on to
    # the (here unreachable) job server; the job's driver checks them before it starts Ray
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "submit", "--address", "http://127.0.0.1:9", *overrides,
         "trainer.storage_path=/mnt/shared/orch_runs", "tracking.uri=http://127.0.0.1:9"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 2 and "no Ray job server answers" in out.stderr, out.stderr
    # the same config is still checked where the files should be: by plan (and by the job's own `orch run`)
    local = subprocess.run([sys.executable, "-m", "orchestrator.cli", "plan", *overrides, "trainer.storage_path=/mnt/shared/orch_runs"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert local.returncode == 2 and local.stderr.startswith("orch: error:") and len(local.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "overrides, key, expected",
    [
        (["+trainer.foo=1"], "trainer.foo", "no such key in trainer"),
        (["+trainer.optimizer.lrr=1"], "trainer.optimizer.lrr", "did you mean trainer.optimizer.lr?"),
        (["+model.depth=3"], "model.depth", "no such key in model"),
        (["trainer.deepspeed={fp16: {enabled: true}}"], "trainer.deepspeed.fp16", "trainer.precision"),
        (["trainer.deepspeed={zero_optimization: {stage: 3}}"], "trainer.deepspeed.zero_optimization.stage", "trainer.zero_stage"),
        (["trainer.deepspeed={train_micro_batch_size_per_gpu: 8}"], "trainer.deepspeed.train_micro_batch_size_per_gpu", "trainer.micro_batch_size"),
        (["recipe=pipeline", "trainer.deepspeed={zero_optimization: {stage: 3}}"], "pipeline.stages[teacher].trainer.deepspeed.zero_optimization.stage", "trainer.zero_stage"),
    ],
)
def test_keys_outside_the_schema_and_overlay_keys_a_rule_owns_are_refused(tmp_path, overrides, key, expected):
    with pytest.raises(ConfigError) as error:
        build_run_plan(compose(overrides), list(overrides), cwd=tmp_path)
    assert error.value.key == key and expected in str(error.value)
    # what the overlay is for still passes
    build_run_plan(compose(["trainer.deepspeed={zero_optimization: {overlap_comm: true}, wall_clock_breakdown: true}"]), cwd=tmp_path)


def test_a_remembered_composition_is_a_fresh_copy_and_an_edited_yaml_is_read_again(tmp_path, monkeypatch):
    import time

    monkeypatch.chdir(tmp_path)
    first = compose(["model=mlp", "trainer.max_steps=7"])
    first.cfg.trainer.max_steps = 99  # a caller's edit stays its own
    assert compose(["model=mlp", "trainer.max_steps=7"]).cfg.trainer.max_steps == 7
    # a project's own option appears, and an edit of it is read again, in the same process
    (tmp_path / "conf" / "model").mkdir(parents=True)
    mine = tmp_path / "conf" / "model" / "mine.yaml"
    mine.write_text("defaults:\n  - mlp\n  - _self_\nhidden_sizes: [5]\n")
    assert list(compose(["model=mine"]).cfg.model.hidden_sizes) == [5]
    time.sleep(0.01)
    mine.write_text("defaults:\n  - mlp\n  - _self_\nhidden_sizes: [6, 6]\n")
    assert list(compose(["model=mine"]).cfg.model.hidden_sizes) == [6, 6]
    mine.unlink()
    with pytest.raises(ConfigCompositionException):
        compose(["model=mine"])
