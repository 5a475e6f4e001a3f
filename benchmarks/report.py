"""The benchmark report: one JSON with every figure, one markdown page with a table per benchmark and the machine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence


def markdown_rows(rows: Sequence[Sequence[str]]) -> str:
    """A markdown table; the first row is the header. Pipes inside cells are escaped."""
    if not rows:
        return ""
    cells = [[str(cell).replace("|", "\\|") for cell in row] for row in rows]
    width = max(len(row) for row in cells)
    cells = [row + [""] * (width - len(row)) for row in cells]
    lines = ["| " + " | ".join(cells[0]) + " |", "|" + "---|" * width]
    lines += ["| " + " | ".join(row) + " |" for row in cells[1:]]
    return "\n".join(lines) + "\n"


def machine_lines(machine: dict[str, Any], load_before: Sequence[float], load_after: Sequence[float]) -> list[str]:
    versions = ", ".join(f"{name} {version}" for name, version in machine["versions"].items())
    return [
        f"- CPU: {machine['cpu']} — {machine['cores']} cores ({machine['usable_cores']} usable), "
        f"{machine['memory_gib']} GiB RAM, GPU: {machine.get('gpu') or 'none'}",
        f"- Python {machine['python']}, {versions}",
        f"- {machine['platform']}",
        f"- load average (1, 5, 15 min) before: {', '.join(map(str, load_before))}; after: {', '.join(map(str, load_after))}",
    ]


def render(document: dict[str, Any], tables: dict[str, list[list[str]]]) -> str:
    lines = [f"# orchestrator benchmarks — {document['started']}", ""]
    lines += [f"Command: `{document['command']}` ({'quick' if document['quick'] else 'full'}; {document['elapsed_s']:.0f} s)", ""]
    lines += machine_lines(document["machine"], document["load_before"], document["load_after"])
    for name, entry in document["benchmarks"].items():
        lines += ["", f"## {name}", ""]
        if entry.get("doc"):
            lines += [entry["doc"], ""]
        lines.append(f"{entry['elapsed_s']:.0f} s; load average before {entry['load_before']}, after {entry['load_after']}")
        lines.append("")
        if entry.get("error"):
            lines.append(f"**failed:** `{entry['error']}`")
        elif name in tables:
            lines.append(markdown_rows(tables[name]))
    return "\n".join(lines) + "\n"


def write(document: dict[str, Any], tables: dict[str, list[list[str]]], directory: Path, stem: str) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    json_path, md_path = directory / f"{stem}.json", directory / f"{stem}.md"
    json_path.write_text(json.dumps(document, indent=2, default=str))
    md_path.write_text(render(document, tables))
    return json_path, md_path
