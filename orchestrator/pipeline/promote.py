"""A pipeline's promotion gate: the final model replaces the registered one only when it is good enough.

`pipeline.promote` names a registered model, an alias and gates; every gate is read from the pipeline's compression
report (`orchestrator.pipeline.report`: every stage measured the same way on the driver's CPU), so the numbers the
gate decides on are the ones the report shows:

  max_quality_drop   {vs: STAGE, metric: val_accuracy, max_drop: 0.02}: the final model's accuracy at most 2 points
                     below STAGE's (val_perplexity: at most max_drop higher; vs: null = the first stage)
  min_size_ratio     {vs: STAGE, min: 4.0}: STAGE's size / the final model's size >= 4 (vs: null = the first stage)
  min_latency_ratio  {vs: STAGE, min: 1.5}: STAGE's CPU latency / the final model's >= 1.5

All pass: a new version of `register_as` from the final stage's MLflow Model, `alias` moved to it. Any fails: nothing
is registered and the alias stays where it was; the parent run's tags and metrics (orch.promote.*, promote.*) and a
printed line say which gate failed and by how much. Either way the decision is on the pipeline's parent run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from orchestrator.config.validate import ConfigError, validate_registered_name

# the report's quality columns per task, and which way is better (+1: higher)
QUALITY_METRICS = {"classification": {"val_accuracy": 1}, "lm": {"val_perplexity": -1}}
RATIO_GATES = {"min_size_ratio": "size_bytes", "min_latency_ratio": "latency_ms"}
GATES = ("max_quality_drop", *RATIO_GATES)


@dataclass(frozen=True)
class GateResult:
    gate: str  # max_quality_drop, min_size_ratio, min_latency_ratio
    vs: str  # the stage compared with
    value: float  # the measured drop, or ratio
    limit: float  # max_drop, or min
    passed: bool
    metric: str = ""

    @property
    def margin(self) -> float:
        """How far inside the limit (> 0) or beyond it (< 0), in the gate's unit."""
        return self.limit - self.value if self.gate == "max_quality_drop" else self.value - self.limit

    def describe(self) -> str:
        if self.gate == "max_quality_drop":
            what = f"{self.metric} drop vs {self.vs} {self.value:+.4f} (allowed {self.limit:.4f})"
        else:
            what = f"{RATIO_GATES[self.gate].split('_')[0]} ratio {self.vs}/final {self.value:.3f} (min {self.limit:g})"
        verdict = "passed" if self.passed else f"FAILED by {-self.margin:.4f}"
        return f"{self.gate}: {what}: {verdict}"


def is_enabled(promote: Optional[Mapping[str, Any]]) -> bool:
    """A promotion gate is on when it names a registered model (gates without a name are refused by validation)."""
    return bool(promote and promote.get("register_as"))


