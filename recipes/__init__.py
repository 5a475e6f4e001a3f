"""The recipes: one module per `recipe.name`, each a worker loop (`train_loop_per_worker`) run by Ray Train, or a
`run_on_driver` function run in the driver process without Ray. Which of the two, and which models a recipe reads,
its config declares (`runs_on`, `reads` in conf/recipe/*.yaml): the library reads that, never this package."""
