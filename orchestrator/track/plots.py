"""Figures logged with each run (matplotlib, headless)."""

from __future__ import annotations

from typing import Mapping, Sequence


def loss_curve(history: Mapping[str, Sequence[tuple[int, float]]], title: str):
    """Training loss and every validation metric against step; one panel for losses, one for the rest."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, (losses, scores) = plt.subplots(1, 2, figsize=(10, 4))
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
    """Validation accuracy (or perplexity) of every stage against its size on disk, raw and gzip-compressed."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    quality = "val_accuracy" if "val_accuracy" in rows[0] else "val_perplexity"
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for size_key, marker, label in (("size_bytes", "o", "torch.save"), ("size_gzip_bytes", "s", "gzip of it")):
        xs = [row[size_key] / 1024 for row in rows]
        ys = [row[quality] for row in rows]
        axis.scatter(xs, ys, marker=marker, label=label, facecolors="none" if marker == "o" else None)
        if size_key == "size_gzip_bytes":
            for row, x, y in zip(rows, xs, ys):
                axis.annotate(row["stage"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axis.set_xscale("log")
    axis.set_xlabel("serialized size (KiB, log scale)")
    axis.set_ylabel(quality)
    axis.grid(alpha=0.3)
    axis.legend()
    axis.set_title(title)
    figure.tight_layout()
    return figure
