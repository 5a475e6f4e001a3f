"""Magnitude masks, parameter selection and the sparsity table."""

import pytest
import torch
from torch import nn

from orchestrator.compress import magnitude_masks, prunable_parameters, realized_sparsity, sparsity_table


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.conv = nn.Conv1d(8, 8, 3)
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16))
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 5)


def test_default_selection_is_linear_and_conv_weights_without_head():
    assert sorted(prunable_parameters(TinyNet())) == ["body.0.weight", "body.2.weight", "conv.weight"]


def test_include_replaces_default_and_can_select_head():
    selected = prunable_parameters(TinyNet(), include=["head.weight", "body.*.weight"])
    assert sorted(selected) == ["body.0.weight", "body.2.weight", "head.weight"]


def test_exclude_wins():
    assert sorted(prunable_parameters(TinyNet(), exclude=["body.2.*", "conv.*"])) == ["body.0.weight"]


def test_tied_embedding_is_not_pruned_by_default():
    model = TinyNet()
    model.decoder = nn.Linear(8, 10, bias=False)
    model.decoder.weight = model.embed.weight  # tied, and 'decoder' is not a head name
    assert "decoder.weight" not in prunable_parameters(model)
    assert "embed.weight" in prunable_parameters(model, include=["decoder.weight"])


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_realized_sparsity_is_exact(scope, sparsity):
    torch.manual_seed(0)
    params = {"a": torch.randn(7, 13), "b": torch.randn(5, 3, 3)}
    masks = magnitude_masks(params, sparsity, scope)
    if scope == "layer":
        for name, p in params.items():
            assert int((~masks[name]).sum()) == round(sparsity * p.numel())
    else:
        assert sum(int((~m).sum()) for m in masks.values()) == round(sparsity * (91 + 45))
    assert all(m.dtype == torch.bool and m.shape == params[n].shape for n, m in masks.items())


def test_exact_count_even_with_ties():
    masks = magnitude_masks({"flat": torch.ones(10, 10)}, 0.37, "layer")
    assert int((~masks["flat"]).sum()) == 37  # a threshold on |w| would prune all or nothing


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_smallest_magnitudes_are_pruned(scope):
    torch.manual_seed(1)
    params = {"a": torch.randn(20, 20), "b": 3 * torch.randn(10, 10)}
    masks = magnitude_masks(params, 0.6, scope)
    groups = [params.keys()] if scope == "global" else [[n] for n in params]
    for names in groups:
        pruned = torch.cat([params[n][~masks[n]].abs() for n in names])
        kept = torch.cat([params[n][masks[n]].abs() for n in names])
        assert pruned.max() <= kept.min()


def test_layer_and_global_differ_when_scales_differ():
    torch.manual_seed(2)
    sign = torch.randn(30, 30).sign()
    params = {"big": sign * (1 + torch.rand(30, 30)), "small": -sign * 0.5 * torch.rand(30, 30)}
    layer = magnitude_masks(params, 0.5, "layer")
    global_ = magnitude_masks(params, 0.5, "global")
    assert (~layer["small"]).float().mean() == pytest.approx(0.5, abs=1e-3)
    assert (~global_["small"]).all()  # every small weight is below every big one
    assert global_["big"].all()


@pytest.mark.parametrize("bad", [-0.1, 1.0])
def test_bad_sparsity_names_value_and_range(bad):
    with pytest.raises(ValueError, match=rf"sparsity={bad!r}.*0 <= sparsity < 1"):
        magnitude_masks({"a": torch.randn(4, 4)}, bad, "layer")


def test_bad_scope():
    with pytest.raises(ValueError, match="scope"):
        magnitude_masks({"a": torch.randn(4, 4)}, 0.5, "per-row")


def test_sparsity_table_rows():
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2))
    with torch.no_grad():
        model[0].weight[:3].zero_()
    rows = sparsity_table(model)
    assert [r["layer"] for r in rows] == ["0.weight", "1.weight"]  # biases are not rows
    first = rows[0]
    assert first["shape"] == [6, 4] and first["numel"] == 24 and first["nonzero"] == 12
    assert first["sparsity"] == pytest.approx(0.5)
    assert realized_sparsity({"w": model[0].weight}) == pytest.approx(0.5)
