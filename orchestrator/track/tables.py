"""Tables orch writes and prints: rows of dicts as CSV and markdown (the sparsity table of a stage, the compression
report, a sweep's trials), and `print_table`, which prints any of orch's tables with rich so that it reads anywhere.
"""

from __future__ import annotations

import csv
import io
import re
from typing import TYPE_CHECKING, Any, Collection, Mapping, Optional, Sequence

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table


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


def print_table(
    console: "Console",
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    title: Optional[str] = None,
    right: Collection[str] = (),
    row_styles: Optional[Sequence[Optional[str]]] = None,
    show_header: bool = True,
) -> None:
    """Print a table of ready-made cells whole, wherever the console writes.

    No terminal (a log file, CI, `orch logs` of a submitted job): every column at its full width, however wide; such
    a console assumes 80 columns and rich would cut cells to "teach…" or "301,0…" to fit them. A terminal: the table
    as is when it fits; else with headers wrapped; else one block of `header  value` lines per row. A cell is never
    cut. `right`: the headers of right-aligned (numeric) columns.
    """
    styles = list(row_styles or [None] * len(rows))
    table = _table(headers, rows, title, right, styles, show_header)
    if not console.is_terminal:
        _print_at_width(console, table, max(_natural_width(console, table), console.width))
        return
    if _natural_width(console, table) > console.width:
        table = _table(headers, rows, title, right, styles, show_header, wrap_headers=True)
        if _natural_width(console, table) > console.width:
            _print_records(console, headers if show_header else None, rows, title, styles)
            return
    console.print(table)


def _table(headers, rows, title, right, styles, show_header, wrap_headers: bool = False) -> "Table":
    from rich.cells import cell_len
    from rich.table import Table

    table = Table(title=title, show_header=show_header)
    for index, header in enumerate(headers):
        justify = "right" if header in right else "left"
        if wrap_headers:
            # each column as wide as its widest cell: headers break after a space, / _ . or -, cells never do
            pieces = _header_pieces(header)
            width = max([cell_len(row[index]) for row in rows] + [cell_len(piece.rstrip()) for piece in pieces])
            table.add_column(_wrap_pieces(pieces, width), justify=justify, width=width, no_wrap=True)
        else:
            table.add_column(header, justify=justify, no_wrap=True)
    for row, style in zip(rows, styles):
        table.add_row(*row, style=style)
    return table


def _header_pieces(header: str) -> list[str]:
    """"recipe.pruning.sparsity" -> ["recipe.", "pruning.", "sparsity"]: where a header may break."""
    return re.findall(r"[^/_.\-\s]*[/_.\-\s]+|[^/_.\-\s]+$", header) or [header]


def _wrap_pieces(pieces: Sequence[str], width: int) -> str:
    from rich.cells import cell_len

    lines = [""]
    for piece in pieces:
        if lines[-1] and cell_len((lines[-1] + piece).rstrip()) > width:
            lines.append("")
        lines[-1] += piece
    return "\n".join(line.rstrip() for line in lines)


def _natural_width(console: "Console", table: "Table") -> int:
    from rich.measure import Measurement

    return Measurement.get(console, console.options.update_width(100_000), table).maximum


def _print_at_width(console: "Console", table: "Table", width: int) -> None:
    # Console.print(width=) cannot exceed the console's width: widen the console for this one table
    saved = console.size
    console.size = (width, saved.height)
    try:
        console.print(table, crop=False)
    finally:
        console.size = saved


def _print_records(console: "Console", headers, rows, title, styles) -> None:
    """A terminal too narrow for the table: each row as `header  value` lines (a table without headers: its rows
    without borders), long values wrapped onto more lines."""
    from rich.table import Table

    if title:
        console.print(title, style="italic", highlight=False)
    if headers is None:
        grid = Table.grid(padding=(0, 2))
        for index in range(len(rows[0]) if rows else 0):
            grid.add_column(no_wrap=index == 0, overflow="fold")
        for row, style in zip(rows, styles):
            grid.add_row(*row, style=style)
        console.print(grid)
        return
    for row, style in zip(rows, styles):
        record = Table.grid(padding=(0, 2))
        record.add_column(style="bold", no_wrap=True)
        record.add_column(overflow="fold")
        for header, cell in zip(headers, row):
            record.add_row(header, cell, style=style)
        console.print(record)
        console.print()
