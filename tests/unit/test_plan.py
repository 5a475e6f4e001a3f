"""The generated DeepSpeed config and the memory estimate, from the trainer group alone."""

from __future__ import annotations

import pytest

from orchestrator.config import compose
from orchestrator.plan import build_plan, deepspeed_config, estimate_memory


def trainer(*overrides: str) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(compose(list(overrides)).cfg.trainer, resolve=True, enum_to_str=True)


def test_generated_deepspeed_config_follows_the_trainer_group():
    config = deepspeed_config(
        trainer("trainer.zero_stage=2", "trainer.micro_batch_size=16", "trainer.grad_accum_steps=4", "trainer.num_workers=2"),
        "bf16",
    )
    assert config["zero_optimization"] == {"stage": 2}
    assert config["train_batch_size"] == 16 * 4 * 2
    assert config["bf16"] == {"enabled": True} and "fp16" not in config
    assert config["optimizer"]["type"] == "AdamW" and config["optimizer"]["params"]["torch_adam"] is True
    assert config["scheduler"]["type"] == "WarmupCosineLR"
    assert config["gradient_clipping"] == 1.0


def test_fp16_has_dynamic_loss_scaling_and_sgd_is_a_client_optimizer():
    config = deepspeed_config(trainer("trainer.optimizer.name=sgd", "trainer.scheduler.name=linear", "trainer.grad_clip=0"), "fp16")
    assert config["fp16"]["enabled"] and config["fp16"]["loss_scale"] == 0
    assert "optimizer" not in config and config["zero_allow_untested_optimizer"] is True
    assert config["scheduler"]["type"] == "WarmupDecayLR"
    assert "gradient_clipping" not in config


def test_raw_deepspeed_json_overlays_the_generated_config():
    config = deepspeed_config(
        trainer("+trainer.deepspeed.zero_optimization.overlap_comm=true", "+trainer.deepspeed.wall_clock_breakdown=true"),
        "fp32",
    )
    assert config["zero_optimization"] == {"stage": 0, "overlap_comm": True}
    assert config["wall_clock_breakdown"] is True


@pytest.mark.parametrize(
    "stage, expected",
    [
        (0, (2_000, 2_000, 12_000)),
        (1, (2_000, 2_000, 3_000)),
        (2, (2_000, 500, 3_000)),
        (3, (500, 500, 3_000)),
    ],
)
def test_memory_estimate_partitions_by_zero_stage(stage, expected):
    memory = estimate_memory(1_000, stage, "bf16", 4, "adamw")
    assert (memory.weights, memory.gradients, memory.optimizer) == expected
    assert memory.model_states == sum(expected)
    assert memory.total == sum(expected) + memory.buffers
    # ZeRO-0 all-reduces a flat copy of the gradients; ZeRO-1/2 keep a gradient bucket and an fp32 gradient partition;
    # ZeRO-3 its gradient bucket (DeepSpeed's 5e8 elements: filled to the model's size) and the reduce-scatter's copy
    assert memory.buffers == {0: 2_000, 1: 4_000 + 1_000, 2: 2_000 + 1_000, 3: 2 * 2_000}[stage]


