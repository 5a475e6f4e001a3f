"""The recipes: one module per `recipe.name`, each a worker loop (`train_loop_per_worker`) run by Ray Train, or a
`run_on_driver` function run in the driver process without Ray."""

DRIVER_RECIPES = frozenset({"quantize"})  # the recipes with `run_on_driver`: a run of one of them starts no Ray
