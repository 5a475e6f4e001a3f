"""Data order (sharding, reshuffle, resumable position), the analytic parameter counts, losses."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from orchestrator.config import compose
from orchestrator.models.sizes import count_parameters
from orchestrator.train.data_order import ShardedBatches, shard_for_eval
from orchestrator.train.objective import eval_metrics, eval_sums, task_loss
from torch.utils.data import TensorDataset


def dataset(n: int = 100) -> TensorDataset:
    return TensorDataset(torch.arange(n), torch.arange(n))


def test_shards_are_disjoint_and_reshuffled_every_epoch():
    ranks = [ShardedBatches(dataset(), 8, rank, 2, seed=3) for rank in range(2)]
    epoch0 = [set(itertools.chain(*r.epoch_batches(0))) for r in ranks]
    assert not epoch0[0] & epoch0[1]
    assert len(epoch0[0]) == len(epoch0[1]) == 48  # 50 per rank, cut to whole batches of 8
    assert ranks[0].epoch_batches(0) != ranks[0].epoch_batches(1)


def test_iterating_from_a_step_equals_skipping_to_it():
    batches = ShardedBatches(dataset(), 8, rank=1, world_size=2, seed=0)
    from_start = [b[0].tolist() for b in itertools.islice(batches.iterate_from(0), 20)]
    resumed = [b[0].tolist() for b in itertools.islice(batches.iterate_from(13), 7)]
    assert resumed == from_start[13:]  # crosses the epoch boundary at 6 batches per epoch


def test_too_small_a_dataset_names_the_keys():
    with pytest.raises(ValueError, match="trainer.micro_batch_size"):
        ShardedBatches(dataset(10), 8, rank=0, world_size=2, seed=0)


def test_eval_shards_cover_every_example_exactly_once():
    shards = [shard_for_eval(dataset(11), rank, 3) for rank in range(3)]
    assert sorted(itertools.chain(*shards)) == list(range(11))


@pytest.mark.parametrize("overrides", [["model=mlp"], ["model=cnn"], ["model=gpt", "data=text"]])
def test_analytic_parameter_counts_match_the_models(overrides):
    model_cfg = OmegaConf.to_container(compose(overrides).cfg.model, resolve=True)
    model = instantiate(model_cfg)
    assert count_parameters(model_cfg) == sum(p.numel() for p in model.parameters())


def test_models_produce_the_shapes_their_tasks_need():
    digits = OmegaConf.to_container(compose(["model=cnn"]).cfg.model, resolve=True)
    assert instantiate(digits)(torch.zeros(5, 1, 8, 8)).shape == (5, 10)
    gpt_cfg = OmegaConf.to_container(compose(["model=gpt", "data=text"]).cfg.model, resolve=True)
    assert instantiate(gpt_cfg)(torch.zeros(2, 16, dtype=torch.long)).shape == (2, 16, 256)


def test_text_data_is_byte_level_next_token():
    splits = instantiate(OmegaConf.to_container(compose(["model=gpt", "data=text"]).cfg.data, resolve=True))
    inputs, targets = splits.train[0]
    assert inputs.shape == targets.shape == (64,)
    assert torch.equal(inputs[1:], targets[:-1])
    assert splits.task == "lm" and len(splits.val) > 0


def test_losses_and_eval_sums():
    logits = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 0.0]])
    targets = torch.tensor([0, 1, 1])
    sums = eval_sums(logits, targets)
    assert sums[1] == 2 and sums[2] == 3
    metrics = eval_metrics(sums, "classification")
    assert metrics["val_accuracy"] == pytest.approx(2 / 3)
    assert metrics["val_loss"] == pytest.approx(float(task_loss(logits, targets)))
    lm = eval_metrics(torch.tensor([6.0, 0.0, 3.0], dtype=torch.float64), "lm")
    assert lm["val_perplexity"] == pytest.approx(math.exp(2.0))


def test_counting_an_hf_model_on_a_zero3_worker_builds_it_plain_and_leaves_zero3_on():
    """A ZeRO-3 worker keeps transformers' DeepSpeed config alive; a count that built inside zero.Init on rank 0 alone
    waited forever for rank 1 (the memory log hung a distillation run)."""
    from transformers.integrations import HfDeepSpeedConfig, is_deepspeed_zero3_enabled

    model_cfg = OmegaConf.to_container(
        compose(["model=hf_causal_lm", "data=text", "model.config.n_layer=1", "model.config.n_embd=32",
                 "model.config.n_head=2"]).cfg.model, resolve=True)
    expected = sum(p.numel() for p in {id(p): p for p in instantiate(model_cfg).parameters()}.values())
    alive = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    try:
        assert is_deepspeed_zero3_enabled()
        assert count_parameters(model_cfg) == expected  # no process group here: zero.Init would have failed
        assert is_deepspeed_zero3_enabled()  # the worker's own setting is back
    finally:
        del alive
    assert not is_deepspeed_zero3_enabled()