def test_auto_precision_resolves_to_bf16_and_default_run_names_are_unique(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    first = build_plan(compose([]), cwd=tmp_path)
    second = build_plan(compose([]), cwd=tmp_path)
    assert first.stages[0].precision == "bf16"
    assert first.run_name != second.run_name
    assert first.tracking.uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert first.tracking.artifact_location == (tmp_path / "mlartifacts").as_uri()


# --- offload, activations, the fit verdict (issue 16 items 4 and 5) ------------------------------------------------

GPT_85M = ["model=gpt", "data=text", "model.n_layer=12", "model.n_embd=768", "model.n_head=12", "trainer.micro_batch_size=8",
           "trainer.precision=fp32"]


def test_offload_keys_become_deepspeeds_offload_sections():
    config = deepspeed_config(trainer("trainer.zero_stage=2", "trainer.offload.optimizer=cpu"), "fp32")
    assert config["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": False}}
    assert config["optimizer"]["params"]["torch_adam"] is True  # CPU workers: no C++ op to build
    config = deepspeed_config(trainer("trainer=gpu", "trainer.zero_stage=3", "trainer.offload.param=cpu"), "bf16")
    assert config["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert "offload_optimizer" not in config["zero_optimization"] and config["optimizer"]["params"]["torch_adam"] is True
    config = deepspeed_config(trainer("trainer=gpu", "trainer.offload.optimizer=cpu"), "bf16")
    assert config["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert "torch_adam" not in config["optimizer"]["params"]  # GPU workers: DeepSpeed's CPU Adam steps the states
    config = deepspeed_config(trainer("trainer.zero_stage=1", "trainer.offload.optimizer=cpu", "trainer.optimizer.name=sgd"), "fp32")
    assert config["zero_force_ds_cpu_optimizer"] is False  # torch's SGD on offloaded states, which DeepSpeed refuses by default


def test_nvme_offload_is_refused_in_one_line_where_deepspeed_cannot_do_it(tmp_path):
    from orchestrator.config.validate import ConfigError, nvme_offload_unavailable

    overrides = ["trainer.zero_stage=3", "trainer.offload.param=nvme", f"trainer.offload.nvme_path={tmp_path}"]
    reason = nvme_offload_unavailable()
    if reason:  # this machine: no libaio, so no async_io op
        with pytest.raises(ConfigError) as error:
            build_plan(compose(overrides), cwd=tmp_path)
        assert error.value.key == "trainer.offload.param" and "async_io" in str(error.value)
    else:
        section = build_plan(compose(overrides), cwd=tmp_path).stages[0].deepspeed["zero_optimization"]["offload_param"]
        assert section == {"device": "nvme", "pin_memory": False, "nvme_path": str(tmp_path)}


def test_activation_formula_matches_what_autograd_saves():
    """The GPT formula against the tensors autograd actually keeps for backward (parameters excluded), with and
    without checkpointed blocks: the vocab-wide tensors the formula adds for the loss's transient peak are left out."""
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    from orchestrator.models.activations import LOGIT_COPIES, gpt_activation_elements
    from orchestrator.models.gpt import GPT

    cfg = {"vocab_size": 256, "block_size": 32, "n_layer": 3, "n_head": 4, "n_embd": 64}
    torch.manual_seed(0)
    model = GPT(**cfg)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    idx = torch.randint(0, 256, (4, 32))

    def saved_bytes(checkpointing: bool) -> int:
        storages: dict[int, int] = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in parameters:
                storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            x = model.tok_emb(idx) + model.pos_emb(torch.arange(32))
            for block in model.blocks:
                x = checkpoint(block, x, use_reentrant=False) if checkpointing else block(x)
            F.cross_entropy(model.lm_head(model.ln_f(x)).view(-1, 256), idx.view(-1))
        return sum(storages.values())

    transient = 4 * 32 * (LOGIT_COPIES - 1) * 256
    full = gpt_activation_elements(cfg, 4, 32, checkpointing=False) - transient
    assert saved_bytes(False) == pytest.approx(4 * full, rel=0.03)
    # checkpointed: the blocks' inputs are kept; one block's full set comes back only during its recomputation
    recomputed = 4 * 32 * (16 * 64 + 4)
    kept = gpt_activation_elements(cfg, 4, 32, checkpointing=True) - transient - recomputed
    assert saved_bytes(True) == pytest.approx(4 * kept, rel=0.03)
    assert kept < full / 4


def test_plan_adds_activations_and_checkpointing_shrinks_them(tmp_path):
    memory = build_plan(compose([*GPT_85M, "trainer.zero_stage=0"]), cwd=tmp_path).stages[0].memory
    assert memory.activations_known and memory.activations > 0 and memory.runtime > 0
    assert memory.total == memory.model_states + memory.buffers + memory.activations + memory.runtime
    from orchestrator.memory import _memory_of

    container = build_plan(compose(GPT_85M), cwd=tmp_path).stages[0].config
    with_ckpt = _memory_of(container, memory.parameters, "fp32", {**container["trainer"], "activation_checkpointing": True})
    assert with_ckpt.activations < memory.activations / 3
    doubled = _memory_of(container, memory.parameters, "fp32", {**container["trainer"], "micro_batch_size": 16})
    assert doubled.activations == 2 * memory.activations


def test_a_plan_that_does_not_fit_names_the_cheapest_change_that_would(tmp_path):
    # ZeRO-0 fp32, 85 M parameters: ~1.4 GB of model states + activations + runtime; ZeRO-2 on 2 workers fits 1.9 GB
    memory = build_plan(compose([*GPT_85M, "trainer.memory_budget_gb=1.9"]), cwd=tmp_path).stages[0].memory
    assert memory.fits is False and memory.suggestion.startswith("trainer.zero_stage=")
    fitting = build_plan(compose([*GPT_85M, "trainer.memory_budget_gb=100"]), cwd=tmp_path).stages[0].memory
    assert fitting.fits is True and fitting.suggestion == "" and fitting.budget == 100 * 10**9


def test_cpu_offload_saves_device_memory_on_gpu_only():
    from orchestrator.memory import estimate_memory

    on_gpu = estimate_memory(10**6, 2, "bf16", 2, "adamw", offload_optimizer="cpu", on_gpu=True)
    on_cpu = estimate_memory(10**6, 2, "bf16", 2, "adamw", offload_optimizer="cpu", on_gpu=False)
    assert on_gpu.optimizer == 0 and on_gpu.offloaded == 12 * 10**6 // 2
    assert on_cpu.optimizer == 12 * 10**6 // 2 and on_cpu.offloaded == 0


def test_orch_plan_json_carries_the_total_and_the_verdict(tmp_path):
    from orchestrator.plan_view import plan_document

    plan = build_plan(compose([*GPT_85M, "trainer.memory_budget_gb=1.9"]), cwd=tmp_path)
    memory = plan_document(plan)["stages"][0]["memory"]
    assert memory["total"] == plan.stages[0].memory.total and memory["fits"] is False
    assert memory["suggestion"].startswith("trainer.zero_stage=") and memory["budget"] == 1.9e9
def test_a_transfer_set_is_resolved_into_the_stage_config_the_workers_instantiate(tmp_path):
    """recipe.distill.transfer_data -> recipe.distill.transfer: all_inputs lifts the label limit of the stage's own
    data; a data option is composed as `data=<option>` would be; none leaves it empty."""
    teacher = ["recipe=distill", "recipe.distill.teacher=0123456789abcdef0123456789abcdef", "data.limit_train=300"]

    def distill_settings(*overrides: str) -> dict:
        return build_plan(compose([*teacher, *overrides]), cwd=tmp_path).stages[0].config["recipe"]["distill"]

    all_inputs = distill_settings("recipe.distill.transfer_data=all_inputs")["transfer"]
    assert all_inputs["_target_"].endswith("load_digits_splits") and all_inputs["limit_train"] is None
    option = distill_settings("recipe.distill.transfer_data=digits")["transfer"]
    assert option["limit_train"] is None and option["split_seed"] == 0  # the option as shipped
    assert distill_settings()["transfer"] is None


def test_zero3_buffers_are_sized_to_the_model_and_release_after_each_use_on_cpu():
    # DeepSpeed's defaults (5e8-element bucket, reuse distance 1e9) kept the whole 85 M-parameter GPT gathered and its
    # whole gradient bucketed on every rank; a user's own trainer.deepspeed value still wins
    plan = build_plan(compose(["model=gpt", "data=text", "model.n_embd=96", "model.n_head=4", "trainer.zero_stage=3"]))
    zero = plan.stages[0].deepspeed["zero_optimization"]
    assert zero == {
        "stage": 3,
        "reduce_bucket_size": 96 * 96,
        "stage3_param_persistence_threshold": 960,
        "stage3_prefetch_bucket_size": 0,
        "stage3_max_reuse_distance": 0,
        "sub_group_size": 4 * 96 * 96,  # the optimizer steps the partition a block's share at a time
    }
    gpu = deepspeed_config(trainer("trainer=gpu", "trainer.zero_stage=3"), "bf16", {"n_embd": 100})
    assert gpu["zero_optimization"]["stage3_prefetch_bucket_size"] == 9_000
    assert "stage3_max_reuse_distance" not in gpu["zero_optimization"]
    assert "sub_group_size" not in gpu["zero_optimization"]
    own = deepspeed_config(trainer("trainer.zero_stage=3", "+trainer.deepspeed.zero_optimization.reduce_bucket_size=7"), "fp32", {"n_embd": 96})
    assert own["zero_optimization"]["reduce_bucket_size"] == 7
    assert "reduce_bucket_size" not in deepspeed_config(trainer("trainer.zero_stage=2"), "fp32", {"n_embd": 96})["zero_optimization"]


def test_zero3_memory_counts_its_bucket_and_no_second_fp32_partition():
    n, workers = 10**6, 2
    sized = estimate_memory(n, 3, "fp32", workers, "adamw", reduce_bucket=1_000)
    assert sized.buffers == 2 * 1_000 * 4  # bucket and its reduce-scatter copy; the weights are the fp32 master
    unsized = estimate_memory(n, 3, "fp32", workers, "adamw")  # DeepSpeed's 5e8 bucket fills to the model's size
    assert unsized.buffers == 2 * n * 4
    mixed = estimate_memory(n, 3, "bf16", workers, "adamw", reduce_bucket=1_000)
    assert mixed.buffers == 2 * 1_000 * 2  # the fp32 master copy is already in `optimizer`
    assert mixed.optimizer == n * 12 // workers
    plan = build_plan(compose(["model=gpt", "data=text", "model.n_embd=96", "model.n_head=4", "trainer.zero_stage=3", "trainer.num_workers=2", "trainer.precision=fp32"]))
    memory = plan.stages[0].memory
    assert memory.buffers == 2 * 96 * 96 * 4


def test_zero3_cpu_workers_return_freed_tensors_to_the_os_unless_the_cluster_env_says_otherwise():
    from orchestrator.launch.ray_session import worker_env

    assert worker_env({"env": {}}, use_gpu=False, zero_stage=3)["MALLOC_MMAP_THRESHOLD_"] == str(128 * 1024)
    assert "MALLOC_MMAP_THRESHOLD_" not in worker_env({"env": {}}, use_gpu=True, zero_stage=3)
    assert "MALLOC_MMAP_THRESHOLD_" not in worker_env({"env": {}}, use_gpu=False, zero_stage=2)  # speed first
    assert worker_env({"env": {"MALLOC_MMAP_THRESHOLD_": 1}}, use_gpu=False, zero_stage=3)["MALLOC_MMAP_THRESHOLD_"] == "1"
