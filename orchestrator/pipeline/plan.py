"""Pipeline config → PipelinePlan: one StagePlan per stage, composed from conf/ like a run of its own, in dependency order.

Each stage is a fresh composition (`orchestrator.config.compose`) of the same configs with ``recipe=<kind>``, then
``pipeline.overrides``, then the stage's ``overrides``, then the command line's overrides (which win, so
``trainer.max_steps=20`` shortens every stage). What a stage reads (input, teacher) and whether it must is what its
recipe's config declares (`recipe.reads`). Every rule is checked here, before Ray starts: unknown or cyclic
references, kinds without the input they need, a teacher whose output differs from the student's, every stage's own
config. Errors name the pipeline key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from omegaconf import OmegaConf

from orchestrator.config import Composed, ConfigSource, config_groups, validate
from orchestrator.config.reads import recipe_reads, set_recipe_value
from orchestrator.config.validate import ConfigError
from orchestrator.pipeline.promote import validate_promote
from orchestrator.plan import (
    Plan,
    StagePlan,
    build_plan,
    plan_stage,
    resolve_tracking,
    resolve_transfer_data,
    run_identity,
    stage_key,
)

# Command-line overrides that choose or name the pipeline itself, not the stages' configs.
_PIPELINE_LEVEL = ("recipe", "pipeline", "name", "resume", "hydra")


@dataclass
class PipelinePlan(Plan):
    """A Plan of several stages, with the pipeline's own settings."""

    name: str = ""
    cache: bool = True
    report_batch_size: int = 256
    config: dict[str, Any] = field(default_factory=dict)  # the pipeline section as composed (logged with the parent)


def is_pipeline(cfg: Any) -> bool:
    """Whether a composed config runs as a pipeline: a `pipeline` is chosen (`recipe=pipeline` chooses one too)."""
    return cfg.get("pipeline") is not None or cfg.recipe.name == "pipeline"


def build_run_plan(
    composed: Composed,
    command_line: Sequence[str] = (),
    cwd: Optional[Path] = None,
    source: Optional[ConfigSource] = None,
    paths_here: bool = True,
) -> Plan:
    """What `orch run` / `orch plan` / `orch submit` plan: a pipeline when the config has one, else its single stage.
    `paths_here`: see `orchestrator.plan.build_plan`."""
    if is_pipeline(composed.cfg):
        return build_pipeline_plan(composed, command_line, cwd, source, paths_here)
    return build_plan(composed, cwd, paths_here)


def command_line_overrides(overrides: Sequence[str]) -> list[str]:
    """The overrides every stage receives last: the command line's, minus those that pick or name the pipeline."""
    kept = []
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~").split("@", 1)[0]
        if key.split(".", 1)[0] not in _PIPELINE_LEVEL:
            kept.append(override)
    return kept


def dependency_order(stages: Sequence[Mapping[str, Any]], references: Mapping[str, dict[str, str]]) -> list[str]:
    """Stage names so that every stage comes after the stages it reads; declared order breaks ties."""
    names = [stage["name"] for stage in stages]
    placed: list[str] = []
    remaining = list(names)
    while remaining:
        ready = next(
            (name for name in remaining if all(ref in placed for ref in references[name].values() if ref in names)),
            None,
        )
        if ready is None:
            cycle, role = _find_cycle(remaining, references, names)
            raise ConfigError(
                f"pipeline.stages[{cycle[-2]}].{role}",
                " -> ".join(cycle),
                "the stages' input/teacher references form a cycle; a stage can only read a stage that does not "
                "depend on it",
            )
        placed.append(ready)
        remaining.remove(ready)
    return placed


def _find_cycle(
    remaining: Sequence[str], references: Mapping[str, dict[str, str]], names: Sequence[str]
) -> tuple[list[str], str]:
    path: list[str] = [remaining[0]]
    while True:  # every remaining stage reads another remaining stage, so following references must repeat
        role, ref = next((r, v) for r, v in references[path[-1]].items() if v in names and v in remaining)
        if ref in path:
            return path[path.index(ref):] + [ref], role
        path.append(ref)


def check_references(
    stages: Sequence[Mapping[str, Any]], reads: Mapping[str, Mapping[str, tuple[str, bool]]], paths_here: bool = True
) -> dict[str, dict[str, str]]:
    """Per stage, role -> reference; every reference a known stage, a run or a directory; each stage gets what its
    recipe declares it reads (`reads`: stage name -> role -> (recipe key, required))."""
    names = [stage["name"] for stage in stages]
    references: dict[str, dict[str, str]] = {}
    for stage in stages:
        name, kind = stage["name"], stage["kind"]
        allowed = reads[name]
        references[name] = {}
        for role in ("input", "teacher"):
            key, value = f"pipeline.stages[{name}].{role}", stage[role]
            if value is None:
                if role in allowed and allowed[role][1]:
                    raise ConfigError(key, value, f"a {kind} stage needs a {role}: the name of an earlier stage")
                continue
            if role not in allowed:
                hint = " (use kind=finetune to continue training another stage's model)" if "input" not in allowed else ""
                raise ConfigError(key, value, f"a {kind} stage takes no {role}{hint}")
            validate.validate_reference(key, value, names, paths_here)
            references[name][role] = value
    return references


def _check_names(stages: Sequence[Mapping[str, Any]]) -> None:
    names = [stage["name"] for stage in stages]
    for index, name in enumerate(names):
        if not name or names.index(name) != index:
            raise ConfigError(f"pipeline.stages[{index}].name", name, "expected a unique, non-empty stage name")


