"""One smoke run of the benchmark plumbing on its cheapest item: the plain PyTorch baseline (c) of step_overhead,
end to end through run_all (process launch, timeline, statistics, JSON and markdown). No Ray; a few seconds."""

from __future__ import annotations

import json

from benchmarks import run_all, step_overhead
from benchmarks.harness import plain_command


def test_run_all_writes_figures_for_the_plain_baseline(tmp_path, monkeypatch):
    monkeypatch.setattr(step_overhead, "commands", lambda model, workers, steps: {"c_plain_torch": plain_command(model, 1, steps)})
    monkeypatch.setattr(step_overhead, "QUICK", {"repeats": 1, "workers": [1], "steps": {"mlp": 12, "gpt": 8}, "warmup": {"mlp": 3, "gpt": 2}})
    document = run_all.main(["--quick", "--only", "step_overhead", "--out", str(tmp_path)])
    result = document["benchmarks"]["step_overhead"]["result"]
    for case, steps, warmup in (("mlp_w1", 12, 3), ("gpt_w1", 8, 2)):
        plain = result[case]["c_plain_torch"]
        assert plain["failed_runs"] == 0 and plain["step_time_median_s"] > 0
        assert 0 < plain["cpu_time_median_s"] < 10 * plain["step_time_median_s"]  # CPU time per step, recorded
        assert len(plain["run_medians_s"]) == 1
        assert result[case]["ratios"]["a/b_median"] is None  # (a) and (b) were not run
        assert result[case]["ratios"]["a/b_paired"] is None and result[case]["ratios"]["a/b_paired_runs"] == []
    assert "tokens_per_s" in result["gpt_w1"]["c_plain_torch"]
    [json_file] = tmp_path.glob("*.json")
    [md_file] = tmp_path.glob("*.md")
    assert json.loads(json_file.read_text())["machine"]["cores"] >= 1
    assert "## step_overhead" in md_file.read_text() and "load average" in md_file.read_text()


def test_paired_ratios_compare_runs_of_the_same_repeat_and_skip_repeats_missing_a_way():
    per_repeat = [{"a": 2.0, "b": 1.0}, {"a": 3.0}, {"a": 1.0, "b": 4.0}]
    assert step_overhead.paired_ratios(per_repeat, "a", "b") == [2.0, 0.25]
