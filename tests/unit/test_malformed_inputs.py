"""Every malformed input stops before Ray starts: exit code 2, one `orch: error:` line naming the key (or the file),
nothing written. A table, so that a new rule is one row.

`orch plan` runs in-process (it shares every rule with `orch run`, `orch run --plan`, `orch submit` and each pipeline
stage: tests/unit/test_config.py checks that sharing); a few rows go through `orch run` and `orch sweep` in a
subprocess, where the composition is `orch run`'s own. Each row's time is printed, not asserted (shared machines).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator import cli

RUN_ID = "0123456789abcdef0123456789abcdef"
GPT = ["model=gpt", "data=text"]

# (arguments after `orch plan`, what the one error line must name)
PLAN_ROWS = [
    (["trainer.zero_stage=4"], "trainer.zero_stage=4"),
    (["trainer.zero_stage=two"], "trainer.zero_stage=two"),
    (["trainer.zero_stag=1"], "did you mean trainer.zero_stage?"),
    (["trainer.precision=fp16"], "trainer.precision='fp16'"),
    (["trainer.precision=fp8"], "trainer.precision=fp8"),
    (["trainer.num_workers=0"], "trainer.num_workers=0"),
    (["trainer.num_workers=64"], "trainer.num_workers"),
    (["trainer.num_workers=[2,1]"], "trainer.num_workers=[2, 1]: MIN=2 > MAX=1"),
    (["trainer.num_workers=[0,2]"], "trainer.num_workers=[0, 2]: MIN=0"),
    (["trainer.num_workers=[1,2,3]"], "trainer.num_workers=[1, 2, 3]"),
    (["trainer.num_workers=two"], "trainer.num_workers='two'"),
    (["trainer.num_workers=[3,4]", "trainer.grad_accum_steps=3", "cluster.num_cpus=2"], "trainer.num_workers=[3, 4]: at least 3 workers"),
    (["trainer.num_workers=[2,4]"], "trainer.num_workers=[2, 4]: an elastic group keeps the global batch of 4 workers"),
    (["trainer.micro_batch_size=0"], "trainer.micro_batch_size=0"),
    (["trainer.grad_accum_steps=0"], "trainer.grad_accum_steps=0"),
    (["trainer.max_steps=0"], "trainer.max_steps=0"),
    (["trainer.log_every=0"], "trainer.log_every=0"),
    (["trainer.eval_every=-1"], "trainer.eval_every=-1"),
    (["trainer.checkpoint_every=-1"], "trainer.checkpoint_every=-1"),
    (["trainer.keep_checkpoints=0"], "trainer.keep_checkpoints=0"),
    (["trainer.max_failures=-1"], "trainer.max_failures=-1"),
    (["trainer.grad_clip=-1"], "trainer.grad_clip=-1"),
    (["trainer.grad_clip=inf"], "trainer.grad_clip=inf"),
    (["trainer.cpus_per_worker=0"], "trainer.cpus_per_worker=0"),
    (["trainer.threads_per_worker=-3"], "trainer.threads_per_worker=-3"),
    (["trainer.use_gpu=true", "trainer.gpus_per_worker=-1", "cluster=ray"], "trainer.gpus_per_worker=-1"),
    (["trainer.activation_checkpointing=true"], "trainer.activation_checkpointing=True"),  # the MLP has no blocks
    (["model=cnn", "trainer.activation_checkpointing=true"], "trainer.activation_checkpointing=True"),
    (["trainer.activation_checkpointing=maybe"], "trainer.activation_checkpointing"),
    (["trainer.optimizer.name=adam"], "trainer.optimizer.name=adam"),
    (["trainer.optimizer.lr=0"], "trainer.optimizer.lr=0"),
    (["trainer.optimizer.lr=-1e-3"], "trainer.optimizer.lr=-0.001"),
    (["trainer.optimizer.lr=nan"], "trainer.optimizer.lr=nan"),
    (["trainer.optimizer.lr=inf"], "trainer.optimizer.lr=inf"),
    (["trainer.optimizer.betas=[0.9]"], "trainer.optimizer.betas=[0.9]"),
    (["trainer.optimizer.betas=[0.9,1.5]"], "trainer.optimizer.betas"),
    (["trainer.optimizer.weight_decay=-0.1"], "trainer.optimizer.weight_decay=-0.1"),
    (["trainer.optimizer.eps=0"], "trainer.optimizer.eps=0"),
    (["trainer.optimizer.momentum=1.5"], "trainer.optimizer.momentum=1.5"),
    (["trainer.scheduler.min_lr_ratio=5"], "trainer.scheduler.min_lr_ratio=5"),
    (["trainer.scheduler.warmup_steps=500"], "trainer.scheduler.warmup_steps=500"),
    (["trainer.scheduler.name=step"], "trainer.scheduler.name=step"),
    (["trainer.deepspeed={fp16: {enabled: true}}"], "trainer.deepspeed.fp16"),
    (["trainer.deepspeed={zero_optimization: {stage: 3}}"], "trainer.deepspeed.zero_optimization.stage"),
    (["trainer.deepspeed={gradient_clipping: 0}"], "trainer.deepspeed.gradient_clipping"),
    (["+trainer.foo=1"], "trainer.foo"),
    (["+trainer.optimizer.lrr=1"], "did you mean trainer.optimizer.lr?"),
    (["model=cnnn"], "model=cnnn"),
    (["model=gpt"], "model"),
    (["model=cnn", "data=text"], "model"),
    (["model=cnn", "data=synthetic"], "model"),
    (["model.hidden_sizes=[-4]"], "model.hidden_sizes=[-4]"),
    (["model.hidden_sizes=[0]"], "model.hidden_sizes=[0]"),
    (["model.dropout=1.5"], "model.dropout=1.5"),
    (["+model.depth=3"], "model.depth"),
    ([*GPT, "model.n_head=3"], "model.n_head=3"),
    ([*GPT, "model.n_layer=0"], "model.n_layer=0"),
    ([*GPT, "data.block_size=0"], "data.block_size=0"),
    ([*GPT, "data.path=/no/such/corpus.txt"], "data.path='/no/such/corpus.txt'"),
    ([*GPT, "data.path={cwd}/empty.txt"], "the file is empty"),
    ([*GPT, "data.path={cwd}/binary.txt"], "the file is binary"),
    ([*GPT, "data.tokenizer=/no/such/tokenizer"], "data.tokenizer='/no/such/tokenizer'"),
    (["model=hf_causal_lm", "data=text", "model.pretrained_path=/no/such/model"], "model.pretrained_path='/no/such/model'"),
    (["data.limit_train=0"], "data.limit_train=0"),
    (["data.val_fraction=1.5"], "data.val_fraction=1.5"),
    (["data=synthetic", "data.num_samples=1"], "data.num_samples=1"),
    (["data=nope"], "data=nope"),
    (["cluster.num_cpus=0"], "cluster.num_cpus=0"),
    (["cluster=nope"], "cluster=nope"),
    (["recipe=prune"], "recipe.input=None"),
    (["recipe=prune", "recipe.input=not-a-run-or-folder"], "recipe.input='not-a-run-or-folder'"),
    (["recipe=distill"], "recipe.distill.teacher=None"),
    (["recipe=distill", f"recipe.distill.teacher={RUN_ID}", "recipe.distill.alpha=2"], "recipe.distill.alpha=2"),
    (["recipe=distill", f"recipe.distill.teacher={RUN_ID}", "recipe.distill.temperature=0"], "recipe.distill.temperature=0"),
    (["recipe=distill", f"recipe.distill.teacher={RUN_ID}", "recipe.distill.transfer_data=nope"], "recipe.distill.transfer_data='nope'"),
    (["recipe=distill", f"recipe.distill.teacher={RUN_ID}", "recipe.distill.transfer_data=synthetic"], "recipe.distill.transfer_data='synthetic'"),
    (["recipe=distill", f"recipe.distill.teacher={RUN_ID}", "data.split_seed=3", "recipe.distill.transfer_data=digits"], "recipe.distill.transfer_data='digits'"),
    (["recipe=distill", f"recipe.distill.teacher={RUN_ID}", *GPT, "recipe.distill.transfer_data=digits"], "recipe.distill.transfer_data='digits'"),
    (["recipe=distill", f"recipe.distill.teacher={RUN_ID}", *GPT, "data.vocab_size=300", "recipe.distill.transfer_data=text"], "recipe.distill.transfer_data='text'"),
    (["recipe=distill", f"recipe.distill.teacher={RUN_ID}", *GPT, "data.block_size=32", "recipe.distill.transfer_data=text"], "recipe.distill.transfer_data='text'"),
    (["recipe=train", "recipe.pruning.schedule=gradual", "recipe.pruning.sparsity=1.5"], "recipe.pruning.sparsity=1.5"),
    (["recipe.pruning.scope=model"], "recipe.pruning.scope='model'"),
    (["recipe=prune", f"recipe.input={RUN_ID}", "trainer.zero_stage=3"], "trainer.zero_stage=3"),
    (["recipe=distill", f"recipe.distill.teacher={RUN_ID}", "recipe.distill.feature_weight=0.1", "trainer.zero_stage=3"],
     "trainer.zero_stage=3"),
    (["recipe=quantize", f"recipe.input={RUN_ID}", "recipe.method=int3"], "recipe.method=int3"),
    (["recipe=quantize", f"recipe.input={RUN_ID}", "recipe.method=int4_weight_only"], "recipe.method='int4_weight_only'"),
    (["recipe=quantize", f"recipe.input={RUN_ID}", "recipe.method=fp8"], "recipe.method='fp8'"),
    (["recipe=quantize", f"recipe.input={RUN_ID}", "recipe.device=cuda"], "recipe.device='cuda'"),
    (["recipe=prune", f"recipe.input={RUN_ID}", "recipe.pruning.pattern=2-4"], "recipe.pruning.pattern='2-4'"),
    (["recipe=prune", f"recipe.input={RUN_ID}", "recipe.pruning.method=obs"], "recipe.pruning.method=obs"),
    (["recipe=train", "recipe.pruning.schedule=one_shot", "recipe.pruning.method=wanda"], "recipe.pruning.method='wanda'"),
    (["recipe=prune", f"recipe.input={RUN_ID}", "recipe.pruning.method=wanda", "recipe.pruning.calibration_batches=0"],
     "recipe.pruning.calibration_batches=0"),
    (["recipe=prune", f"recipe.input={RUN_ID}", *GPT, "model.n_embd=36", "model.n_head=2", "recipe.pruning.pattern=2:8"],
     "model.n_embd=36 is not a multiple of 8"),
    (["recipe=prune", f"recipe.input={RUN_ID}", *GPT, "recipe.structured.drop_blocks=2"],
     "recipe.structured.drop_blocks=2: expected 0 <= drop_blocks < 2"),
    (["recipe=prune", f"recipe.input={RUN_ID}", "model=hf_llama", "data=text", "recipe.structured.drop_blocks=-1"],
     "recipe.structured.drop_blocks=-1"),
    (["recipe=prune", f"recipe.input={RUN_ID}", "model=mlp", "recipe.structured.drop_blocks=1"],
     "recipe.structured.drop_blocks=1: removes transformer blocks"),
    (["recipe=nope"], "recipe=nope"),
    (["recipe=pipeline", "pipeline=nope"], "pipeline=nope"),
    (["recipe=pipeline", "trainer.zero_stage=3"], "pipeline.stages[pruned]"),
    (["recipe=pipeline", "tracking.log_model=false"], "tracking.log_model=False"),
    (["recipe=pipeline", "pipeline.promote.register_as=digits", "pipeline.promote.max_quality_drop={vs: techer, max_drop: 0.02}"], "pipeline.promote.max_quality_drop.vs='techer'"),
    (["recipe=pipeline", "pipeline.promote.register_as=digits", "pipeline.promote.max_quality_drop={vs: teacher, metric: val_loss, max_drop: 0.02}"], "pipeline.promote.max_quality_drop.metric='val_loss'"),
    (["recipe=pipeline", "pipeline.promote.register_as=digits", "pipeline.promote.min_size_ratio={vs: nope, min: 4}"], "pipeline.promote.min_size_ratio.vs='nope'"),
    (["recipe=pipeline", "pipeline.promote.min_latency_ratio.min=2"], "pipeline.promote.register_as=None"),
    (["recipe=pipeline", "pipeline.promote.register_as=digits", "tracking.register_as=digits"], "tracking.register_as='digits'"),
    (["name=../../escaped-run"], "name='../../escaped-run'"),
    (["name=it's"], "name=it's"),
    (["resume=/etc"], "resume='/etc'"),
    (["resume=never-ran"], "resume='never-ran'"),
    (["tracking.register_as=a/b"], "tracking.register_as"),
    (["nope=1"], "nope: no such key"),
    # offload and the memory budget (the budget's smallest-plan rule: an 85 M-parameter GPT cannot fit 0.5 GB)
    (["trainer.offload.optimizer=cpu"], "trainer.offload.optimizer='cpu'"),
    (["trainer.zero_stage=2", "trainer.offload.param=cpu"], "trainer.offload.param='cpu'"),
    (["trainer.offload.optimizer=disk"], "trainer.offload.optimizer=disk"),
    (["trainer.zero_stage=1", "trainer.offload.optimizer=nvme"], "trainer.offload.nvme_path=None"),
    (["trainer.zero_stage=1", "trainer.offload.optimizer=nvme", "trainer.offload.nvme_path={cwd}/absent"], "trainer.offload.nvme_path="),
    (["trainer.deepspeed={zero_optimization: {offload_optimizer: {device: cpu}}}"], "trainer.deepspeed.zero_optimization.offload_optimizer"),
    (["trainer.memory_budget_gb=0"], "trainer.memory_budget_gb=0"),
    (["trainer.memory_budget_gb=-2"], "trainer.memory_budget_gb=-2"),
    ([*GPT, "model.n_layer=12", "model.n_embd=768", "model.n_head=12", "trainer.memory_budget_gb=0.5"], "trainer.memory_budget_gb=0.5"),
]


@pytest.fixture()
def project(tmp_path, monkeypatch):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "binary.txt").write_bytes(b"\x00\x01\x02 not text")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def test_the_table_is_long_enough():
    assert len(PLAN_ROWS) + len(PROCESS_ROWS) >= 60


@pytest.mark.parametrize("arguments, names", PLAN_ROWS, ids=[" ".join(a) for a, _ in PLAN_ROWS])
def test_a_malformed_input_is_one_line_naming_the_key(project, capsys, arguments, names):
    arguments = [a.replace("{cwd}", str(project)) for a in arguments]
    before = files_under(project)
    started = time.perf_counter()
    with pytest.raises(SystemExit) as exit_:
        cli.main(["plan", *arguments])
    elapsed = time.perf_counter() - started
    out, err = capsys.readouterr()
    assert exit_.value.code == 2, out[-500:] + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("orch: error: "), err
    assert names in lines[0]
    assert files_under(project) == before  # nothing written: no run folder, no MLflow store
    print(f"{elapsed:.2f}s {' '.join(arguments)}")


# `orch run` / `orch sweep` themselves, in a subprocess: (command and arguments, what the line must name)
PROCESS_ROWS = [
    (["run", "model=broken"], "conf/model/broken.yaml:4"),
    (["run", "trainer.optimizer.lr=nan"], "trainer.optimizer.lr=nan"),
    (["run", "trainer.zero_stag=1"], "did you mean trainer.zero_stage?"),
    (["sweep", "sweep.space.trainer.optimizer.lr={loguniform: [1e-4, inf]}"], "sweep.space.trainer.optimizer.lr.loguniform"),
    (["sweep", "sweep.space.trainer.optimizer.lrr={uniform: [0.1, 0.2]}"], "sweep.space.trainer.optimizer.lrr"),
    (["sweep", "sweep.metric=nope"], "sweep.metric='nope'"),
    (["sweep", "sweep.num_sampls=3"], "did you mean sweep.num_samples?"),
    # port 9 (discard) on loopback: nothing listens; the check is one request, seconds, not MLflow's retries
    (["run", "tracking.uri=http://127.0.0.1:9"], "tracking.uri='http://127.0.0.1:9': no MLflow server answers there"),
    (["sweep", "tracking.uri=http://127.0.0.1:9"], "tracking.uri='http://127.0.0.1:9'"),
    (["ui", "--host", "0.0.0.0"], "--insecure-public"),
    (["sweep", "resume=never-swept"], "resume='never-swept': no sweep named"),
    (["sweep", "sweep.objectives={val_accuracy: max, nonzero_parameters: min}", "sweep.scheduler.name=none"],
     "sweep.objectives.nonzero_parameters='min'"),  # the train recipe does not prune: no size to report
    (["sweep", "sweep.objectives={val_accuracy: best, loss: min}", "sweep.scheduler.name=none"], "sweep.objectives.val_accuracy='best'"),
    (["sweep", "sweep.objectives={val_accuracy: max, loss: min}"], "sweep.scheduler.name='asha'"),
    (["sweep", "sweep.objectives={val_accuracy: max}", "sweep.scheduler.name=none"], "sweep.objectives={'val_accuracy': 'max'}"),
    # a pipeline trial reports the pipeline's summary (final_val_accuracy ...), not a stage's val_accuracy
    (["sweep", "sweep=digits_pareto", "sweep.objectives={final_val_accuracy: max, val_accuracy: min}"], "sweep.objectives.val_accuracy='min'"),
]


@pytest.mark.parametrize("arguments, names", PROCESS_ROWS, ids=[" ".join(a) for a, _ in PROCESS_ROWS])
def test_orch_run_and_sweep_stop_in_one_line_before_ray(project, arguments, names):
    conf = project / "conf" / "model"
    conf.mkdir(parents=True)
    (conf / "broken.yaml").write_text("defaults:\n  - /schema/model@_here_: mlp\n  - _self_\nhidden_sizes: [1, 2\n")
    # a `ray` that cannot be imported shadows the real one: had orch imported Ray (let alone started it) before the
    # error, the process would end in an ImportError instead of the one line
    fake = project.parent / f"{project.name}-no-ray" / "ray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('Ray was imported before the config was checked')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(fake.parent), os.environ.get("PYTHONPATH")]))}
    before = files_under(project)
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", *arguments], cwd=project, capture_output=True, text=True,
                         timeout=120, env=env)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("orch: error: "), out.stdout[-500:] + out.stderr
    assert names in lines[0]
    assert files_under(project) == before
