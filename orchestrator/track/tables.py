"""Rows of dicts written as CSV and markdown: the sparsity table of a stage and the compression report."""

from __future__ import annotations

import csv
import io
from typing import Any, Mapping, Sequence


def format_cell(value: Any) -> str:
    """One table cell, the same in every table orch prints or logs: 4 significant digits, shapes as AxB."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "x".join(str(v) for v in value)
    return "" if value is None else str(value)


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return ""
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(format_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def csv_table(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return ""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows({key: format_cell(value) if isinstance(value, (list, tuple)) else value for key, value in row.items()} for row in rows)
    return out.getvalue()
