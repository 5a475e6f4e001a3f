"""The benchmark harness's pure parts: statistics, timelines, MFU arithmetic, parsing, the report writer; and the
training loop's opt-in timing and buffered MLflow logging. Timings are never asserted on."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from benchmarks import run_all, scaling, tracking_checkpoint
from benchmarks.gpu_mfu import tokens_per_s
from benchmarks.harness import Timeline, ratio, read_timeline, summarize
from benchmarks.report import markdown_rows, render
from orchestrator import timeline as orch_timeline
from orchestrator.models.sizes import parameter_count
from orchestrator.train.mfu import flops_per_sample, mfu, peak_flops_for


def test_summarize_gives_median_and_interquartile_range():
    stats = summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert stats["median"] == 3.0 and stats["q1"] == 2.0 and stats["q3"] == 4.0 and stats["iqr"] == 2.0
    assert stats["n"] == 5 and stats["min"] == 1.0 and stats["max"] == 5.0 and stats["mean"] == 3.0
    assert summarize([])["median"] is None and summarize([7.0])["iqr"] == 0.0
    assert ratio(2.0, 4.0) == 0.5 and ratio(None, 1.0) is None and ratio(1.0, 0.0) is None


def write_events(path: Path, events: list[dict]) -> None:
    path.write_text("".join(json.dumps(event) + "\n" for event in events))


def test_timeline_parts_steady_steps_and_checkpoints(tmp_path):
    path = tmp_path / "t.jsonl"
    write_events(
        path,
        [
            {"event": "ray_ready", "t": 102.0},
            {"event": "fit_start", "t": 103.0},
            {"event": "worker_start", "t": 110.0},
            {"event": "engine_ready", "t": 115.0},
            {"event": "first_step", "t": 115.5},
            {"event": "checkpoint_start", "t": 120.0, "step": 3},
            {"event": "checkpoint_saved", "t": 120.2, "step": 3},
            {"event": "checkpoint_reported", "t": 120.5, "step": 3},
            {"event": "peak_rss", "t": 121.0, "rank": 1, "bytes": 2048},
            {"event": "step_times", "t": 121.0, "first_step": 2, "durations": [0.9, 0.1, 0.2, 0.3]},
            {"event": "worker_start", "t": 130.0},  # a restarted group repeats marks: the first one counts
        ],
    )
    timeline = read_timeline(path, launched=100.0, finished=122.0)
    assert timeline.startup() == {
        "total": 15.5,
        "process_and_ray_start": 2.0,
        "driver_setup": 1.0,
        "worker_group": 7.0,
        "deepspeed_initialize": 5.0,
        "first_batch": 0.5,
    }
    assert timeline.steady(warmup=2) == [0.1, 0.2, 0.3]  # steps 3..5: the first two steps are warm-up
    assert timeline.duration_of(2) == 0.9 and timeline.duration_of(6) is None
    assert timeline.peak_rss == {1: 2048}
    assert timeline.checkpoints == [{"step": 3, "checkpoint_start": 120.0, "checkpoint_saved": 120.2, "checkpoint_reported": 120.5}]


def test_event_costs_attribute_work_after_a_step_to_the_next_step(monkeypatch):
    monkeypatch.setattr(tracking_checkpoint, "LOG_EVERY", 5)
    monkeypatch.setattr(tracking_checkpoint, "CHECKPOINT_EVERY", 10)
    durations = {step: 1.0 for step in range(2, 21)}
    for logged in (6, 16):  # after log steps 5 and 15: +0.5
        durations[logged] = 1.5
    durations[11] = 3.0  # after the checkpoint at step 10: +2
    timeline = Timeline(launched=0.0, finished=1.0, durations=[durations[s] for s in range(2, 21)], first_step=2)
    costs = tracking_checkpoint.event_costs(timeline, warmup=1, max_steps=20)
    assert costs["plain_step_median_s"] == 1.0
    assert costs["log_step_extra_s"] == pytest.approx(0.5)
    assert costs["log_share_of_step"] == pytest.approx(0.5 / 5)
    assert costs["checkpoint_extra_s"] == pytest.approx(2.0)


def test_comm_share_reads_deepspeed_wall_clock_breakdown():
    lines = "\n".join(
        f"(RayTrainWorker pid=1) time (ms) | fwd: {f} | bwd: {b} | bwd_inner: {b - a} | bwd_allreduce: {a} | step: {s}"
        for f, b, a, s in [(9.0, 9.0, 9.0, 9.0), (2.0, 6.0, 3.0, 2.0), (2.0, 6.0, 5.0, 2.0), (2.0, 6.0, 1.0, 2.0)]
    )
    # warm-up line dropped; shares 0.3, 0.5, 0.1 -> median 0.3
    assert scaling.comm_share(lines, warmup=1) == pytest.approx(0.3)
    assert scaling.comm_share("no breakdown printed", warmup=0) is None


def test_peak_flops_lookup_prefers_the_most_specific_name_and_the_override():
    assert peak_flops_for("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_for("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_for("NVIDIA A100-SXM4-40GB") == 312e12
    assert peak_flops_for("Some Future Accelerator") is None
    assert peak_flops_for("Some Future Accelerator", override_tflops=100.0) == 100e12


def test_mfu_arithmetic_from_the_models_flops():
    from orchestrator.models.gpt import GPT
    from orchestrator.models.mlp import MLP

    gpt = GPT(vocab_size=256, block_size=16, n_layer=2, n_head=2, n_embd=32)
    assert flops_per_sample(gpt, tokens_per_sample=16) == gpt.estimate_flops_per_token() * 16
    mlp = MLP(input_shape=(1, 8, 8), num_classes=10, hidden_sizes=[16])
    assert parameter_count(mlp) == 64 * 16 + 16 + 16 * 10 + 10
    assert flops_per_sample(mlp) == 6 * parameter_count(mlp)
    # 1e4 tokens/s x 1e9 FLOPs/token on 2 devices of 1e13 FLOP/s each = 50 %
    assert mfu(1e4, 1e9, num_devices=2, peak_flops_per_device=1e13) == pytest.approx(0.5)
    assert tokens_per_s(step_time_s=0.5, gpus=2, micro_batch=4, block_size=1024) == 4 * 1024 * 2 / 0.5


def test_report_renders_machine_tables_and_failures():
    assert markdown_rows([["a", "b|c"], ["1"]]) == "| a | b\\|c |\n|---|---|\n| 1 |  |\n"
    document = {
        "started": "2026-01-01 00:00:00 UTC",
        "command": "python -m benchmarks.run_all --quick",
        "quick": True,
        "elapsed_s": 12.0,
        "load_before": [1.0, 2.0, 3.0],
        "load_after": [4.0, 5.0, 6.0],
        "machine": {"cpu": "Test CPU", "cores": 2, "usable_cores": 2, "memory_gib": 24.0, "gpu": None, "python": "3.11",
                    "platform": "Linux", "versions": {"torch": "2.13.0"}},  # fmt: skip
        "benchmarks": {
            "good": {"doc": "Good.", "elapsed_s": 1.0, "load_before": [1.0], "load_after": [1.0], "result": {}},
            "bad": {"elapsed_s": 0.0, "load_before": [1.0], "load_after": [1.0], "error": "not run: x is not present"},
        },
    }
    page = render(document, {"good": [["k", "v"], ["ratio", "1.01"]]})
    assert "Test CPU — 2 cores" in page and "torch 2.13.0" in page and "before: 1.0, 2.0, 3.0" in page
    assert "| ratio | 1.01 |" in page and "**failed:** `not run: x is not present`" in page


def test_run_all_rejects_unknown_names_and_records_missing_modules(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_all.main(["--only", "no_such_benchmark", "--out", str(tmp_path)])
    assert "no_such_benchmark" in capsys.readouterr().err
    entry, table = run_all.run_one("missing", "benchmarks.no_such_module", quick=True)
    assert entry["error"] == "not run: benchmarks.no_such_module is not present" and table is None


def test_step_clock_is_silent_unless_asked_and_then_writes_every_step(tmp_path, monkeypatch):
    monkeypatch.delenv(orch_timeline.ENV, raising=False)
    clock = orch_timeline.StepClock(rank=0)
    clock.tick(1)
    clock.close()
    assert clock.stamps == []
    path = tmp_path / "timeline.jsonl"
    monkeypatch.setenv(orch_timeline.ENV, str(path))
    clock = orch_timeline.StepClock(rank=0)
    for step in range(5, 9):  # a resumed run starts mid-way
        clock.tick(step)
    clock.close()
    timeline = read_timeline(path, launched=0.0, finished=time.time())
    assert "first_step" in timeline.events and len(timeline.durations) == 3 and timeline.first_step == 6
    assert timeline.peak_rss[0] > 0
