"""A recipe's config declares where it runs (`recipe.runs_on`), so that the driver knows without importing the recipe
(and torch) whether it needs Ray, and Ray can start while the driver imports: the declaration must match the module."""

from __future__ import annotations

import importlib

from orchestrator.config import compose, config_groups


def test_every_recipe_option_declares_where_its_module_runs():
    options = [option for option in config_groups()["recipe"] if option != "pipeline"]
    assert {"train", "prune", "finetune", "distill", "quantize"} <= set(options)
    seen = set()
    for option in options:
        recipe = compose([f"recipe={option}"]).cfg.recipe
        module = importlib.import_module(f"orchestrator.recipes.{recipe.name}")
        entry = "run_on_driver" if recipe.runs_on.value == "driver" else "train_loop_per_worker"
        assert hasattr(module, entry), f"recipe={option} declares runs_on={recipe.runs_on.value}; {module.__name__} lacks {entry}"
        other = "train_loop_per_worker" if entry == "run_on_driver" else "run_on_driver"
        assert not hasattr(module, other), f"{module.__name__} has both entry points"
        seen.add(recipe.runs_on.value)
    assert seen == {"driver", "workers"}
