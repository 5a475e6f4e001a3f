"""benchmarks.gpu_check where it cannot run: without CUDA it prints one JSON object saying so and exits 0, and the
memory benchmark's table reads its result. (The GPU path itself runs on a GPU machine: python -m benchmarks.gpu_check.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks import gpu_check, memory_plan

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_without_cuda_says_so_in_one_json_object_and_exits_0():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    document = json.loads(done.stdout)
    assert document["cuda"] is False and document["ok"] is True and "no CUDA" in document["skipped"]


def test_gpu_check_runs_three_configurations_on_a_125m_gpt():
    runs = gpu_check.configurations()
    assert len(runs) == 3 and any("trainer.precision=fp16" in o for o in runs.values())
    assert ["trainer.zero_stage=2", "trainer.precision=bf16"] in runs.values()
    assert any("trainer.zero_stage=3" in o for o in runs.values())
    assert 120e6 < 6 * gpu_check.SHAPE["n_layer"] * 2 * gpu_check.SHAPE["n_embd"] ** 2 < 130e6  # ~125 M parameters
    assert gpu_check.flops_per_token() > 6 * 120e6


def test_memory_plan_table_reports_every_row_and_the_zero3_ratio():
    entry = {"predicted_bytes": 2**30, "measured_peak_bytes": 2**30 + 2**28, "measured_over_predicted": 1.25}
    rows = memory_plan.table({"settings": {}, "zero0_ckptoff": entry, "zero3_ckptoff": {**entry, "measured_peak_bytes": None,
                                                                                         "measured_over_predicted": None},
                              "zero3_over_zero0_peak": None})
    assert rows[1] == ["zero0_ckptoff", "1024", "1280", "1.25"]
    assert rows[2][2] == "failed" and rows[-1][0].startswith("ZeRO-3 / ZeRO-0")
