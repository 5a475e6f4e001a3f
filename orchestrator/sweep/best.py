"""The best trial's configuration as a YAML that `orch run` accepts as is.

best.yaml is a primary config of its own: it starts from the shipped config.yaml (schemas, Hydra settings), picks
the same group options the sweep's base recipe picked, then sets every section to the best trial's resolved values.
So `orch run --config-dir DIR --config-name best` trains exactly that configuration, and any `key=value` after it
still overrides it as usual.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any, Mapping

import yaml
from omegaconf import DictConfig, OmegaConf

from orchestrator.sweep.plan import SweepPlan

GROUPS = ("recipe", "model", "data", "trainer", "cluster", "tracking")
NOT_CARRIED = ("name", "resume", "sweep", "pipeline")  # a rerun is a new run of its own, outside the sweep


def best_config(cfg: DictConfig, choices: Mapping[str, str]) -> dict[str, Any]:
    container = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    assert isinstance(container, dict)
    defaults: list[Any] = ["config"]
    defaults += [{f"override {group}": choices[group]} for group in GROUPS if choices.get(group)]
    defaults.append("_self_")
    body = {key: value for key, value in container.items() if key not in NOT_CARRIED}
    return {"defaults": defaults, **body}


def write_best(cfg: DictConfig, plan: SweepPlan, best: Mapping[str, Any], directory: Path) -> str:
    """Write directory/best.yaml; returns the command that reruns it."""
    directory.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["orch", "run", "--config-dir", str(directory), "--config-name", "best"])
    header = [
        f"# Best trial of sweep {plan.run_name}: {plan.metric}={best[plan.metric]:.6g} (trial {best['trial_id']},",
        f"# MLflow run {best['run_id']}). Searched: " + ", ".join(f"{d.key}={best[d.key]!r}" for d in plan.dimensions),
        f"#   {command}",
        f"#   {command} trainer.max_steps=1000        # any override still applies",
        f"#   orch run -m --config-dir {directory} --config-name best trainer.seed=0,1,2",
        f"#   {command} cluster=ray cluster.address=auto   # on a cluster, from a node inside it",
    ]
    text = "\n".join(header) + "\n" + yaml.safe_dump(best_config(cfg, plan.choices), sort_keys=False)
    (directory / "best.yaml").write_text(text)
    return command
