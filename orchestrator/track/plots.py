"""Figures logged with each run (matplotlib, headless).

Built as `matplotlib.figure.Figure` objects rather than through pyplot: pyplot keeps every figure it creates until
it is closed, so a process that runs many stages (a pipeline, a sweep trial's actor, the test suite) would hold
them all; a bare Figure is freed with its last reference, and needs no backend to be chosen."""

from __future__ import annotations

from typing import Mapping, Sequence


def loss_curve(history: Mapping[str, Sequence[tuple[int, float]]], title: str):
    """Training loss and every validation metric against step; one panel for losses, one for the rest."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4))
    losses, scores = figure.subplots(1, 2)
    for key, points in history.items():
        if not points:
            continue
        steps, values = zip(*points)
        (losses if key.endswith("loss") else scores).plot(steps, values, marker="." if len(points) < 30 else None, label=key)
    for axis, label in ((losses, "loss"), (scores, "validation")):
        axis.set_xlabel("step")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        if axis.has_data():
            axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def quality_vs_size(rows: Sequence[Mapping], title: str):
    """Validation accuracy (or perplexity) of every stage against its size on disk: as saved (hollow) and gzipped
    (filled), joined by a line; unstructured sparsity shows as the distance between the two."""
    from matplotlib.figure import Figure

    quality = "val_accuracy" if "val_accuracy" in rows[0] else "val_perplexity"
    figure = Figure(figsize=(7.5, 4.5))
    axis = figure.subplots()
    for index, row in enumerate(rows):
        raw, packed, y = row["size_bytes"] / 1024, row["size_gzip_bytes"] / 1024, row[quality]
        color = f"C{index % 10}"
        axis.plot([packed, raw], [y, y], color=color, linewidth=1, alpha=0.6)
        axis.scatter([raw], [y], facecolors="none", edgecolors=color, s=45)
        axis.scatter([packed], [y], color=color, marker="s", s=45, label=f"{row['stage']} ({row['kind']})")
    axis.scatter([], [], facecolors="none", edgecolors="gray", label="hollow: torch.save size")
    axis.set_xscale("log")
    axis.set_xlabel("serialized size (KiB, log scale); square: gzip of it")
    axis.set_ylabel(quality)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    axis.set_title(title, fontsize=10)
    figure.tight_layout()
    return figure