def active_gates(promote: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """The gates whose threshold is set (max_drop, min): a gate left at null is not checked."""
    limits = {"max_quality_drop": "max_drop", **{name: "min" for name in RATIO_GATES}}
    return {name: promote[name] for name, limit in limits.items() if (promote.get(name) or {}).get(limit) is not None}


def validate_promote(promote: Optional[Mapping[str, Any]], tasks: Mapping[str, str], tracking: Mapping[str, Any]) -> None:
    """Before Ray starts: the gates name stages of this pipeline and metrics its report measures. `tasks`: stage
    name -> its data task, in the pipeline's order (the last is the final stage)."""
    if not promote:
        return
    gates = active_gates(promote)
    if not is_enabled(promote):
        if gates:
            raise ConfigError(
                "pipeline.promote.register_as", promote.get("register_as"),
                f"gates are set ({', '.join(gates)}) but no registered model to promote to: set the model's name",
            )
        return
    if tracking.get("register_as"):
        raise ConfigError(
            "tracking.register_as", tracking["register_as"],
            "pipeline.promote registers the final model itself (when its gates pass); set the name in "
            "pipeline.promote.register_as and leave tracking.register_as unset",
        )
    validate_registered_name("pipeline.promote.register_as", promote["register_as"], "pipeline.promote.alias", promote["alias"])
    stages = list(tasks)
    final = stages[-1]

    def check_stage(key: str, value: Optional[str]) -> None:
        if value is not None and value not in tasks:
            raise ConfigError(key, value, f"no stage of this pipeline has that name (stages: {', '.join(stages)})")

    gate = gates.get("max_quality_drop")
    if gate:
        check_stage("pipeline.promote.max_quality_drop.vs", gate["vs"])
        vs = gate["vs"] or stages[0]
        measured = set(QUALITY_METRICS[tasks[final]]) & set(QUALITY_METRICS[tasks[vs]])
        if gate["metric"] not in measured:
            raise ConfigError(
                "pipeline.promote.max_quality_drop.metric", gate["metric"],
                f"the pipeline's report measures {', '.join(sorted(measured)) or 'no common quality metric'} for "
                f"stages {vs} and {final}",
            )
        if not (math.isfinite(gate["max_drop"]) and gate["max_drop"] >= 0):
            raise ConfigError("pipeline.promote.max_quality_drop.max_drop", gate["max_drop"], "expected a finite value >= 0")
    for name in RATIO_GATES:
        gate = gates.get(name)
        if gate:
            check_stage(f"pipeline.promote.{name}.vs", gate["vs"])
            if not (math.isfinite(gate["min"]) and gate["min"] > 0):
                raise ConfigError(f"pipeline.promote.{name}.min", gate["min"], "expected a finite ratio > 0 (1.0: no worse than the stage)")


def evaluate_gates(promote: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> list[GateResult]:
    """Every configured gate on the report's rows (one per stage, in order; the last is the final model)."""
    by_stage = {row["stage"]: row for row in rows}
    final, first = rows[-1], rows[0]["stage"]
    gates = active_gates(promote)
    results = []
    gate = gates.get("max_quality_drop")
    if gate:
        metric, vs = gate["metric"], gate["vs"] or first
        sign = next(s for metrics in QUALITY_METRICS.values() for m, s in metrics.items() if m == metric)
        drop = sign * (float(by_stage[vs][metric]) - float(final[metric]))
        results.append(GateResult("max_quality_drop", vs, drop, float(gate["max_drop"]), drop <= gate["max_drop"], metric))
    for name, column in RATIO_GATES.items():
        gate = gates.get(name)
        if gate:
            vs = gate["vs"] or first
            before, after = by_stage[vs][column], final[column]
            # no CPU latency for a stage quantized for CUDA: the gate cannot pass on a ratio it cannot measure
            ratio = float(before) / float(after) if before is not None and after else math.nan
            results.append(GateResult(name, vs, ratio, float(gate["min"]), ratio >= gate["min"], column))
    return results


def promote_final(
    promote: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], tracking_uri: str, run_id: str, parent, console
) -> Optional[str]:
    """Decide, record the decision on the pipeline's `parent` run (a ParentRun), and register only when every gate
    passes. Returns the new version's URI (models:/NAME/VERSION), or None when a gate failed."""
    from orchestrator.track.mlflow_run import register_model

    results = evaluate_gates(promote, rows)
    failed = [result for result in results if not result.passed]
    for result in results:
        parent.log_metrics({f"promote.{result.gate}.value": result.value, f"promote.{result.gate}.margin": result.margin})
        parent.set_tag(f"orch.promote.{result.gate}", result.describe())
    name, alias = promote["register_as"], promote["alias"]
    if failed:
        parent.set_tag("orch.promote.status", "refused")
        parent.set_tag("orch.promote.failed", ",".join(result.gate for result in failed))
        console.print(
            f"[red]promotion refused[/red]: {name} not registered, alias {alias!r} left where it was; "
            + "; ".join(result.describe() for result in failed)
        )
        return None
    uri = register_model(tracking_uri, run_id, name, alias)
    parent.set_tag("orch.promote.status", "promoted")
    parent.set_tag("orch.promote.version", uri)
    gates = "; ".join(result.describe() for result in results) or "no gates"
    console.print(f"[green]promoted[/green] {uri}" + (f" (alias {alias})" if alias else "") + f": {gates}")
    return uri
