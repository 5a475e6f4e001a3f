"""torchao quantization: every CPU method on an MLP, the built-in GPT and Hugging Face GPT-2 (Conv1D) / Llama;
a saved quantized model reloads (weights_only) to the very outputs it had before saving."""

import pytest
import torch
import yaml
from safetensors.torch import save_model
from torch import nn

from orchestrator.artifacts.export import QUANTIZED_FILE, load_exported, mark_quantized
from orchestrator.compress.quantize import (
    load_quantized,
    method_device_problem,
    quantize_dynamic_int8,
    quantize_model,
    save_quantized,
    serialized_size_bytes,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

CPU_METHODS = ["int8_dynamic", "int8_weight_only"]
GPT_CFG = {"_target_": "orchestrator.models.gpt.GPT", "vocab_size": 64, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 64}
HF_GPT2_CFG = {"_target_": "orchestrator.models.hf_causal_lm.HFCausalLM", "model_type": "gpt2", "vocab_size": 64,
               "block_size": 16, "config": {"n_layer": 2, "n_head": 2, "n_embd": 64, "bos_token_id": None, "eos_token_id": None}}
HF_LLAMA_CFG = {"_target_": "orchestrator.models.hf_causal_lm.HFCausalLM", "model_type": "llama", "vocab_size": 64,
                "block_size": 16, "config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                             "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 32}}


def make_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)).eval()


def build(cfg: dict) -> nn.Module:
    from hydra.utils import instantiate

    torch.manual_seed(0)
    return instantiate(cfg).eval()


@pytest.mark.parametrize("method", CPU_METHODS)
def test_output_close_and_checkpoint_smaller(method):
    model, x = make_mlp(), torch.randn(16, 64)
    quantized = quantize_model(model, method)
    with torch.no_grad():
        reference, approx = model(x), quantized(x)
    assert (approx - reference).abs().max() < 0.05 * reference.abs().max()
    assert serialized_size_bytes(quantized) < 0.4 * serialized_size_bytes(model)
    assert type(model[0].weight) is nn.Parameter and model[0].weight.dtype == torch.float32  # original untouched
    assert type(quantized[0].weight).__module__.startswith("torchao")


def test_skip_keeps_named_layers_float():
    quantized = quantize_dynamic_int8(make_mlp(), skip=["4"])
    assert quantized[4].weight.dtype == torch.float32 and type(quantized[0].weight).__module__.startswith("torchao")
    with pytest.raises(ValueError, match="not submodules"):
        quantize_dynamic_int8(make_mlp(), skip=["nope"])


def test_cuda_only_methods_name_the_device():
    assert method_device_problem("int8_weight_only", "cpu") is None
    for method in ("int4_weight_only", "fp8"):
        assert "CUDA only" in method_device_problem(method, "cpu")
        with pytest.raises(ValueError, match=f"{method}.*the device is cpu"):
            quantize_model(make_mlp(), method, device="cpu")


@pytest.mark.parametrize("cfg", [GPT_CFG, HF_GPT2_CFG, HF_LLAMA_CFG], ids=["gpt", "hf_gpt2", "hf_llama"])
@pytest.mark.parametrize("method", CPU_METHODS)
def test_language_models_quantize_and_reload_to_the_same_outputs(tmp_path, cfg, method):
    """Export folder as recipe=quantize leaves it: fp32 safetensors + model.yaml + quantized.pt + quantization.yaml.
    `load_exported` returns exactly the pre-save quantized model (read with weights_only=True)."""
    model = build(cfg)
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    quantized = quantize_model(model, method)
    linears = [m for m in quantized.modules() if isinstance(m, nn.Linear)]
    assert sum(type(m.weight).__module__.startswith("torchao") for m in linears) >= 8  # GPT-2's Conv1D included
    with torch.no_grad():
        before, reference = quantized(tokens), model(tokens)
    assert (before - reference).abs().max() < 0.1 * reference.abs().max()
    save_model(model, str(tmp_path / "model.safetensors"))
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(cfg))
    save_quantized(quantized, tmp_path / QUANTIZED_FILE)
    mark_quantized(tmp_path, [], method)
    again = load_exported(tmp_path, allowed=[cfg["_target_"]])
    with torch.no_grad():
        assert torch.equal(again(tokens), before)
    assert torch.equal(load_quantized(model, method, [], tmp_path / QUANTIZED_FILE)(tokens), before)
    assert serialized_size_bytes(again) < serialized_size_bytes(model)


def test_a_quantized_file_is_read_as_weights_only(tmp_path):
    """No pickle: the file holds torchao tensors only, which weights_only accepts; a foreign object is refused."""
    save_quantized(quantize_model(make_mlp(), "int8_weight_only"), tmp_path / "q.pt")
    torch.load(tmp_path / "q.pt", weights_only=True)
    torch.save({"x": make_mlp()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        load_quantized(make_mlp(), "int8_weight_only", [], tmp_path / "evil.pt")
