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
