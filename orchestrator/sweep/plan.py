"""Sweep config → SweepPlan, with every check done before Ray starts.

The base recipe is composed from conf/ like a run of its own: `sweep.overrides`, then the command line's overrides
(which win). A trial is that config with the trial's values set on its keys (`apply`), planned by the same
`build_plan` as `orch run`. Checked here, each a ConfigError naming the key:
  * the space: every key a leaf of the composed config, every distribution well-formed, and every probe value (the
    bounds of a range, every option of a choice) set on the base config still composes and plans;
  * the metric: one the recipe reports to Ray Train at its checkpoints (what Tune sees), at every checkpoint;
  * the objectives (`sweep.objectives`, several metrics at once): at least two, each max or min and reported by the
    trial, with no scheduler that stops trials on one metric (ASHA);
  * a pipeline base recipe (recipe=pipeline): space keys stages.<stage>.<key> (one stage) or plain keys (every
    stage), every probe planned as a whole pipeline, and the stages no probe changes (run once per sweep);
  * the search algorithm against the space (Optuna has no grid), the ASHA settings against trainer.max_steps,
    points_to_evaluate against the space, concurrency against this machine.
"""

from __future__ import annotations

import copy
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from orchestrator.config import Composed, ConfigSource, compose, validate
from orchestrator.config.validate import ConfigError
from orchestrator.pipeline.plan import PipelinePlan, build_pipeline_plan, is_pipeline
from orchestrator.plan import Plan, build_plan
from orchestrator.sweep.pipeline_trials import (
    NOT_SEARCHED,
    check_pipeline_keys,
    check_pipeline_probes,
    leaf,
    pipeline_metrics,
)
from orchestrator.sweep.space import LISTS, Dimension, parse_space

# Metrics every training recipe reports with its checkpoints (orchestrator.train.engine.save_and_report), by task.
# val_* come from validation (trainer.eval_every); the others from the log step (trainer.log_every).
LOGGED = ("loss", "lr", "samples_per_s")
VALIDATED = {"classification": ("val_loss", "val_accuracy"), "lm": ("val_loss", "val_perplexity")}


@dataclass
class SweepPlan:
    name: str  # the sweep config's name (conf/sweep/<name>.yaml)
    run_name: str  # the parent MLflow run's orch.run_name; trials' checkpoints live under storage_path/run_name
    dimensions: list[Dimension]
    metric: str  # with objectives: the first one (what progress lines and tables lead with)
    mode: str
    num_samples: int
    search: str
    seed: Optional[int]
    points_to_evaluate: list[dict[str, Any]]
    scheduler: dict[str, Any]  # name, grace_period (resolved), reduction_factor, max_t
    max_concurrent_trials: Optional[int]  # None: decided when Ray is up, from the cluster's capacity
    base: DictConfig  # the composed base config: trials set their values on a copy of it
    choices: dict[str, str]  # group options of the base config (recipe=..., model=...)
    base_plan: Plan  # the base config planned: tracking, storage, cluster, resources per trial
    overrides: list[str]  # sweep.overrides + command line: the base recipe as `orch run` arguments
    config: dict[str, Any] = field(default_factory=dict)  # the sweep section, logged with the parent run
    resuming: bool = False  # `orch sweep resume=NAME`: continue that interrupted sweep (`orchestrator.sweep.resume`)
    objectives: dict[str, str] = field(default_factory=dict)  # metric -> max|min; empty: one metric (metric, mode)
    # a sweep of pipelines (recipe=pipeline): the stages no searched value changes, run once before the trials
    shared_stages: list[str] = field(default_factory=list)

    @property
    def pipeline(self) -> bool:
        """Whether each trial is a pipeline run (its MLflow run the pipeline's parent, its stages children of it)."""
        return isinstance(self.base_plan, PipelinePlan)

    @property
    def sweep_dir(self) -> Path:
        """The sweep's folder: Tune's experiment state under tune/, each trial's Ray Train run beside it."""
        return Path(self.base_plan.storage_path, self.run_name)

    def identity(self) -> dict[str, Any]:
        """What a resumed sweep must share with the one it continues (stored as data in sweep_plan.json)."""
        return {"sweep": self.name, "space": {d.key: d.describe() for d in self.dimensions}, "overrides": self.overrides,
                "metric": self.metric, "mode": self.mode, "num_samples": self.num_samples, "search": self.search,
                "seed": self.seed, "scheduler": self.scheduler,
                # only when set, so that a single-objective sweep started before objectives existed still resumes
                **({"objectives": self.objectives} if self.objectives else {})}


