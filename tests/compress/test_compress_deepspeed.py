"""Pruned weights stay exactly zero inside real DeepSpeed engines, including the optimizer's fp32 master copy and
across save_checkpoint/load_checkpoint. Single process, gloo, CPU."""

from __future__ import annotations


import pytest
import torch
from torch import nn

deepspeed = pytest.importorskip("deepspeed")

from orchestrator.compress import GradualPruning, prunable_parameters  # noqa: E402

pytestmark = [
    pytest.mark.usefixtures("single_process_group"),
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning", "ignore::FutureWarning"),
]

SCHEDULE = dict(initial_sparsity=0.25, final_sparsity=0.75, start_step=0, end_step=4, frequency=2)


def make_engine(stage: int, bf16: bool, seed: int):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    config = {
        "train_micro_batch_size_per_gpu": 8,
        "zero_optimization": {"stage": stage},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
    }
    if bf16:
        config["bf16"] = {"enabled": True}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    return engine


def train(engine, pruner: GradualPruning, steps: range) -> list[float | None]:
    dtype = next(engine.module.parameters()).dtype
    generator = torch.Generator().manual_seed(steps.start)
    reported = []
    for step in steps:
        x = torch.randn(8, 16, generator=generator).to(dtype)
        y = torch.randint(0, 4, (8,), generator=generator)
        engine.backward(nn.functional.cross_entropy(engine(x).float(), y))
        engine.step()
        reported.append(pruner.on_step_end(step))
    return reported


def master_weights(engine, params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """The optimizer's fp32 copy of each parameter, located without DeepSpeed's own per-parameter mapping."""
    optimizer = engine.optimizer
    if hasattr(optimizer, "single_partition_of_fp32_groups"):  # ZeRO 1/2: one rank owns the whole flat buffer
        views = {}
        for flat16, flat32 in zip(optimizer.bit16_groups_flat, optimizer.single_partition_of_fp32_groups):
            for name, p in params.items():
                offset = (p.data_ptr() - flat16.data_ptr()) // p.element_size()
                if 0 <= offset < flat16.numel():
                    views[name] = flat32.narrow(0, offset, p.numel()).view(p.shape)
        assert views.keys() == params.keys()
        return views
    if hasattr(optimizer, "fp32_groups"):  # ZeRO 0 with bf16/fp16: one fp32 tensor per parameter
        pairs = zip(optimizer.fp16_groups, optimizer.fp32_groups)
        by_id = {id(lp): hp for g16, g32 in pairs for lp, hp in zip(g16, g32)}
        return {name: by_id[id(p)] for name, p in params.items()}
    assert isinstance(optimizer, torch.optim.Optimizer)  # ZeRO 0 fp32: the module's parameters are the master
    return dict(params)


def assert_pruned_entries_zero(engine, pruner: GradualPruning) -> None:
    masks = pruner.enforcer.masks
    masters = master_weights(engine, pruner.params)
    for name, mask in masks.items():
        assert pruner.params[name].dtype == next(engine.module.parameters()).dtype
        assert pruner.params[name].detach()[~mask].abs().max() == 0, f"{name}: module weight revived"
        assert masters[name].dtype == torch.float32
        assert masters[name].detach()[~mask].abs().max() == 0, f"{name}: fp32 master revived"
        assert (pruner.params[name].detach()[mask] != 0).float().mean() > 0.95  # the rest is alive


@pytest.mark.parametrize(
    ("stage", "bf16", "restore"),
    [(0, False, True), (1, False, True), (2, False, True), (2, True, True), (0, True, False)],
    ids=["zero0", "zero1", "zero2", "zero2-bf16", "zero0-bf16"],
)
def test_pruned_weights_stay_zero_in_module_and_master(stage, bf16, restore, tmp_path):
    engine = make_engine(stage, bf16, seed=0)
    params = prunable_parameters(engine.module)
    pruner = GradualPruning(params, **SCHEDULE, optimizer=engine.optimizer)
    assert pruner.on_step_end(0) == 0.25  # pruned after initialize: the master copy already holds dense values
    assert_pruned_entries_zero(engine, pruner)
    # sparsity rises at steps 2 and 4, i.e. while Adam moments are non-zero
    assert train(engine, pruner, range(1, 7)) == [None, 0.6875, None, 0.75, None, None]
    assert_pruned_entries_zero(engine, pruner)
    for name, mask in pruner.enforcer.masks.items():
        assert int((~mask).sum()) == round(0.75 * mask.numel())
    if not restore:
        return

    before = {name: p.detach().clone() for name, p in params.items()}
    engine.save_checkpoint(str(tmp_path), tag="step6", client_state={"pruning": pruner.state_dict()})
    fresh = make_engine(stage, bf16, seed=1)  # dense, different weights
    _, client_state = fresh.load_checkpoint(str(tmp_path), tag="step6")
    restored = GradualPruning(prunable_parameters(fresh.module), **SCHEDULE, optimizer=fresh.optimizer)
    restored.load_state_dict(client_state["pruning"])
    for name, p in restored.params.items():
        torch.testing.assert_close(p.detach(), before[name], rtol=0, atol=0)
    assert train(fresh, restored, range(7, 10)) == [None, None, None]
    assert_pruned_entries_zero(fresh, restored)
    assert any(not torch.equal(p.detach(), before[n]) for n, p in restored.params.items())  # it did train


def test_zero3_raises_clear_error():
    engine = make_engine(3, False, seed=0)
    with pytest.raises(NotImplementedError, match=r"ZeRO stages 0-2.*trainer\.zero_stage<=2"):
        GradualPruning(prunable_parameters(engine.module), **SCHEDULE, optimizer=engine.optimizer)
