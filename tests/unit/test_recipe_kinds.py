"""`DRIVER_RECIPES` lets the driver know without importing a recipe (and torch) whether it needs Ray, so that Ray
can start while the driver imports: it must name exactly the recipe modules that run on the driver."""

from __future__ import annotations

import importlib
import pkgutil

import orchestrator.recipes
from orchestrator.recipes import DRIVER_RECIPES


def test_driver_recipes_are_exactly_the_modules_with_run_on_driver():
    names = [info.name for info in pkgutil.iter_modules(orchestrator.recipes.__path__)]
    assert {"train", "quantize", "pipeline"} <= set(names)
    modules = {name: importlib.import_module(f"orchestrator.recipes.{name}") for name in names}
    on_driver = {name for name, module in modules.items() if hasattr(module, "run_on_driver")}
    with_loop = {name for name, module in modules.items() if hasattr(module, "train_loop_per_worker")}
    assert on_driver == DRIVER_RECIPES
    assert not on_driver & with_loop
