"""Calibration-aware (wanda) and N:M pruning, on pure tensors and tiny models: GPT-2's Conv1D included."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from orchestrator.compress import masks_from_scores, prunable_parameters
from orchestrator.compress.n_m_sparsity import n_m_masks, parse_pattern
from orchestrator.compress.wanda import input_feature_norms, wanda_scores, weight_input_dims
from orchestrator.train.compression import pruning_hook

PRUNING = {"schedule": "one_shot", "method": "magnitude", "pattern": "unstructured", "sparsity": 0.5, "scope": "layer",
           "include": None, "exclude": [], "initial_sparsity": 0.0, "start_fraction": 0.0, "end_fraction": 0.5,
           "updates": 2, "calibration_batches": 2}


def test_wanda_ranking_differs_from_magnitude_when_one_input_is_loud():
    """Input 0 carries 100x larger activations: wanda keeps its small weights, magnitude prunes them."""
    layer = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.1, 1.0, 1.0, 1.0], [0.1, 1.0, 1.0, 1.0]]))
    model = nn.Sequential(layer)
    x = torch.ones(8, 4)
    x[:, 0] = 100.0
    params = prunable_parameters(model)
    norms = input_feature_norms(model, params, [x])
    assert torch.allclose(norms["0.weight"], torch.tensor([100.0, 1, 1, 1]) * 8 ** 0.5)
    magnitude = masks_from_scores({k: p.abs() for k, p in params.items()}, 0.25, "layer")["0.weight"]
    wanda = masks_from_scores(wanda_scores(params, norms, weight_input_dims(model, params)), 0.25, "layer")["0.weight"]
    assert not magnitude[:, 0].any() and wanda[:, 0].all()


def test_two_four_mask_keeps_exactly_two_of_every_four_along_the_input():
    torch.manual_seed(0)
    scores = {"w": torch.rand(8, 16)}
    keep = n_m_masks(scores, 2, 4, {"w": 1})["w"]
    assert keep.shape == (8, 16) and (keep.view(8, 4, 4).sum(-1) == 2).all()
    # the kept two are the largest of their group
    groups = scores["w"].view(8, 4, 4)
    assert torch.equal(keep.view(8, 4, 4), groups >= groups.topk(2, dim=-1).values[..., -1:])
    # Conv1D weight is [in, out]: the groups run along dim 0
    keep_t = n_m_masks({"w": scores["w"].t()}, 2, 4, {"w": 0})["w"]
    assert torch.equal(keep_t, keep.t())
    with pytest.raises(ValueError, match="input dimension 6, not a multiple of 4"):
        n_m_masks({"w": torch.rand(3, 6)}, 2, 4, {"w": 1})
    assert parse_pattern("unstructured") is None and parse_pattern("1:8") == (1, 8)
    with pytest.raises(ValueError, match="recipe.pruning.pattern='4:2'"):
        parse_pattern("4:2")


def tiny_gpt2() -> nn.Module:
    from orchestrator.models.hf_causal_lm import HFCausalLM

    torch.manual_seed(0)
    return HFCausalLM(model_type="gpt2", vocab_size=64, block_size=16,
                      config={"n_layer": 2, "n_head": 2, "n_embd": 32, "bos_token_id": None, "eos_token_id": None})


def test_gpt2_conv1d_layers_are_pruned_with_wanda_two_four():
    model = tiny_gpt2()
    params = prunable_parameters(model)
    conv1d = {n for n, _ in model.named_modules() if isinstance(_, Conv1D)}
    assert len(conv1d) == 8 and {name.rpartition(".")[0] for name in params} == conv1d  # head/embeddings stay dense
    tokens = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    norms = input_feature_norms(model, params, [tokens[:2], tokens[2:]])
    hook = pruning_hook(model, {**PRUNING, "method": "wanda", "pattern": "2:4"}, 10, None, input_norms=norms)
    for name, weight in params.items():  # [in, out]: every 4 consecutive inputs of an output keep 2
        nonzero = (weight.detach() != 0).t().reshape(weight.shape[1], -1, 4).sum(-1)
        assert (nonzero == 2).all(), name
    assert hook.sparsity == pytest.approx(0.5)
    hook.remove()


def test_gradual_n_m_reaches_the_pattern_and_masks_only_grow():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    pruning = {**PRUNING, "schedule": "gradual", "pattern": "1:4", "include": ["*.weight"], "end_fraction": 0.5}
    hook = pruning_hook(model, pruning, 10, None)
    seen = []
    for step in range(1, 11):
        if hook.on_step_end(step) is not None:
            seen.append({n: (p != 0).clone() for n, p in hook.params.items()})
    assert len(seen) >= 2
    for before, after in zip(seen, seen[1:]):
        assert all(not (after[n] & ~before[n]).any() for n in before)
    final = {n: (p.detach() != 0) for n, p in hook.params.items()}
    assert all((mask.reshape(-1, 4).sum(-1) == 1).all() for mask in final.values())
    hook.remove()


def test_wanda_without_calibration_is_refused():
    with pytest.raises(ValueError, match="method=wanda needs calibration"):
        pruning_hook(nn.Sequential(nn.Linear(4, 4)), {**PRUNING, "method": "wanda", "include": ["*.weight"]}, 10, None)
