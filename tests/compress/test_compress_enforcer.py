"""MaskEnforcer and GradualPruning on a plain torch optimizer (the DeepSpeed engines are in the slow tests)."""

import pytest
import torch
from torch import nn

from orchestrator.compress import GradualPruning, MaskEnforcer, StepEndHook, magnitude_masks, prunable_parameters


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 8, generator=generator)
        y = torch.randint(0, 3, (8,), generator=generator)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def pruned_values(params, masks) -> torch.Tensor:
    return torch.cat([params[n].detach()[~m].abs() for n, m in masks.items()])


def test_pruning_mid_training_keeps_pruned_weights_zero_under_adamw():
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    train(model, optimizer, 3)  # non-zero Adam moments on every weight
    params = prunable_parameters(model)
    masks = magnitude_masks(params, 0.5, "layer")
    MaskEnforcer(params, optimizer=optimizer).update(masks)
    before = {n: p.detach().clone() for n, p in params.items()}
    train(model, optimizer, 5, seed=1)
    assert pruned_values(params, masks).max() == 0.0
    assert all(not torch.equal(before[n][m], params[n].detach()[m]) for n, m in masks.items())  # kept ones train
    assert all(optimizer.state[params[n]]["exp_avg"][~m].abs().max() == 0 for n, m in masks.items())


def test_without_the_optimizer_adam_momentum_revives_pruned_weights():
    """Why ``optimizer=`` matters: zero gradients alone do not stop Adam's stale first moment."""
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, optimizer, 3)
    params = prunable_parameters(model)
    masks = magnitude_masks(params, 0.5, "layer")
    MaskEnforcer(params).update(masks)
    train(model, optimizer, 2, seed=1)
    assert pruned_values(params, masks).max() > 0


def test_gradient_hook_zeroes_pruned_gradients_and_remove_detaches_it():
    model = make_model()
    params = prunable_parameters(model)
    masks = magnitude_masks(params, 0.5, "layer")
    enforcer = MaskEnforcer(params)
    enforcer.update(masks)
    model(torch.randn(4, 8)).sum().backward()
    assert all(params[n].grad[~m].abs().max() == 0 and params[n].grad[m].abs().max() > 0 for n, m in masks.items())
    enforcer.remove()
    model.zero_grad()
    model(torch.randn(4, 8)).sum().backward()
    assert any(params[n].grad[~m].abs().max() > 0 for n, m in masks.items())


def test_update_validates_names_and_shapes():
    params = prunable_parameters(make_model())
    enforcer = MaskEnforcer(params)
    with pytest.raises(KeyError, match="nope"):
        enforcer.update({"nope": torch.ones(2, 2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="shape"):
        enforcer.update({"0.weight": torch.ones(2, 2, dtype=torch.bool)})


def test_zero3_partitioned_parameters_are_rejected_with_advice():
    param = nn.Parameter(torch.empty(0))
    param.ds_id, param.ds_numel = 3, 128  # what ZeRO-3 attaches to a partitioned parameter
    with pytest.raises(NotImplementedError, match=r"ZeRO stages 0-2.*trainer\.zero_stage<=2"):
        MaskEnforcer({"w": param})
    with pytest.raises(NotImplementedError, match="trainer.zero_stage<=2"):
        GradualPruning({"w": param}, final_sparsity=0.5, start_step=0, end_step=10, frequency=2)


def make_pruner(model: nn.Module, optimizer=None, scope="layer") -> GradualPruning:
    return GradualPruning(
        prunable_parameters(model), final_sparsity=0.75, start_step=2, end_step=8, frequency=2,
        initial_sparsity=0.25, scope=scope, optimizer=optimizer,
    )


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_gradual_pruning_follows_schedule_and_masks_only_grow(scope):
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    pruner = make_pruner(model, optimizer, scope)
    assert isinstance(pruner, StepEndHook)
    reported, previous = {}, None
    for step in range(1, 11):
        train(model, optimizer, 1, seed=step)
        sparsity = pruner.on_step_end(step)
        if sparsity is not None:
            reported[step] = sparsity
            masks = pruner.enforcer.masks
            if previous is not None:
                assert all((~previous[n] & masks[n]).sum() == 0 for n in masks)  # nothing revived
            previous = masks
    assert list(reported) == [2, 4, 6, 8]  # dense warm-up before start_step, then every `frequency` steps
    assert reported[2] == 0.25 and reported[8] == 0.75
    params = pruner.params
    total = sum(p.numel() for p in params.values())
    assert sum(int((p == 0).sum()) for p in params.values()) == round(0.75 * total)


def test_gradual_pruning_state_survives_restore_into_fresh_model():
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    pruner = make_pruner(model, optimizer)
    for step in range(1, 6):
        train(model, optimizer, 1, seed=step)
        pruner.on_step_end(step)
    state = pruner.state_dict()
    assert state["sparsity"] == pruner.target(5) and all(m.device.type == "cpu" for m in state["masks"].values())

    fresh = make_model(seed=123)  # dense, different weights: the masks must come from the state
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    restored = make_pruner(fresh, fresh_optimizer)
    restored.load_state_dict(state)
    assert restored.on_step_end(5) is None  # same point of the schedule: nothing to recompute
    train(fresh, fresh_optimizer, 3, seed=99)
    for name, mask in state["masks"].items():
        assert restored.params[name].detach()[~mask].abs().max() == 0
