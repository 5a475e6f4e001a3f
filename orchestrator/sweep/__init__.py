"""Hyperparameter sweeps on Ray Tune: every trial an `orch run` (Ray Train + DeepSpeed) and an MLflow child run.

plan.py   sweep config → SweepPlan, every check before Ray starts      space.py   YAML distributions ↔ Tune domains
runner.py the Tuner, the parent run, the outcome                        trial.py   one trial: Ray Train inside Tune
tracking.py parent/child MLflow runs   plots.py overview figures   best.py the best config as an `orch run` YAML
"""
