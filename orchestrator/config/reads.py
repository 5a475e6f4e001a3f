"""The model references a recipe reads (`recipe.reads` in its config): which roles, at which keys, which required.

Plain dict walking, so that plan, validation, pipelines and sweeps all read the declaration the same way.
"""

from __future__ import annotations

from typing import Any, Mapping


def recipe_reads(recipe: Mapping[str, Any]) -> dict[str, tuple[str, bool]]:
    """Role -> (the recipe key holding the reference, whether it is required), as the recipe's config declares."""
    return {role: (read["key"], bool(read["required"])) for role, read in (recipe.get("reads") or {}).items()}


def recipe_value(recipe: Mapping[str, Any], key: str) -> Any:
    value: Any = recipe
    for part in key.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def set_recipe_value(recipe: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        recipe = recipe[part]
    recipe[leaf] = value


def recipe_inputs(recipe: Mapping[str, Any]) -> dict[str, str]:
    """The model references a recipe config names: role -> reference."""
    inputs = {}
    for role, (key, _) in recipe_reads(recipe).items():
        value = recipe_value(recipe, key)
        if value:
            inputs[role] = value
    return inputs
