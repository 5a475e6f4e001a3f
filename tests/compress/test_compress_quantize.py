"""Dynamic int8 quantization for CPU inference."""

import pytest
import torch
from torch import nn

from orchestrator.compress import quantize_dynamic_int8, serialized_size_bytes

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


def make_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)).eval()


def test_output_close_and_checkpoint_smaller():
    model, x = make_mlp(), torch.randn(16, 64)
    quantized = quantize_dynamic_int8(model)
    with torch.no_grad():
        reference, approx = model(x), quantized(x)
    assert (approx - reference).abs().max() < 0.05 * reference.abs().max()
    assert serialized_size_bytes(quantized) < 0.4 * serialized_size_bytes(model)
    assert isinstance(model[0], nn.Linear) and type(model[0]) is nn.Linear  # original untouched


def test_skip_keeps_named_layers_float():
    quantized = quantize_dynamic_int8(make_mlp(), skip=["4"])
    assert type(quantized[4]) is nn.Linear and type(quantized[0]) is not nn.Linear
    with pytest.raises(ValueError, match="not submodules"):
        quantize_dynamic_int8(make_mlp(), skip=["nope"])
