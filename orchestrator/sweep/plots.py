"""A sweep's overview figures: the metric against each searched key, and every trial across all keys at once.

Bare `matplotlib.figure.Figure`s, as for a run's own plots (`orchestrator.track.plots`): no pyplot registry to leak
into and no process-wide backend to switch."""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

from orchestrator.sweep.space import Dimension

STATE_MARKERS = {"completed": "o", "early_stopped": "x", "failed": "v"}


def _axis_values(dim: Dimension, values: Sequence[Any]) -> tuple[list[float], list[str] | None]:
    """Numbers to plot for a key; categorical keys (choice/grid) become option indices with their labels."""
    if dim.kind in ("choice", "grid"):
        labels = [json.dumps(v) for v in dim.values]
        return [float(labels.index(json.dumps(v))) for v in values], labels
    return [float(v) for v in values], None


def metric_vs_key(rows: Sequence[Mapping[str, Any]], dim: Dimension, metric: str):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4))
    axis = figure.subplots()
    for state, marker in STATE_MARKERS.items():
        chosen = [row for row in rows if row["state"] == state and row.get(metric) is not None]
        if chosen:
            xs, _ = _axis_values(dim, [row[dim.key] for row in chosen])
            axis.scatter(xs, [row[metric] for row in chosen], marker=marker, label=state.replace("_", " "))
    _, labels = _axis_values(dim, [])
    if labels is not None:
        axis.set_xticks(range(len(labels)), labels, fontsize=8)
    elif dim.kind == "loguniform":
        axis.set_xscale("log")
    axis.set_xlabel(dim.key)
    axis.set_ylabel(f"{metric} (last reported)")
    axis.grid(alpha=0.3)
    if axis.has_data():
        axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def parallel_coordinates(rows: Sequence[Mapping[str, Any]], dimensions: Sequence[Dimension], metric: str, mode: str):
    """One line per trial through every searched key (scaled to [0, 1]) and the metric; colour = the metric."""
    from matplotlib import cm, colors
    from matplotlib.figure import Figure

    scored = [row for row in rows if row.get(metric) is not None]
    columns, ticks = [], []
    for dim in dimensions:
        values, labels = _axis_values(dim, [row[dim.key] for row in scored])
        low, high = (0.0, max(len(labels) - 1, 1)) if labels else (float(dim.values[0]), float(dim.values[1]))
        if dim.kind == "loguniform":
            import math

            values, low, high = [math.log10(v) for v in values], math.log10(low), math.log10(high)
        columns.append([(v - low) / (high - low) if high > low else 0.5 for v in values])
        ticks.append(dim.key + (f"\n{dim.describe()}" if not labels else "\n" + " | ".join(labels)))
    metric_values = [row[metric] for row in scored]
    low, high = (min(metric_values), max(metric_values)) if metric_values else (0.0, 1.0)
    columns.append([(v - low) / (high - low) if high > low else 0.5 for v in metric_values])
    ticks.append(f"{metric}\n[{low:.4g}, {high:.4g}]")
    figure = Figure(figsize=(2.2 * len(ticks) + 1, 4.5))
    axis = figure.subplots()
    norm = colors.Normalize(low, high)
    cmap = cm.viridis if mode == "max" else cm.viridis_r
    for index, row in enumerate(scored):
        axis.plot(range(len(ticks)), [column[index] for column in columns], color=cmap(norm(row[metric])),
                  linestyle="--" if row["state"] != "completed" else "-", marker="o", alpha=0.85)
    axis.set_xticks(range(len(ticks)), ticks, fontsize=7)
    axis.set_yticks([0, 1], ["low", "high"])
    for x in range(len(ticks)):
        axis.axvline(x, color="gray", linewidth=0.5)
    figure.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=axis, label=metric)
    axis.set_title(f"{len(scored)} trials (dashed: stopped early or failed)", fontsize=9)
    figure.tight_layout()
    return figure


def metric_vs_size(rows: Sequence[Mapping[str, Any]], metric: str, dimensions: Sequence[Dimension] = ()):
    """A compression sweep's trade-off: the metric of every trial against its model's non-zero parameters.

    Each point is labelled with its searched values: trials at one sparsity share an x, and only these tell them apart.
    """
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4))
    axis = figure.subplots()
    sized = [row for row in rows if row.get("nonzero_parameters") and row.get(metric) is not None]
    axis.scatter([row["nonzero_parameters"] for row in sized], [row[metric] for row in sized])
    for row in sized:
        sparsity = row.get("final_sparsity")
        searched = ", ".join(f"{dim.key.rsplit('.', 1)[-1]}={row[dim.key]:g}" if isinstance(row[dim.key], float)
                             else f"{dim.key.rsplit('.', 1)[-1]}={row[dim.key]}" for dim in dimensions)
        label = searched or (f"{row['trial_id']}" + (f" ({sparsity:.0%} sparse)" if sparsity is not None else ""))
        axis.annotate(label, (row["nonzero_parameters"], row[metric]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    axis.margins(x=0.25)  # room for the labels of the largest model
    axis.set_xscale("log")
    axis.set_xlabel("non-zero parameters (log scale)")
    axis.set_ylabel(metric)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    return figure
