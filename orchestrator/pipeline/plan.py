"""Pipeline config → Plan: one StagePlan per stage, composed from conf/ like a run of its own, in dependency order.

Each stage is a fresh Hydra composition of the same conf/ with ``recipe=<kind>``, then ``pipeline.overrides``, then
the stage's ``overrides``, then the command line's overrides (which win, so ``trainer.max_steps=20`` shortens every
stage). Every rule is checked here, before Ray starts: unknown or cyclic references, kinds without the input they
need, a teacher whose output differs from the student's, every stage's own config. Errors name the pipeline key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from omegaconf import DictConfig, OmegaConf, open_dict

from orchestrator.config import validate
from orchestrator.config.validate import ConfigError
from orchestrator.plan import PipelinePlan, Plan, new_run_name, plan_stage, resolve_tracking, stage_key

# What a stage kind needs as references (role -> required?) and where each lands in the recipe config.
ROLES = {
    "train": {},
    "prune": {"input": True},
    "finetune": {"input": True},
    "quantize": {"input": True},
    "distill": {"teacher": True, "input": False},
}
ROLE_KEYS = {"input": ("input",), "teacher": ("distill", "teacher")}
# Command-line overrides that choose or name the pipeline itself, not the stages' configs.
_PIPELINE_LEVEL = ("recipe", "pipeline", "name", "resume", "hydra")


def command_line_overrides(overrides: Optional[Sequence[str]]) -> list[str]:
    """The overrides every stage receives last: the given ones, else the running `orch` command's (Hydra's)."""
    if overrides is None:
        try:
            from hydra.core.hydra_config import HydraConfig

            overrides = list(HydraConfig.get().overrides.task)
        except ValueError:  # not under `orch run`/`orch plan` (tests, notebooks): nothing to forward
            overrides = []
    kept = []
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~").split("@", 1)[0]
        if key.split(".", 1)[0] not in _PIPELINE_LEVEL:
            kept.append(override)
    return kept


def compose_stage(overrides: Sequence[str]) -> tuple[DictConfig, dict[str, str]]:
    """Compose conf/ with `overrides` the way the running command does; returns the config and the group choices.

    Inside `orch run`/`orch plan` Hydra is initialised with the command's search path (a project's own conf/
    included) and the choices are known; elsewhere (tests, notebooks) `orchestrator.config.compose` is used.
    """
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra

    if not GlobalHydra.instance().is_initialized():
        from orchestrator.config import compose as compose_outside_orch

        return compose_outside_orch(list(overrides)), {}
    cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
    choices = {str(k): str(v) for k, v in cfg.hydra.runtime.choices.items()}
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, choices


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


def check_references(stages: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, str]]:
    """Per stage, role -> reference; every reference a known stage, a run or a directory; kinds get what they need."""
    names = [stage["name"] for stage in stages]
    for index, name in enumerate(names):
        if not name or names.index(name) != index:
            raise ConfigError(f"pipeline.stages[{index}].name", name, "expected a unique, non-empty stage name")
    references: dict[str, dict[str, str]] = {}
    for stage in stages:
        name, kind = stage["name"], stage["kind"]
        allowed = ROLES[kind]
        references[name] = {}
        for role in ("input", "teacher"):
            key, value = f"pipeline.stages[{name}].{role}", stage[role]
            if value is None:
                if allowed.get(role):
                    raise ConfigError(key, value, f"a {kind} stage needs a {role}: the name of an earlier stage")
                continue
            if role not in allowed:
                hint = " (use kind=finetune to continue training another stage's model)" if kind == "train" else ""
                raise ConfigError(key, value, f"a {kind} stage takes no {role}{hint}")
            validate.validate_reference(key, value, names)
            references[name][role] = value
    return references


def build_pipeline_plan(container: dict[str, Any], cwd: Path, overrides: Optional[Sequence[str]]) -> Plan:
    pipeline = container.get("pipeline")
    if not pipeline:
        raise ConfigError("pipeline", None, "recipe=pipeline needs a pipeline: pick one with pipeline=<name> (conf/pipeline/)")
    if not pipeline["stages"]:
        raise ConfigError("pipeline.stages", [], "expected at least one stage")
    stages = {stage["name"]: stage for stage in pipeline["stages"]}
    references = check_references(pipeline["stages"])
    order = dependency_order(pipeline["stages"], references)

    storage_root = container["trainer"]["storage_path"] or str(cwd / "orch_runs")
    resume = container.get("resume")
    run_name = resume or container.get("name") or new_run_name(pipeline["name"])
    validate.validate_run_name(run_name, resume, storage_root)
    if not container["tracking"]["log_model"]:
        raise ConfigError("tracking.log_model", False, "a pipeline passes models between stages as MLflow artifacts; set it to true")

    command_line = command_line_overrides(overrides)
    planned: dict[str, Any] = {}
    for name in order:
        stage = stages[name]
        try:
            stage_plan = _plan_one(stage, references[name], planned, pipeline, command_line, container)
        except ConfigError as error:
            key = error.key if error.key.startswith("pipeline.") else f"pipeline.stages[{name}].{error.key}"
            raise ConfigError(key, error.value, error.expected) from error
        stage_plan.storage_path = str(Path(storage_root) / run_name)
        stage_plan.ray_name = f"{name}-{stage_plan.key[:8]}"
        stage_plan.run_name = f"{run_name}/{stage_plan.ray_name}"
        stage_plan.config["trainer"]["storage_path"] = stage_plan.storage_path
        stage_plan.config["name"] = stage_plan.run_name
        planned[name] = stage_plan
    return Plan(
        run_name=run_name,
        resuming=bool(resume),
        storage_path=storage_root,
        tracking=resolve_tracking(container["tracking"], cwd),
        stages=[planned[name] for name in order],
        pipeline=PipelinePlan(
            name=pipeline["name"],
            cache=pipeline["cache"],
            report_batch_size=pipeline["report_batch_size"],
            config=pipeline,
        ),
    )


def _plan_one(
    stage: Mapping[str, Any],
    references: Mapping[str, str],
    planned: Mapping[str, Any],
    pipeline: Mapping[str, Any],
    command_line: Sequence[str],
    base: Mapping[str, Any],
):
    kind = stage["kind"]
    cfg, choices = compose_stage([f"recipe={kind}", *pipeline["overrides"], *stage["overrides"], *command_line])
    validate.validate_model_and_data(cfg, choices)
    config = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True, enum_to_str=True)
    assert isinstance(config, dict)
    # one Ray instance and one MLflow experiment for the whole pipeline: the pipeline's own settings
    config["cluster"], config["tracking"] = dict(base["cluster"]), dict(base["tracking"])
    config["pipeline"] = None
    for role, reference in references.items():
        *parents, leaf = ROLE_KEYS[role]
        section = config["recipe"]
        for parent in parents:
            section = section[parent]
        section[leaf] = reference
    upstream = references.get("input")
    if upstream in planned:
        # prune/finetune/quantize (and a distill student started from a model) keep the input's architecture (as
        # configured: a structured-pruning stage upstream makes it smaller at run time, which its export records)
        config["model"] = dict(planned[upstream].config["model"])
    teacher = references.get("teacher")
    if teacher in planned:
        validate.validate_teacher_matches_student(
            f"pipeline.stages[{stage['name']}].teacher", planned[teacher].config["model"], config["model"]
        )
    stage_plan = plan_stage(config, stage["name"], kind)
    stage_plan.inputs = dict(references)
    input_keys = {role: planned[ref].key if ref in planned else ref for role, ref in references.items()}
    stage_plan.key = stage_key(config, input_keys)
    return stage_plan
