"""precision=auto is decided on the worker: bf16 only where the hardware computes it natively."""

import torch

from orchestrator.train.engine import auto_precision_config, cpu_has_native_bf16


def cpuinfo(tmp_path, line: str):
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: test cpu\n{line}\n\nprocessor\t: 1\n{line}\n")
    return path


def test_native_bf16_read_from_cpu_flags(tmp_path):
    assert not cpu_has_native_bf16(cpuinfo(tmp_path, "flags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw"))
    assert cpu_has_native_bf16(cpuinfo(tmp_path, "flags\t\t: fpu avx2 avx512f avx512_bf16"))
    assert cpu_has_native_bf16(cpuinfo(tmp_path, "flags\t\t: fpu avx2 amx_tile amx_bf16"))
    assert cpu_has_native_bf16(cpuinfo(tmp_path, "Features\t: fp asimd bf16 i8mm"))
    assert not cpu_has_native_bf16(tmp_path / "missing")  # unknown: fp32, the safe and fast choice


def test_auto_keeps_bf16_only_on_this_machine_if_its_cpu_has_it():
    config = {"train_micro_batch_size_per_gpu": 8, "bf16": {"enabled": True}}
    resolved = auto_precision_config(config)
    if torch.cuda.is_available():
        expected_bf16 = torch.cuda.is_bf16_supported()
    else:
        expected_bf16 = cpu_has_native_bf16()
    assert ("bf16" in resolved) == expected_bf16
    assert resolved["train_micro_batch_size_per_gpu"] == 8 and config["bf16"] == {"enabled": True}  # input untouched
