"""orch's printed tables read anywhere: whole in a log (no terminal, any width), never a cut number in a narrow terminal.

The compression report, a run's summary and a sweep's outcome are printed through one helper
(`orchestrator.track.tables.print_table`); each is rendered here to a console that is no terminal (a log file, CI,
`orch logs` of a submitted job: rich assumes 80 columns there) and to a 60-column terminal.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from orchestrator.pipeline.report import print_report
from orchestrator.plan_view import print_summary
from orchestrator.stage_runner import StageResult
from orchestrator.sweep.runner import SweepOutcome, print_outcome
from orchestrator.track.tables import print_table

RUN_ID = "0123456789abcdef0123456789abcdef"
REPORT_ROWS = [
    {"stage": "teacher", "kind": "train", "run_id": RUN_ID, "parameters": 301_052, "nonzero_parameters": 301_052,
     "sparsity": 0.0, "size_bytes": 1_210_000, "size_gzip_bytes": 1_100_000, "latency_ms": 0.352, "val_accuracy": 0.9611},
    {"stage": "student_pruned", "kind": "prune", "run_id": RUN_ID, "parameters": 9_610, "nonzero_parameters": 5_514,
     "sparsity": 0.4262, "size_bytes": 41_000, "size_gzip_bytes": 22_000, "latency_ms": 0.05, "val_accuracy": 0.9},
]
REPORT_CELLS = ["teacher", "student_pruned", "301,052", "9,610", "5,514", "0.4262", "1181.6K", "21.5K", "0.35 ms", "0.9611"]
TRIAL = {"trial_id": "444b3_00000", "run_id": RUN_ID, "state": "completed", "recipe.pruning.sparsity": 0.5,
         "recipe.distill.temperature": 2.0, "trainer.optimizer.lr": 0.003162, "val_accuracy": 0.8056, "step": 40,
         "trial_wall_s": 61.27, "nonzero_parameters": 5514, "parameters": 9610}
TRIAL_CELLS = ["444b3_00000", "completed", "recipe.pruning.sparsity", "recipe.distill.temperature", "0.003162", "0.8056",
               "61.27", "5514", "9610"]
METRICS = {"loss": 1.4465814, "val_accuracy": 0.8444, "samples_per_s": 1164.416014, "step": 3000,
           "distill_kd_loss_weighted_running_mean": 0.123456, "rank_weight_digests": [1, 2]}
METRIC_CELLS = ["1.4466", "0.8444", "1164.4160", "3000", "distill_kd_loss_weighted_running_mean", "0.1235"]

CONSOLES = {
    "log": lambda out: Console(file=out, width=80),  # what a file, a pipe or Ray's job log gets
    "log, soft wrap": lambda out: Console(file=out, width=80, soft_wrap=True),  # `orch run`'s own console
    "terminal, 60 columns": lambda out: Console(file=out, force_terminal=True, width=60, color_system=None),
}


def _render(kind: str, print_it) -> str:
    out = io.StringIO()
    print_it(CONSOLES[kind](out))
    return out.getvalue()


def _assert_whole(text: str, cells: list[str], kind: str) -> None:
    assert "…" not in text, text
    for cell in cells:
        assert cell in text, f"{cell!r} cut or missing ({kind}):\n{text}"
    if kind.startswith("terminal"):
        assert max(len(line) for line in text.splitlines()) <= 60, text


@pytest.mark.parametrize("kind", CONSOLES)
def test_the_compression_report_keeps_every_number_whole(kind):
    text = _render(kind, lambda console: print_report(REPORT_ROWS, console, "compression report · pipeline-x"))
    _assert_whole(text, REPORT_CELLS, kind)
    assert RUN_ID not in text  # in the CSV and markdown report, not on the console


@pytest.mark.parametrize("kind", CONSOLES)
def test_the_run_summary_keeps_every_number_whole(kind):
    result = StageResult("train", "train-x", RUN_ID, "1", "sqlite:///mlflow.db", dict(METRICS), "/ckpt", None)
    text = _render(kind, lambda console: print_summary([result], console))
    _assert_whole(text, METRIC_CELLS, kind)
    assert "rank_weight_digests" not in text


@pytest.mark.parametrize("kind", CONSOLES)
def test_the_sweep_outcome_keeps_every_number_whole(kind, tmp_path):
    second = {**TRIAL, "trial_id": "444b3_00001", "val_accuracy": 0.7712, "state": "early_stopped"}
    outcome = SweepOutcome("sweep-x", RUN_ID, "1", "sqlite:///x.db", [TRIAL, second], TRIAL, tmp_path, "orch run ...")
    text = _render(kind, lambda console: print_outcome(outcome, "val_accuracy", console))
    _assert_whole(text, TRIAL_CELLS + ["444b3_00001", "0.7712", "early_stopped"], kind)


def test_a_log_prints_at_full_width_and_leaves_the_console_as_it_was():
    out = io.StringIO()
    console = Console(file=out, width=80)
    headers = [f"column_{i}" for i in range(12)]
    print_table(console, headers, [[f"{i * 1000:,}" for i in range(12)]])
    lines = out.getvalue().splitlines()
    assert max(len(line) for line in lines) > 80 and "11,000" in out.getvalue()
    assert console.width == 80


def test_a_narrow_terminal_wraps_headers_before_giving_up_the_table():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=60, color_system=None)
    print_table(console, ["recipe.pruning.sparsity", "latency/batch"], [["0.5", "0.35 ms"]], right=["latency/batch"])
    text = out.getvalue()
    assert "┃" in text and "recipe." in text and "sparsity" in text and "0.35 ms" in text  # still a table
    wide = io.StringIO()
    print_table(Console(file=wide, force_terminal=True, width=60, color_system=None),
                [f"h{i}" for i in range(8)], [[f"{10 ** 8 + i:,}" for i in range(8)]])
    assert "┃" not in wide.getvalue() and "h7  100,000,007" in wide.getvalue()  # one `header  value` line per cell


def test_the_report_is_still_logged_as_markdown_and_csv(tmp_path: Path):
    from orchestrator.track.tables import csv_table, markdown_table

    assert "301052" in csv_table(REPORT_ROWS) and "| teacher | train |" in markdown_table(REPORT_ROWS)