def _stage_error(name: str, error: ConfigError) -> ConfigError:
    key = error.key if error.key.startswith("pipeline.") else f"pipeline.stages[{name}].{error.key}"
    return ConfigError(key, error.value, error.expected)


def compose_stage(stage: Mapping[str, Any], pipeline: Mapping[str, Any], command_line: Sequence[str], source: ConfigSource) -> Composed:
    """A stage's config: recipe=<kind>, the pipeline's overrides, the stage's, then the command line's."""
    from hydra.errors import MissingConfigException

    kind = stage["kind"]
    try:
        return source.compose([f"recipe={kind}", *pipeline["overrides"], *stage["overrides"], *command_line])
    except MissingConfigException as error:
        if f"recipe/{kind}" in str(error) or "'recipe'" in str(error):
            options = [option for option in config_groups(source).get("recipe", []) if option != "pipeline"]
            raise ConfigError(f"pipeline.stages[{stage['name']}].kind", kind, f"expected a recipe option: {', '.join(options)}") from None
        raise


def build_pipeline_plan(
    composed: Composed,
    command_line: Sequence[str] = (),
    cwd: Optional[Path] = None,
    source: Optional[ConfigSource] = None,
    paths_here: bool = True,
) -> PipelinePlan:
    """`command_line`: the overrides the user typed; every stage receives them last (those that pick or name the
    pipeline excepted). `source`: where the stages' configs come from (default: conf/ and ./conf)."""
    cwd = cwd or Path.cwd()
    source = source or ConfigSource.for_directory(cwd)
    container = OmegaConf.to_container(composed.cfg, resolve=True, throw_on_missing=True, enum_to_str=True)
    assert isinstance(container, dict)
    pipeline = container.get("pipeline")
    if not pipeline:
        raise ConfigError("pipeline", None, "recipe=pipeline needs a pipeline: pick one with pipeline=<name> (conf/pipeline/)")
    if not pipeline["stages"]:
        raise ConfigError("pipeline.stages", [], "expected at least one stage")
    _check_names(pipeline["stages"])
    run_name, storage_root, resuming = run_identity(container, pipeline["name"], cwd, paths_here)
    if not container["tracking"]["log_model"]:
        raise ConfigError("tracking.log_model", False, "a pipeline passes models between stages as MLflow artifacts; set it to true")

    overrides = command_line_overrides(command_line)
    composed_stages = {stage["name"]: compose_stage(stage, pipeline, overrides, source) for stage in pipeline["stages"]}
    reads = {name: recipe_reads(stage.cfg.recipe) for name, stage in composed_stages.items()}
    references = check_references(pipeline["stages"], reads, paths_here)
    order = dependency_order(pipeline["stages"], references)
    stages = {stage["name"]: stage for stage in pipeline["stages"]}
    planned: dict[str, StagePlan] = {}
    for name in order:
        try:
            stage_plan = _plan_one(stages[name], composed_stages[name], references[name], planned, container, source, paths_here)
        except ConfigError as error:
            raise _stage_error(name, error) from error
        stage_plan.storage_path = str(Path(storage_root) / run_name)
        stage_plan.ray_name = f"{name}-{stage_plan.key[:8]}"
        stage_plan.run_name = f"{run_name}/{stage_plan.ray_name}"
        stage_plan.config["trainer"]["storage_path"] = stage_plan.storage_path
        stage_plan.config["name"] = stage_plan.run_name
        planned[name] = stage_plan
    tasks = {name: planned[name].config["data"]["task"] for name in order}
    validate_promote(pipeline.get("promote"), tasks, container["tracking"])
    return PipelinePlan(
        run_name=run_name,
        resuming=resuming,
        storage_path=storage_root,
        tracking=resolve_tracking(container["tracking"], cwd),
        stages=[planned[name] for name in order],
        name=pipeline["name"],
        cache=pipeline["cache"],
        report_batch_size=pipeline["report_batch_size"],
        config=pipeline,
    )


def _plan_one(
    stage: Mapping[str, Any],
    composed: Composed,
    references: Mapping[str, str],
    planned: Mapping[str, StagePlan],
    base: Mapping[str, Any],
    source: ConfigSource,
    paths_here: bool = True,
) -> StagePlan:
    validate.validate_known_keys(composed.cfg)
    validate.validate_model_and_data(composed.cfg, composed.choices, paths_here)
    config = OmegaConf.to_container(composed.cfg, resolve=True, throw_on_missing=True, enum_to_str=True)
    assert isinstance(config, dict)
    # one Ray instance and one MLflow experiment for the whole pipeline: the pipeline's own settings
    config["cluster"], config["tracking"] = dict(base["cluster"]), dict(base["tracking"])
    config["pipeline"] = None
    reads = recipe_reads(config["recipe"])
    for role, reference in references.items():
        set_recipe_value(config["recipe"], reads[role][0], reference)
    upstream = references.get("input")
    if upstream in planned:
        # the stage keeps its input's architecture (as configured: a structured-pruning stage upstream makes it
        # smaller at run time, which its export records)
        config["model"] = dict(planned[upstream].config["model"])
    resolve_transfer_data(config, source)
    teacher = references.get("teacher")
    if teacher in planned:
        validate.validate_teacher_matches_student(
            f"pipeline.stages[{stage['name']}].teacher", planned[teacher].config["model"], config["model"]
        )
    stage_plan = plan_stage(config, stage["name"], stage["kind"])
    stage_plan.inputs = dict(references)
    input_keys = {role: planned[ref].key if ref in planned else ref for role, ref in references.items()}
    stage_plan.key = stage_key(config, input_keys)
    return stage_plan
