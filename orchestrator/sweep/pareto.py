"""A multi-objective sweep's outcome: the Pareto front of its finished trials, and the files that show it.

With `sweep.objectives` there is no single best trial: a smaller model that is less accurate is not worse than a
larger, more accurate one, only different. The front is the set of trials no other trial beats on every objective
at once (at least as good on all, better on one); what a user picks from it is a trade-off, so the sweep's parent run
holds the whole front (table, plot, each front trial's config) instead of one best.yaml.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import yaml

ObjectiveModes = Mapping[str, str]  # metric -> "max" | "min"


def _dominates(a: Mapping[str, Any], b: Mapping[str, Any], objectives: ObjectiveModes) -> bool:
    """Whether `a` is at least as good as `b` on every objective and strictly better on one."""
    better = False
    for metric, mode in objectives.items():
        x, y = (a[metric], b[metric]) if mode == "max" else (-a[metric], -b[metric])
        if x < y:
            return False
        better = better or x > y
    return better


def pareto_front(rows: Sequence[Mapping[str, Any]], objectives: ObjectiveModes) -> list[Mapping[str, Any]]:
    """The rows (completed trials with a value for every objective) that no other such row dominates, in input
    order. Trials with identical values are all on the front: neither beats the other."""
    scored = [row for row in rows if row.get("state", "completed") == "completed"
              and all(row.get(metric) is not None for metric in objectives)]
    return [row for row in scored if not any(_dominates(other, row, objectives) for other in scored if other is not row)]


def front_table(front: Sequence[Mapping[str, Any]], objectives: ObjectiveModes, keys: Sequence[str]) -> list[dict[str, Any]]:
    """The front as table rows: trial, run, every objective, every searched key."""
    return [{"trial_id": row["trial_id"], "run_id": row.get("run_id"), **{m: row[m] for m in objectives},
             **{key: row.get(key) for key in keys}} for row in front]


def front_yaml(entries: Sequence[Mapping[str, Any]], objectives: ObjectiveModes, sweep_run: str) -> str:
    """pareto_front.yaml: the objectives and, per front trial, its values, searched params and the `orch run`
    overrides that train that configuration again (data only: values, never code)."""
    header = (f"# Pareto front of sweep {sweep_run}: trials no other trial beats on every objective at once.\n"
              "# Train one again: orch run <its overrides, space-separated>; a pipeline trial's stage_overrides go at\n"
              "# the end of those stages' overrides in its conf/pipeline/<name>.yaml\n")
    body = {"objectives": dict(objectives), "front": [dict(entry) for entry in entries]}
    return header + yaml.safe_dump(body, sort_keys=False)


def pareto_plot(rows: Sequence[Mapping[str, Any]], front: Sequence[Mapping[str, Any]], objectives: ObjectiveModes):
    """The first two objectives of every completed trial, the front highlighted and joined in order."""
    from matplotlib.figure import Figure

    (x_key, x_mode), (y_key, y_mode) = list(objectives.items())[:2]
    figure = Figure(figsize=(6, 4.5))
    axis = figure.subplots()
    scored = [row for row in rows if row.get(x_key) is not None and row.get(y_key) is not None]
    on_front = {id(row) for row in front}
    others = [row for row in scored if id(row) not in on_front]
    axis.scatter([r[x_key] for r in others], [r[y_key] for r in others], color="gray", alpha=0.6, label="dominated")
    ordered = sorted(front, key=lambda r: r[x_key])
    axis.plot([r[x_key] for r in ordered], [r[y_key] for r in ordered], color="tab:red", marker="o", label="Pareto front")
    for row in scored:
        axis.annotate(str(row["trial_id"]), (row[x_key], row[y_key]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    axis.set_xlabel(f"{x_key} ({x_mode})")
    axis.set_ylabel(f"{y_key} ({y_mode})")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    axis.set_title(f"{len(front)} of {len(scored)} trials on the front", fontsize=9)
    figure.tight_layout()
    return figure
