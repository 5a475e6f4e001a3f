"""Structured pruning makes the model physically smaller and keeps its output shape."""

import pytest
import torch
from torch import nn

from orchestrator.compress import count_parameters, prune_structured, pruned_model_config


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


# --- attention heads of the built-in GPT ---

GPT_CFG = {"_target_": "orchestrator.models.gpt.GPT", "vocab_size": 50, "block_size": 16, "n_layer": 2, "n_head": 4, "n_embd": 32}


def make_gpt_with_dead_units(seed: int = 0):
    """A GPT in which one head per layer and a quarter of each MLP's hidden units contribute exactly nothing
    (their weights are zero): removing exactly those must leave every logit unchanged, while removing any live
    head, or the wrong rows/columns of a coupled layer, changes them."""
    from orchestrator.models.gpt import GPT

    torch.manual_seed(seed)
    model = GPT(**{k: v for k, v in GPT_CFG.items() if k != "_target_"})
    with torch.no_grad():
        for layer, head in ((0, 2), (1, 0)):
            attn = model.blocks[layer].attn
            dim, width = attn.head_dim, attn.n_head * attn.head_dim
            for part in range(3):  # q, k, v rows of the head
                rows = slice(part * width + head * dim, part * width + (head + 1) * dim)
                attn.qkv.weight[rows] = 0
                attn.qkv.bias[rows] = 0
            attn.proj.weight[:, head * dim : (head + 1) * dim] = 0
            mlp, dead = model.blocks[layer].mlp, torch.arange(layer, 128, 4)
            mlp[0].weight[dead], mlp[0].bias[dead], mlp[2].weight[:, dead] = 0, 0, 0
    return model.eval()


def test_gpt_loses_whole_heads_and_mlp_units_and_the_right_ones():
    model, tokens = make_gpt_with_dead_units(), torch.randint(0, 50, (2, 16))
    reference = model(tokens)
    pruned = prune_structured(model, tokens, ratio=0.25).eval()
    for block in pruned.blocks:
        assert block.attn.n_head == 3 and block.attn.head_dim == 8
        assert tuple(block.attn.qkv.weight.shape) == (72, 32) and tuple(block.attn.proj.weight.shape) == (32, 24)
        assert tuple(block.mlp[0].weight.shape) == (96, 32) and tuple(block.mlp[2].weight.shape) == (32, 96)
    assert pruned.tok_emb.weight.shape == (50, 32) and pruned.lm_head.weight is pruned.tok_emb.weight
    torch.testing.assert_close(pruned(tokens), reference, rtol=0, atol=1e-6)
    assert model.blocks[0].attn.n_head == 4  # the original is untouched


def test_pruned_gpt_rebuilds_from_its_config_with_the_analytic_parameter_count():
    from hydra.utils import instantiate

    from orchestrator.models.sizes import count_parameters as analytic_count

    model, tokens = make_gpt_with_dead_units(), torch.randint(0, 50, (2, 16))
    pruned = prune_structured(model, tokens, ratio=0.25).eval()
    config = pruned_model_config(GPT_CFG, pruned)
    assert config["n_heads"] == [3, 3] and config["mlp_hidden"] == [96, 96] and config["head_dim"] == 8
    rebuilt = instantiate(config).eval()
    rebuilt.load_state_dict(pruned.state_dict())  # strict: every shape must match
    torch.testing.assert_close(rebuilt(tokens), model(tokens), rtol=0, atol=1e-6)
    assert analytic_count(config) == count_parameters(rebuilt) < count_parameters(model)


def test_gpt_head_ratio_that_would_remove_every_head_is_refused():
    model, tokens = make_gpt_with_dead_units(), torch.randint(0, 50, (2, 16))
    with pytest.raises(ValueError, match=r"ratio=0\.8 would remove all 4 heads of blocks\.0\.attn"):
        prune_structured(model, tokens, ratio=0.8)
