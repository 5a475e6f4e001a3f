"""A sweep whose trials are pipelines (recipe=pipeline): how a trial's values reach its stages, what a trial
reports, and which stages every trial shares.

Space keys `stages.<stage>.<key>` go last into that stage's overrides (after the stage's own: the order of
`orchestrator.pipeline.plan`), other keys onto the command line of every stage. A stage is shared when no bound or
option of the space changes its cache key (`orchestrator.plan.stage_key`, which covers its inputs' keys): the
sweep's driver runs it once before the trials (`orchestrator.pipeline.runner.run_shared_stages`).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from orchestrator.config import Composed, ConfigSource
from orchestrator.config.validate import ConfigError
from orchestrator.pipeline.plan import PipelinePlan, build_pipeline_plan
from orchestrator.sweep.space import Dimension


def leaf(container: Mapping[str, Any], key: str) -> tuple[bool, Any]:
    node: Any = container
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node



STAGE_PREFIX = "stages."  # a pipeline sweep's space key for one stage: stages.<stage>.<key>
NOT_SEARCHED = ("name", "resume", "sweep", "pipeline", "cluster", "tracking")


def override_text(key: str, value: Any) -> str:
    """A trial's value as a Hydra override (lists and numbers written as JSON, which Hydra's grammar reads)."""
    import json

    return f"{key}={value if isinstance(value, str) else json.dumps(value, separators=(',', ':'))}"


def pipeline_trial_config(base: DictConfig, overrides: Sequence[str], params: Mapping[str, Any]) -> tuple[DictConfig, list[str]]:
    """A pipeline trial's (config, command line): `stages.<stage>.<key>` values go last into that stage's overrides
    (after the stage's own, before the command line: pipeline/plan.py's order), other keys onto the command line,
    so every stage gets them and they win."""
    cfg = copy.deepcopy(base)
    command_line = list(overrides)
    for key, value in params.items():
        if key.startswith(STAGE_PREFIX):
            _, stage_name, stage_key = key.split(".", 2)
            stage = next(stage for stage in cfg.pipeline.stages if stage.name == stage_name)
            stage.overrides.append(override_text(stage_key, value))
        else:
            command_line.append(override_text(key, value))
    return cfg, command_line


def plan_pipeline_trial(
    base: DictConfig, choices: Mapping[str, str], overrides: Sequence[str], params: Mapping[str, Any], cwd: Path,
    paths_here: bool = True, source: Optional[ConfigSource] = None,
) -> PipelinePlan:
    """The pipeline plan of one trial (`params`: the trial's values; base-level keys such as name or
    trainer.storage_path are set on `base` by the caller)."""
    cfg, command_line = pipeline_trial_config(base, overrides, params)
    return build_pipeline_plan(Composed(cfg, dict(choices)), command_line, cwd, source or ConfigSource.for_directory(cwd), paths_here)


def pipeline_metrics(task: str) -> tuple[str, ...]:
    """What a pipeline trial reports: the summary its run logs (`orchestrator.pipeline.report.summary_metrics`),
    read off a report row of the final stage's task."""
    from orchestrator.pipeline.report import summary_metrics

    quality = "val_perplexity" if task == "lm" else "val_accuracy"
    row = dict.fromkeys((quality, "parameters", "nonzero_parameters", "sparsity", "size_bytes", "size_gzip_bytes", "latency_ms"), 1.0)
    return tuple(summary_metrics([row, row]))


def check_pipeline_keys(plan: PipelinePlan, dimensions: Sequence[Dimension]) -> None:
    stages = {stage.name: stage for stage in plan.stages}
    for dim in dimensions:
        key, chosen = dim.key, list(stages.values())
        if dim.key.startswith(STAGE_PREFIX):
            parts = dim.key.split(".", 2)
            if len(parts) < 3 or parts[1] not in stages:
                raise ConfigError(f"sweep.space.{dim.key}", dim.describe(), f"expected stages.<stage>.<key>, a stage of pipeline={plan.name}: {', '.join(stages)}")
            key, chosen = parts[2], [stages[parts[1]]]
        if key.split(".", 1)[0] in NOT_SEARCHED:
            raise ConfigError(f"sweep.space.{dim.key}", dim.describe(), "expected a key that shapes training, not naming, tracking or placement")
        for stage in chosen:
            found, value = leaf(stage.config, key)
            if not found or isinstance(value, Mapping):
                where = f"stage {stage.name}" if len(chosen) == 1 else f"stage {stage.name} (a key without stages.<stage>. is set on every stage)"
                raise ConfigError(f"sweep.space.{dim.key}", dim.describe(), f"no such leaf key in {where}'s config")


def check_pipeline_probes(
    base: DictConfig, base_plan: PipelinePlan, dimensions: Sequence[Dimension], choices: Mapping[str, str],
    overrides: Sequence[str], cwd: Path, paths_here: bool,
) -> list[str]:
    """Every probe value planned as a pipeline trial; returns the stages whose cache key no probe changes (shared by
    every trial: run once per sweep, `orchestrator.pipeline.runner.run_shared_stages`)."""
    from hydra.errors import HydraException

    shared = {stage.name: stage.key for stage in base_plan.stages}
    for dim in dimensions:
        for value in dim.probes():
            try:
                probe = plan_pipeline_trial(base, choices, overrides, {dim.key: value}, cwd, paths_here)
            except ConfigError as error:
                raise ConfigError(f"sweep.space.{dim.key}", value, f"this value fails the pipeline's own checks: {error}") from error
            except (OmegaConfBaseException, HydraException) as error:
                message = str(error).splitlines()[0]
                raise ConfigError(f"sweep.space.{dim.key}", value, f"this value does not fit the config: {message}") from error
            keys = {stage.name: stage.key for stage in probe.stages}
            shared = {name: key for name, key in shared.items() if keys.get(name) == key}
    return [stage.name for stage in base_plan.stages if stage.name in shared]