IDENTITY_FILE = "sweep_plan.json"


def new_sweep_name(name: str) -> str:
    return f"sweep-{name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def apply(base: DictConfig, params: Mapping[str, Any], name: Optional[str] = None) -> DictConfig:
    """The base config with `params` (dotted key -> value) set; types are checked against the schemas."""
    cfg = copy.deepcopy(base)
    for key, value in params.items():
        OmegaConf.update(cfg, key, value, merge=False)
    if name is not None:
        cfg.name = name
    return cfg


def _check_keys(base: DictConfig, dimensions: Sequence[Dimension], recipe: str) -> None:
    container = OmegaConf.to_container(base, resolve=False)
    assert isinstance(container, dict)
    for dim in dimensions:
        found, value = leaf(container, dim.key)
        if not found:
            section = dim.key.rsplit(".", 1)[0] if "." in dim.key else ""
            _, parent = leaf(container, section) if section else (True, container)
            near = sorted(parent) if isinstance(parent, Mapping) else []
            hint = f"; keys of {section}: {', '.join(near)}" if section and near else ""
            raise ConfigError(f"sweep.space.{dim.key}", dim.describe(), f"no such key in the composed config (recipe={recipe}){hint}")
        if isinstance(value, Mapping):
            raise ConfigError(
                f"sweep.space.{dim.key}", dim.describe(),
                "this is a config section; search its leaf keys (or pick group options in sweep.overrides)",
            )
        if dim.key.split(".", 1)[0] in NOT_SEARCHED:
            raise ConfigError(f"sweep.space.{dim.key}", dim.describe(), "expected a key that shapes training, not naming, tracking or placement")


def _check_probes(
    base: DictConfig, dimensions: Sequence[Dimension], choices: Mapping[str, str], cwd: Path, paths_here: bool = True
) -> None:
    """Each dimension's bounds/options set one at a time on the base config must compose and plan."""
    for dim in dimensions:
        for value in dim.probes():
            try:
                build_plan(Composed(apply(base, {dim.key: value}), dict(choices)), cwd=cwd, paths_here=paths_here)
            except ConfigError as error:
                raise ConfigError(
                    f"sweep.space.{dim.key}", value, f"this value fails the recipe's own checks: {error}"
                ) from error
            except OmegaConfBaseException as error:
                message = str(error).splitlines()[0]
                raise ConfigError(f"sweep.space.{dim.key}", value, f"this value does not fit the config: {message}") from error


def reported_metrics(config: Mapping[str, Any]) -> tuple[str, ...]:
    task = config["data"].get("task", "classification")
    metrics = (*LOGGED, *VALIDATED.get(task, ()))
    if task == "lm":
        metrics += ("tokens_per_s",)
    if ((config["recipe"].get("pruning") or {}).get("schedule", "none")) != "none":
        metrics += ("sparsity",)
    return metrics


def objective_metrics(config: Mapping[str, Any]) -> tuple[str, ...]:
    """What a one-stage trial's final report holds: the recipe's reported metrics and, for a stage that pruned, the
    size of its exported model (logged by `run_stage`, added to the report by the trial)."""
    metrics = reported_metrics(config)
    if ((config["recipe"].get("pruning") or {}).get("schedule", "none")) != "none":
        metrics += SIZE_METRICS
    return metrics


