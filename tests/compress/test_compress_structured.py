"""Structured pruning makes the model physically smaller and keeps its output shape."""

import pytest
import torch
from torch import nn

from orchestrator.compress import count_parameters, prune_structured


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.fc = nn.Linear(32, 64)
        self.classifier = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.relu(self.fc(self.features(x))))


def make_cnn(seed: int) -> SmallCNN:
    torch.manual_seed(seed)
    return SmallCNN()


def layer_shapes(model: nn.Module) -> dict[str, tuple]:
    return {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def test_cnn_gets_smaller_and_keeps_its_classifier():
    model, x = make_cnn(0), torch.randn(2, 3, 8, 8)
    pruned = prune_structured(model, x, ratio=0.5)
    assert count_parameters(pruned) < 0.5 * count_parameters(model)
    shapes = layer_shapes(pruned)
    assert shapes["features.0"] == (8, 3, 3, 3) and shapes["features.3"] == (16, 8, 3, 3)
    assert shapes["fc"] == (32, 16) and shapes["classifier"] == (10, 32)
    assert pruned.features[1].num_features == 8 and pruned.features[1].running_mean.shape == (8,)
    out = pruned(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert layer_shapes(model)["fc"] == (64, 32)  # the original is untouched


def test_state_dict_reloads_into_freshly_pruned_structure():
    x = torch.randn(2, 3, 8, 8)
    trained = prune_structured(make_cnn(0), x, ratio=0.3)
    rebuilt = prune_structured(make_cnn(1), x, ratio=0.3)  # other weights, same shapes
    rebuilt.load_state_dict(trained.state_dict())  # strict: raises on any shape mismatch
    trained.eval(), rebuilt.eval()
    torch.testing.assert_close(rebuilt(x), trained(x))


def test_mlp_with_ignored_layer_by_name_and_last_linear_default():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(3, 12)
    pruned = prune_structured(mlp, x, ratio=0.25)  # no head-named layer: the last Linear is kept
    assert [tuple(m.weight.shape) for m in pruned if isinstance(m, nn.Linear)] == [(24, 12), (24, 24), (4, 24)]
    kept_middle = prune_structured(mlp, x, ratio=0.25, ignored_layers=["2", "4"])
    assert [m.weight.shape[0] for m in kept_middle if isinstance(m, nn.Linear)] == [24, 32, 4]
    assert torch.isfinite(kept_middle(x)).all()


def test_pruning_the_output_layer_is_refused():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 4))
    with pytest.raises(RuntimeError, match="ignored_layers"):
        prune_structured(mlp, torch.randn(3, 12), ratio=0.5, ignored_layers=[])
    with pytest.raises(ValueError, match=r"ratio=1\.0"):
        prune_structured(mlp, torch.randn(3, 12), ratio=1.0)


def test_count_parameters_counts_tied_weights_once():
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    model[1].weight = model[0].weight
    assert count_parameters(model) == 16
    model[0].weight.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == 0
