"""The search space as written in YAML → checked dimensions → Ray Tune domains.

A dimension is one config key with one distribution:

    trainer.optimizer.lr:     {loguniform: [1.0e-4, 3.0e-2]}
    recipe.distill.temperature: {uniform: [1.0, 8.0]}
    trainer.max_steps:        {int: [50, 200]}          # inclusive on both ends
    model.hidden_sizes:       {choice: [[32], [128, 128]]}
    trainer.zero_stage:       {grid: [0, 2]}            # every value, in every sample

Parsing is pure (no Ray import): `orch sweep` checks the whole space before anything starts, and the unit tests run
in milliseconds. `to_tune` builds the Tune objects only when the sweep runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from orchestrator.config.validate import ConfigError

RANGES = ("loguniform", "uniform", "int")
LISTS = ("choice", "grid")
FORMS = "{loguniform: [lo, hi]}, {uniform: [lo, hi]}, {int: [lo, hi]}, {choice: [a, b, ...]} or {grid: [a, b, ...]}"


@dataclass(frozen=True)
class Dimension:
    key: str  # dotted config key, e.g. trainer.optimizer.lr
    kind: str  # one of RANGES + LISTS
    values: tuple  # (lo, hi) for ranges; the options for choice/grid

    def describe(self) -> str:
        """How the dimension reads in MLflow params and the trials table: loguniform(0.0001, 0.03)."""
        return f"{self.kind}({', '.join(json.dumps(v) for v in self.values)})"

    def probes(self) -> list[Any]:
        """Values that stand for the whole dimension when checking it composes: the bounds, or every option."""
        return list(self.values)


def _number(key: str, value: Any, integer: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise ConfigError(key, value, f"expected {'an integer' if integer else 'a number'}")
    return value


def parse_dimension(key: str, spec: Any) -> Dimension:
    where = f"sweep.space.{key}"
    if not isinstance(spec, Mapping) or len(spec) != 1:
        raise ConfigError(where, spec, f"expected exactly one distribution: {FORMS}")
    [(kind, values)] = spec.items()
    if kind not in RANGES + LISTS:
        raise ConfigError(where, spec, f"unknown distribution {kind!r}; expected {FORMS}")
    if not isinstance(values, Sequence) or isinstance(values, str):
        raise ConfigError(f"{where}.{kind}", values, "expected a list")
    values = tuple(values)
    if kind in LISTS:
        if not values:
            raise ConfigError(f"{where}.{kind}", list(values), f"expected at least one value to {kind} from")
        return Dimension(key, kind, values)
    if len(values) != 2:
        raise ConfigError(f"{where}.{kind}", list(values), "expected [low, high]")
    low, high = (_number(f"{where}.{kind}", v, kind == "int") for v in values)
    if not low < high:
        raise ConfigError(f"{where}.{kind}", list(values), "expected low < high")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}.{kind}", list(values), "expected 0 < low < high (a log scale)")
    return Dimension(key, kind, (low, high))


def parse_space(space: Mapping[str, Any]) -> list[Dimension]:
    if not space:
        raise ConfigError("sweep.space", dict(space), f"expected at least one key to search, e.g. trainer.optimizer.lr: {{loguniform: [1.0e-4, 1.0e-2]}}")
    return [parse_dimension(str(key), spec) for key, spec in space.items()]


def to_tune(dimensions: Sequence[Dimension]) -> dict[str, Any]:
    """Ray Tune's param_space: key -> tune.loguniform/uniform/randint/choice/grid_search."""
    from ray import tune

    space: dict[str, Any] = {}
    for dim in dimensions:
        if dim.kind == "loguniform":
            space[dim.key] = tune.loguniform(*dim.values)
        elif dim.kind == "uniform":
            space[dim.key] = tune.uniform(*dim.values)
        elif dim.kind == "int":
            space[dim.key] = tune.randint(dim.values[0], dim.values[1] + 1)  # Tune's upper bound is exclusive
        elif dim.kind == "choice":
            space[dim.key] = tune.choice(encode_options(dim.values))
        else:
            space[dim.key] = tune.grid_search(encode_options(dim.values))
    return space


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def encode_options(values: Sequence[Any]) -> list[Any]:
    """Optuna's categorical distribution takes scalars only: a list option (model.hidden_sizes) travels as JSON."""
    return [value if _scalar(value) else json.dumps(value) for value in values]


def decode(dimensions: Sequence[Dimension], sampled: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's sampled values back in config form: key -> value (JSON-encoded options decoded)."""
    params = {}
    for dim in dimensions:
        value = sampled[dim.key]
        if dim.kind in LISTS and isinstance(value, str) and not any(isinstance(v, str) and v == value for v in dim.values):
            value = json.loads(value)
        if dim.kind == "int":
            value = int(value)
        params[dim.key] = value
    return params
