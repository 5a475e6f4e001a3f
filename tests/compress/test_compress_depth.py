"""Depth pruning: block influence ranks an identity-like block last; the smaller model is rebuilt from its config."""

import pytest
import torch
from hydra.utils import instantiate

from orchestrator.compress.depth import block_influence, drop_blocks
from orchestrator.models.hf_causal_lm import hf_model_config

GPT_CFG = {"_target_": "orchestrator.models.gpt.GPT", "vocab_size": 64, "block_size": 16, "n_layer": 3, "n_head": 2,
           "n_embd": 32, "mlp_hidden": [64, 96, 128]}
HF = {"_target_": "orchestrator.models.hf_causal_lm.HFCausalLM", "vocab_size": 64, "block_size": 16}
HF_GPT2 = {**HF, "model_type": "gpt2", "config": {"n_layer": 3, "n_head": 2, "n_embd": 32, "bos_token_id": None, "eos_token_id": None}}
HF_LLAMA = {**HF, "model_type": "llama", "config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
                                                   "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16}}
TOKENS = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))


def blocks_of(model):
    return model.blocks if hasattr(model, "blocks") else (
        model.hf.transformer.h if model.hf.config.model_type == "gpt2" else model.hf.model.layers)


def make_identity(block) -> None:
    """Zero every residual write of the block (attention and MLP output projections): output == input."""
    with torch.no_grad():
        for name, param in block.named_parameters():
            if any(key in name for key in ("attn.proj", "attn.c_proj", "o_proj", "mlp.2", "mlp.c_proj", "down_proj")):
                param.zero_()


@pytest.mark.parametrize("cfg", [GPT_CFG, HF_GPT2, HF_LLAMA], ids=["gpt", "hf_gpt2", "hf_llama"])
def test_the_identity_like_block_is_dropped_and_outputs_stay_the_same(cfg):
    torch.manual_seed(0)
    model = instantiate(cfg).eval()
    make_identity(blocks_of(model)[1])
    influence = block_influence(model, [TOKENS[:2], TOKENS[2:]])
    assert influence.shape == (3,) and influence[1] < 1e-6 < influence[0] and influence[2] > 1e-6
    smaller, spec = drop_blocks(model, cfg, 1, [TOKENS])
    assert len(blocks_of(smaller)) == 2
    with torch.no_grad():
        torch.testing.assert_close(smaller.eval()(TOKENS), model(TOKENS))  # block 1 did nothing: same model
    rebuilt = instantiate(spec)  # the exported config alone rebuilds the architecture; the weights then load strictly
    rebuilt.load_state_dict(smaller.state_dict(), strict=True)
    if cfg is GPT_CFG:
        assert spec["n_layer"] == 2 and spec["mlp_hidden"] == [64, 128]
    else:
        key = "n_layer" if cfg is HF_GPT2 else "num_hidden_layers"
        assert spec["config"][key] == 2 and spec == hf_model_config(smaller)
    assert len(blocks_of(model)) == 3  # the input model is untouched


def test_drop_blocks_needs_a_block_left():
    model = instantiate(GPT_CFG)
    with pytest.raises(ValueError, match="recipe.structured.drop_blocks=3: expected 0 < drop_blocks < 3"):
        drop_blocks(model, GPT_CFG, 3, [TOKENS])
