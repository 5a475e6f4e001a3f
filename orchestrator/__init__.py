"""orchestrator: Hydra-configured recipes that run DeepSpeed data-parallel training on Ray, tracked in MLflow."""

__version__ = "0.1.0"
