"""The search space as written in YAML → checked dimensions → Ray Tune domains.

A dimension is one config key with one distribution:

    trainer.optimizer.lr:     {loguniform: [1.0e-4, 3.0e-2]}
    recipe.distill.temperature: {uniform: [1.0, 8.0]}
    trainer.max_steps:        {int: [50, 200]}          # inclusive on both ends
    model.hidden_sizes:       {choice: [[32], [128, 128]]}
    trainer.zero_stage:       {grid: [0, 2]}            # every value, in every sample

A key set to null is not searched, so Hydra's own `'sweep.space={model.hidden_sizes: null}'` drops a dimension.
From the command line, one dimension is edited with `sweep.space.KEY=DIST` / `~sweep.space.KEY` (`SpaceEdit`).

Parsing is pure (no Ray import): `orch sweep` checks the whole space before anything starts, and the unit tests run
in milliseconds. `to_tune` builds the Tune objects only when the sweep runs.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

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
        hint = ""
        if isinstance(spec, Mapping) and len(spec) > 1 and set(spec) <= set(RANGES + LISTS):
            # what Hydra's merge of 'sweep.space={KEY: {other: [...]}}' into an existing dimension would leave
            hint = f"; to change a dimension's distribution from the command line, replace it: sweep.space.{key}=" + "{kind: [...]}"
        raise ConfigError(where, spec, f"expected exactly one distribution: {FORMS}{hint}")
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
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ConfigError(f"{where}.{kind}", list(values), "expected finite bounds")
    if not low < high:
        raise ConfigError(f"{where}.{kind}", list(values), "expected low < high")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}.{kind}", list(values), "expected 0 < low < high (a log scale)")
    return Dimension(key, kind, (low, high))


def parse_space(space: Mapping[str, Any]) -> list[Dimension]:
    searched = {key: spec for key, spec in space.items() if spec is not None}
    if not searched:
        raise ConfigError("sweep.space", dict(space), "expected at least one key to search, e.g. trainer.optimizer.lr: {loguniform: [1.0e-4, 1.0e-2]}")
    return [parse_dimension(str(key), spec) for key, spec in searched.items()]


SPACE_PREFIX = "sweep.space."


@dataclass(frozen=True)
class SpaceEdit:
    """One search dimension set (spec) or removed (spec None) from the command line.

    The space's keys contain dots and Hydra 1.3's override grammar has no quoted keys, so
    `sweep.space.trainer.optimizer.lr=...` cannot reach Hydra: Hydra would read it as a nested path. orch takes these
    arguments out before Hydra sees them and applies them to the composed space; everything after `sweep.space.` is
    the key. Setting replaces the whole dimension (Hydra would merge mappings, mixing two distributions).
    """

    key: str
    spec: Optional[Any]
    argument: str


def _space_edit(argument: str) -> Optional[SpaceEdit]:
    if argument.startswith("~"):
        key = argument[1:].split("=", 1)[0]
        return SpaceEdit(key[len(SPACE_PREFIX):], None, argument) if key.startswith(SPACE_PREFIX) else None
    bare = argument.lstrip("+")
    if not bare.startswith(SPACE_PREFIX) or "=" not in bare:
        return None
    key, text = bare[len(SPACE_PREFIX):].split("=", 1)
    return SpaceEdit(key, _parse_value(f"sweep.space.{key}", text), argument)


def _parse_value(where: str, text: str) -> Any:
    """The value in Hydra's own override syntax, so it reads like any other override: {loguniform: [1e-4, 1e-2]}."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        override = OverridesParser.create().parse_override(f"value={text}")
    except HydraException as error:
        raise ConfigError(where, text, f"expected a distribution in Hydra's value syntax, e.g. {{loguniform: [1e-4, 1e-2]}} "
                                       f"(quote the whole argument for the shell): {str(error).splitlines()[0]}") from None
    if override.is_sweep_override():
        raise ConfigError(where, text, "expected one distribution, not a Hydra sweep (write the options as {choice: [...]} or {grid: [...]})")
    return override.value()


def split_space_edits(arguments: Sequence[str]) -> tuple[list[str], list[SpaceEdit]]:
    """Command-line arguments → (those for Hydra) and (`sweep.space.KEY=DIST` / `~sweep.space.KEY` edits, in order)."""
    rest, edits = [], []
    for argument in arguments:
        edit = _space_edit(argument)
        if edit is None:
            rest.append(argument)
        elif not edit.key:
            raise ConfigError("sweep.space", argument, "expected a config key after sweep.space., e.g. sweep.space.trainer.optimizer.lr={loguniform: [1e-4, 1e-2]}")
        else:
            edits.append(edit)
    return rest, edits


def apply_space_edits(space: Mapping[str, Any], edits: Sequence[SpaceEdit]) -> dict[str, Any]:
    """The composed space with the command line's edits: set replaces a dimension or adds one, `~` removes one."""
    edited = {str(key): spec for key, spec in space.items() if spec is not None}
    for edit in edits:
        if edit.spec is not None:
            edited[edit.key] = edit.spec
        elif edit.key in edited:
            del edited[edit.key]
        else:
            raise ConfigError(f"sweep.space.{edit.key}", None, f"{edit.argument} removes a searched key, and this one is not searched; searched keys: {', '.join(edited) or 'none'}")
    return edited


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