# Logged on a pruned stage's run (orchestrator.track.mlflow_run.StageRun.log_compression); trials report them too.
SIZE_METRICS = ("nonzero_parameters", "parameters", "final_sparsity")


def check_objectives(sweep: Mapping[str, Any], reported: Sequence[str], what: str) -> dict[str, str]:
    """`sweep.objectives` against what a trial reports (`what` says which trial: the recipe or the pipeline)."""
    given = sweep.get("objectives")
    if not isinstance(given, Mapping):
        raise ConfigError("sweep.objectives", given, "expected a mapping metric: max|min, e.g. {val_accuracy: max, nonzero_parameters: min}")
    objectives = dict(given)
    if len(objectives) < 2:
        raise ConfigError("sweep.objectives", objectives, "expected at least 2 metrics (metric: max|min); for one, set sweep.metric and sweep.mode instead")
    for metric, mode in objectives.items():
        if mode not in ("max", "min"):
            raise ConfigError(f"sweep.objectives.{metric}", mode, "expected max or min")
        if metric not in reported:
            raise ConfigError(f"sweep.objectives.{metric}", mode, f"{what} reports {', '.join(reported)}; an objective must be one of them")
    if sweep["scheduler"]["name"] == "asha":
        raise ConfigError("sweep.scheduler.name", "asha", "ASHA stops trials on one metric; with sweep.objectives expected 'none'")
    return objectives


def _check_metric(sweep: Mapping[str, Any], config: Mapping[str, Any]) -> None:
    metric, trainer = sweep["metric"], config["trainer"]
    reported = reported_metrics(config)
    if metric not in reported:
        raise ConfigError(
            "sweep.metric", metric,
            f"recipe={config['recipe']['name']} on data with task={config['data'].get('task')} reports "
            f"{', '.join(reported)} (the metric is read from what trials report at their checkpoints)",
        )
    every = trainer["checkpoint_every"]
    if every == 0 or every >= trainer["max_steps"]:
        return  # one report, at the last step, which carries everything
    cadence_key = "trainer.eval_every" if metric.startswith("val_") else "trainer.log_every"
    cadence = trainer[cadence_key.split(".")[1]]
    if cadence == 0 or every % cadence:
        raise ConfigError(
            cadence_key, cadence,
            f"trials report to Tune at every checkpoint (trainer.checkpoint_every={every}); for {metric} to be in "
            f"each report, {cadence_key} must divide {every} (e.g. set both to {every})",
        )


def _check_search(sweep: Mapping[str, Any], dimensions: Sequence[Dimension], max_steps: int, trainer: Mapping[str, Any]) -> dict[str, Any]:
    search = sweep["search"]
    grids = [d.key for d in dimensions if d.kind == "grid"]
    if search == "optuna" and grids:
        raise ConfigError("sweep.search", "optuna", f"Optuna samples, it does not enumerate: write {grids[0]} as a choice, or use sweep.search=grid")
    if search == "grid":
        ranges = [d.key for d in dimensions if d.kind not in LISTS]
        if ranges:
            raise ConfigError("sweep.search", "grid", f"a grid needs listed values; {ranges[0]} is a range (use choice/grid, or sweep.search=random)")
    if sweep["num_samples"] < 1:
        raise ConfigError("sweep.num_samples", sweep["num_samples"], "expected at least 1 trial")
    if sweep["max_concurrent_trials"] is not None and sweep["max_concurrent_trials"] < 1:
        raise ConfigError("sweep.max_concurrent_trials", sweep["max_concurrent_trials"], "expected at least 1, or null for as many as fit")
    keys = {d.key for d in dimensions}
    for index, point in enumerate(sweep["points_to_evaluate"]):
        unknown = set(point) - keys
        if unknown or set(point) != keys:
            raise ConfigError(
                f"sweep.points_to_evaluate[{index}]", dict(point),
                f"expected a value for every key of sweep.space ({', '.join(sorted(keys))}) and no other",
            )
    scheduler = dict(sweep["scheduler"])
    if scheduler["name"] not in ("none", "asha"):
        raise ConfigError("sweep.scheduler.name", scheduler["name"], "expected 'none' or 'asha'")
    scheduler["max_t"] = max_steps
    if scheduler["name"] == "asha":
        every = trainer["checkpoint_every"]
        grace = scheduler["grace_period"] if scheduler["grace_period"] is not None else every
        if every == 0 or every >= max_steps:
            raise ConfigError(
                "trainer.checkpoint_every", every,
                f"ASHA stops trials on their intermediate reports, which trials send at checkpoints; expected "
                f"0 < checkpoint_every < trainer.max_steps={max_steps}",
            )
        if not 1 <= grace < max_steps:
            raise ConfigError("sweep.scheduler.grace_period", grace, f"expected 1 <= grace_period < trainer.max_steps={max_steps}")
        if scheduler["reduction_factor"] <= 1:
            raise ConfigError("sweep.scheduler.reduction_factor", scheduler["reduction_factor"], "expected a factor > 1")
        scheduler["grace_period"] = grace
    return scheduler


def _check_concurrency(sweep: Mapping[str, Any], config: Mapping[str, Any]) -> None:
    if config["cluster"]["kind"] != "local" or sweep["max_concurrent_trials"] is None:
        return
    cpus = config["cluster"]["num_cpus"] or validate.local_cpu_count()
    per_trial = validate.worker_range(config["trainer"]["num_workers"])[0] * config["trainer"]["cpus_per_worker"]
    fit = int(cpus // per_trial)
    if sweep["max_concurrent_trials"] > fit:
        raise ConfigError(
            "sweep.max_concurrent_trials", sweep["max_concurrent_trials"],
            f"each trial reserves {per_trial:g} CPUs (trainer.num_workers x trainer.cpus_per_worker) and this machine "
            f"has {cpus:g}: at most {fit} at once, or set it to null",
        )


def build_sweep_plan(
    sweep: Mapping[str, Any],
    base: DictConfig,
    choices: Mapping[str, str],
    overrides: Sequence[str],
    cwd: Optional[Path] = None,
    paths_here: bool = True,
    resume: Optional[str] = None,
    source: Optional[ConfigSource] = None,
) -> SweepPlan:
    """`sweep` is the composed sweep section; `base` the base recipe composed with sweep.overrides + command line.
    `paths_here`: see `orchestrator.plan.build_plan` (False for `orch submit --sweep`). `resume`: the name of an
    interrupted sweep to continue."""
    cwd = cwd or Path.cwd()
    if resume is not None:
        validate.validate_run_name_format("resume", resume)
    dimensions = parse_space(sweep["space"])
    with open_dict(base):
        base.sweep = None
    shared: list[str] = []
    if is_pipeline(base):
        base_plan = build_pipeline_plan(Composed(base, dict(choices)), overrides, cwd, source, paths_here)
        stage = base_plan.stages[0]
        check_pipeline_keys(base_plan, dimensions)
        if sweep["scheduler"]["name"] == "asha":
            raise ConfigError("sweep.scheduler.name", "asha", "a pipeline trial reports once, when its last stage is measured; expected 'none'")
        reported = pipeline_metrics(base_plan.stages[-1].config["data"].get("task", "classification"))
        what = f"a pipeline trial (pipeline={base_plan.name})"
        if sweep.get("objectives") is not None:
            objectives = check_objectives(sweep, reported, what)
        else:
            objectives = {}
            if sweep["metric"] not in reported:
                raise ConfigError("sweep.metric", sweep["metric"], f"{what} reports {', '.join(reported)}")
    else:
        base_plan = build_plan(Composed(base, dict(choices)), cwd=cwd, paths_here=paths_here)
        stage = base_plan.stages[0]
        recipe = stage.config["recipe"]["name"]
        if stage.config["recipe"]["runs_on"] != "workers":
            raise ConfigError("sweep.overrides", f"recipe={choices.get('recipe', recipe)}", "expected a training recipe (one that runs on Ray workers, e.g. train, prune, finetune, distill): trials report metrics while they train")
        _check_keys(base, dimensions, recipe)
        objectives = {}
        if sweep.get("objectives") is not None:
            what = f"recipe={stage.config['recipe']['name']} on data with task={stage.config['data'].get('task')}"
            objectives = check_objectives(sweep, objective_metrics(stage.config), what)
        else:
            _check_metric(sweep, stage.config)
    max_steps = stage.config["trainer"]["max_steps"]
    steps_dim = next((d for d in dimensions if d.key == "trainer.max_steps"), None)
    if steps_dim is not None:
        max_steps = max(int(v) for v in steps_dim.values)
    scheduler = _check_search(sweep, dimensions, max_steps, stage.config["trainer"])
    _check_concurrency(sweep, stage.config)
    if isinstance(base_plan, PipelinePlan):
        shared = check_pipeline_probes(base, base_plan, dimensions, choices, overrides, cwd, paths_here)
    else:
        _check_probes(base, dimensions, choices, cwd, paths_here)
    plan = SweepPlan(
        name=sweep["name"],
        run_name=resume or new_sweep_name(sweep["name"]),
        dimensions=dimensions,
        metric=next(iter(objectives), sweep["metric"]),
        mode=next(iter(objectives.values()), sweep["mode"]),
        num_samples=sweep["num_samples"],
        search=sweep["search"],
        seed=sweep["seed"],
        points_to_evaluate=[dict(p) for p in sweep["points_to_evaluate"]],
        scheduler=scheduler,
        max_concurrent_trials=sweep["max_concurrent_trials"],
        base=base,
        choices=dict(choices),
        base_plan=base_plan,
        overrides=list(overrides),
        config=dict(sweep),
        resuming=resume is not None,
        objectives=objectives,
        shared_stages=shared if isinstance(base_plan, PipelinePlan) and base_plan.cache else [],
    )
    if resume is not None and objectives and plan.search == "optuna":
        # Optuna is warmed with the finished trials' values on a resume (`orchestrator.sweep.resume`), one per trial
        raise ConfigError("resume", resume, "a sweep with sweep.objectives and sweep.search=optuna cannot be resumed; start it again, or use search=random|grid")
    if resume is not None and paths_here:
        _check_resumable(plan)
    return plan


def _check_resumable(plan: SweepPlan) -> None:
    """`resume=NAME` continues a sweep of this storage with the same search: the same command line plus resume=."""
    import json

    stored = plan.sweep_dir / IDENTITY_FILE
    if not (plan.sweep_dir / "tune").is_dir() or not stored.is_file():
        raise ConfigError("resume", plan.run_name, f"no sweep named {plan.run_name!r} under trainer.storage_path={plan.base_plan.storage_path}")
    before = json.loads(stored.read_text())  # data: only compared, never run
    now = json.loads(json.dumps(plan.identity(), default=str))
    changed = sorted(key for key in set(before) | set(now) if before.get(key) != now.get(key))
    if changed:
        raise ConfigError(
            "resume", plan.run_name,
            f"the sweep was started with other settings ({', '.join(changed)} differ); repeat its command line with resume={plan.run_name}",
        )


SWEEP_LEVEL = ("sweep", "hydra", "name", "resume")  # command-line keys that pick or name the sweep, not its trials


def base_overrides(sweep: Mapping[str, Any], command_line: Sequence[str]) -> list[str]:
    """The base recipe's overrides: sweep.overrides, then the command line's (which win), minus sweep-level keys."""
    kept = [o for o in command_line if _top_key(o) not in SWEEP_LEVEL]
    return [*sweep["overrides"], *kept]


def plan_sweep(
    sweep: Mapping[str, Any],
    command_line: Sequence[str],
    cwd: Optional[Path] = None,
    source: Optional[ConfigSource] = None,
    paths_here: bool = True,
) -> SweepPlan:
    """Compose the base recipe (from conf/ and `source`'s directory, default ./conf) and plan the sweep."""
    from hydra.errors import HydraException

    overrides = base_overrides(sweep, command_line)
    resume = next((o.split("=", 1)[1] for o in command_line if _top_key(o) == "resume" and "=" in o), None)
    try:
        base = compose(overrides, source if source is not None else ConfigSource.for_directory(cwd))
    except (OmegaConfBaseException, HydraException) as error:
        raise ConfigError("sweep.overrides", overrides, str(error).splitlines()[0]) from error
    return build_sweep_plan(sweep, base.cfg, base.choices, overrides, cwd, paths_here, resume=resume or None, source=source)


HYDRA_FLAGS_WITH_VALUE = ("--config-dir", "-cd", "--config-name", "-cn", "--config-path", "-cp")


def split_sweep_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """`orch sweep` arguments → (what composes the sweep section: flags, sweep=..., sweep.*; with sweep=default
    unless one is named) and (the base recipe's overrides)."""
    sweep_level, rest = [], []
    arguments = iter(argv)
    for argument in arguments:
        if argument in HYDRA_FLAGS_WITH_VALUE:
            sweep_level += [argument, next(arguments, "")]
        elif argument.startswith("-") or _top_key(argument) in ("sweep", "hydra"):
            sweep_level.append(argument)
        else:
            rest.append(argument)
    if not any(_top_key(a) == "sweep" and "=" in a and a.split("=", 1)[0].lstrip("+~") == "sweep" for a in sweep_level):
        sweep_level.append("sweep=default")
    return sweep_level, rest


OBJECTIVES_ARGUMENT = "sweep.objectives="


def split_objectives(arguments: Sequence[str]) -> tuple[list[str], list[Any]]:
    """Command-line arguments → (those for Hydra) and the values of `sweep.objectives=...`, in order. orch sets
    them itself: Hydra merges a mapping into the sweep config's own (`{a: max}` over `{b: min}` is both), where a
    new set of objectives must replace it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    rest, values = [], []
    for argument in arguments:
        if not argument.lstrip("+").startswith(OBJECTIVES_ARGUMENT):
            rest.append(argument)
            continue
        text = argument.split("=", 1)[1]
        try:
            values.append(OverridesParser.create().parse_override(f"value={text}").value())
        except HydraException as error:
            raise ConfigError("sweep.objectives", text, f"expected a mapping in Hydra's value syntax, e.g. {{val_accuracy: max, loss: min}} "
                                                        f"(quote the whole argument for the shell): {str(error).splitlines()[0]}") from None
    return rest, values


def _top_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~").split(".", 1)[0]


def plan_sweep_from_overrides(overrides: Sequence[str], cwd: Optional[Path] = None, paths_here: bool = True) -> SweepPlan:
    """`orch sweep [overrides]` without the command line: picks sweep=default unless an override names one."""
    from orchestrator.sweep.space import apply_space_edits, split_space_edits

    sweep_level, overrides = split_sweep_overrides(overrides)
    sweep_level, edits = split_space_edits(sweep_level)
    sweep_level, objectives = split_objectives(sweep_level)
    source = ConfigSource.for_directory(cwd)
    cfg = compose(sweep_level, source).cfg
    if cfg.sweep is None:
        raise ConfigError("sweep", None, "pick a sweep: sweep=<name> (conf/sweep/)")
    sweep = OmegaConf.to_container(cfg.sweep, resolve=True, enum_to_str=True)
    assert isinstance(sweep, dict)
    sweep["space"] = apply_space_edits(sweep["space"], edits)
    if objectives:
        sweep["objectives"] = objectives[-1]
    return plan_sweep(sweep, overrides, cwd, source, paths_here)
