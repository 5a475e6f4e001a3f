"""`orch`: the command line. Thin: Hydra owns config composition and overrides; the work lives in the library.

    orch run [--plan] [-v] [key=value ...]   train (Hydra overrides; -m for multirun; --help lists the config groups)
    orch plan [key=value ...]            validate and print the plan; starts nothing
    orch sweep [sweep=NAME] [key=value ...]  hyperparameter search on Ray Tune (conf/sweep/); resume=RUN continues one
    orch eval MODEL [key=value ...]      evaluate a model on a data config's validation split (driver, no Ray)
    orch ui [--port 5000]                MLflow UI for the local store (loopback unless --insecure-public)
    orch submit|status|logs|stop|list    Ray Jobs on a cluster
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional

from orchestrator.cli.output import fail, print_json

if TYPE_CHECKING:
    from orchestrator.config import ConfigSource
    from orchestrator.launch.ray_session import KeptLocalRay

USAGE = """usage: orch <command> [options] [key=value ...]

commands:
  run     train a recipe on Ray workers with DeepSpeed, tracked in MLflow (orch run --help lists config groups)
  plan    validate a config and print what `orch run` would do, without starting anything
  sweep   hyperparameter search (Ray Tune): sweep=<name> from conf/sweep/, each trial a run and an MLflow child run
  eval    MODEL [key=value ...]: evaluate a model (run id, runs:/ or models:/ URI, model folder) on data=...'s
          validation split, on this machine's CPU, as an MLflow run (sugar for orch run recipe=evaluate recipe.input=MODEL)
  ui      start the MLflow UI for the local tracking store
  submit  ship this directory and `orch run [key=value ...]` to a Ray cluster as a job; prints the job id
  status  JOB       a job's state          logs JOB [--follow] [--tail N]   its driver's output
  stop    JOB       stop a job             list                  the cluster's jobs
  ls      [GROUP]   the config groups and options, one line each   cp GROUP/OPTION [DEST]   copy one to ./conf to edit

  --json (plan, run, sweep, submit, status, list): one JSON document on stdout for scripts
  -v, --verbose (run, sweep): show Ray's, DeepSpeed's and MLflow's output live instead of in the run's log file
  orch --install-completion [bash|zsh]: print the shell completion script (eval "$(orch --install-completion)")

examples:
  orch run
  orch run model=cnn trainer.zero_stage=2 trainer.max_steps=200
  orch plan trainer.zero_stage=3 trainer.precision=bf16
  orch sweep                                   # the demo search on digits (conf/sweep/default.yaml)
  orch sweep sweep.num_samples=8 sweep.search=random
  orch sweep 'sweep.space.trainer.optimizer.lr={uniform: [1e-3, 1e-2]}' '~sweep.space.model.hidden_sizes'
  orch eval models:/digits-mlp@newest data=digits
  orch ui
  orch submit --address http://HEAD:8265 trainer.num_workers=8 trainer.storage_path=/mnt/shared/orch_runs
"""

HYDRA_COMMANDS = ("run", "plan", "sweep")
JOB_COMMANDS = ("submit", "status", "logs", "stop", "list")


@dataclass
class _Mode:
    """What the command line asked for beyond the config: handed to the Hydra task function, never kept globally."""

    source: "ConfigSource"
    plan_only: bool = False
    json: bool = False
    verbose: bool = False  # libraries' output live on the terminal, not in the run's log file
    sweep: bool = False
    sweep_overrides: list[str] = field(default_factory=list)
    space_edits: list[tuple] = field(default_factory=list)
    objectives: list[Any] = field(default_factory=list)  # sweep.objectives=... values, set by orch (sweep/plan.py)
    kept_ray: Optional["KeptLocalRay"] = None  # a multirun's jobs share one local Ray


def _app(cfg, mode: _Mode, choices: Optional[dict] = None, overrides: Optional[list[str]] = None) -> None:
    """The Hydra task function's body. `choices` and `overrides` come from Hydra's runtime when not given."""
    from omegaconf.errors import OmegaConfBaseException

    from orchestrator.config import Composed
    from orchestrator.config.validate import ConfigError
    from orchestrator.pipeline.plan import build_run_plan
    from orchestrator.plan_view import plan_document, print_plan

    if choices is None or overrides is None:
        from hydra.core.hydra_config import HydraConfig

        runtime = HydraConfig.get()
        choices = dict(runtime.runtime.choices) if choices is None else choices
        overrides = list(runtime.overrides.task) if overrides is None else overrides
    if mode.sweep:
        _sweep(cfg, mode)
        return
    try:
        plan = build_run_plan(Composed(cfg, {str(k): str(v) for k, v in choices.items()}), overrides, source=mode.source)
    except ConfigError as error:
        fail(str(error))
    except OmegaConfBaseException as error:
        fail(str(error).replace("\n", "\n    "))
    if mode.plan_only:
        if mode.json:
            print_json(plan_document(plan))
        else:
            print_plan(plan)
        return
    _train(plan, mode)


def _compose_once(overrides: list[str], mode: _Mode) -> None:
    """`orch run|plan|sweep` without Hydra's flags: compose through orch's one composition function, once, and run.

    hydra.main composes every config twice (once only to read `hydra.mode`) and reports a bad override in several
    lines with a hint to use `+`; here it is one line naming the key with the closest existing name. Hydra's flags
    (-m, --cfg, --info, -sc, --config-name ...) still go through hydra.main. A run gets Hydra's job logging as
    hydra.main would configure it.
    """
    from orchestrator.config.overrides import explain

    try:
        composed = mode.source.compose(overrides)
    except Exception as error:  # noqa: BLE001 - Hydra's composition errors: one line naming the key
        fail(explain(error, _default_config(mode)))
    if not mode.plan_only and composed.hydra is not None:
        from hydra.core.utils import configure_log

        configure_log(composed.hydra.job_logging, composed.hydra.verbose)
    _app(composed.cfg, mode, composed.choices, overrides)


def _default_config(mode: _Mode):
    """The config without overrides, where a did-you-mean looks up the keys that exist (None if even that fails)."""
    try:
        return mode.source.compose(["sweep=default"] if mode.sweep else []).cfg
    except Exception:  # noqa: BLE001 - no suggestion then
        return None


def _train(plan, mode: _Mode) -> None:
    from orchestrator.config.validate import ConfigError
    from orchestrator.launch.run_log import run_log_path
    from orchestrator.pipeline.plan import PipelinePlan
    from orchestrator.plan_view import print_summary
    from orchestrator.track.mlflow_run import check_tracking_reachable

    from orchestrator.launch.ray_job import check_durable_in_ray_job

    try:
        check_durable_in_ray_job(plan.storage_path, plan.tracking)
        check_tracking_reachable(plan.tracking.uri)
    except ConfigError as error:
        fail(str(error))
    console = _console(mode)
    log_file = None if mode.verbose else run_log_path(plan.storage_path, plan.run_name)
    console.print(f"[bold]orch[/bold] run [cyan]{plan.run_name}[/cyan] → MLflow {plan.tracking.uri}")
    _print_log_line(console, log_file)
    try:
        with _quiet(log_file):
            if mode.kept_ray is not None:
                from orchestrator.stage_runner import needs_ray

                clusters = [stage.config["cluster"] for stage in plan.stages if needs_ray(stage)]
                if clusters:
                    mode.kept_ray.use(clusters[0])
            if isinstance(plan, PipelinePlan):
                from orchestrator.pipeline.runner import run_pipeline

                results = run_pipeline(plan, console, log_file=log_file)
            else:
                from orchestrator.stage_runner import run_plan

                results = run_plan(plan, console, log_file=log_file)
    except ConfigError as error:
        fail(str(error))
    except KeyboardInterrupt:
        fail("interrupted; the run is marked KILLED in MLflow. Continue it with resume=" + plan.run_name, 130)
    except Exception as error:  # noqa: BLE001 - a training failure: one clear line, details are in the logs
        from ray.train import TrainingFailedError

        from orchestrator.train.steps import TrainingDiverged

        logs = f"; its log: {log_file}" if log_file else ""
        if isinstance(error, TrainingDiverged):
            fail(f"training diverged: {error}; the run is marked FAILED in MLflow{logs}", 1)
        if isinstance(error, TrainingFailedError):
            fail(f"training failed: {error}\nthe run is marked FAILED in MLflow{logs}; fix and continue with resume={plan.run_name}", 1)
        raise
    if mode.json:
        print_json([asdict(result) for result in results])
    else:
        print_summary(results, console)


def _console(mode: _Mode):
    """orch's own lines: bound to the terminal now, so that they stay there while a quiet run routes the libraries'
    output to its log file. Long paths and run ids stay on one line, copyable; with --json stdout holds the JSON
    document alone."""
    from rich.console import Console

    return Console(file=sys.stderr if mode.json else sys.stdout, soft_wrap=True)


def _print_log_line(console, log_file: Optional[Path]) -> None:
    if log_file is not None:
        console.print(f"logs: {log_file}  (Ray, DeepSpeed, MLflow; -v shows them here)", highlight=False)


def _quiet(log_file: Optional[Path]):
    from contextlib import nullcontext

    from orchestrator.launch.run_log import quiet_terminal

    return nullcontext() if log_file is None else quiet_terminal(log_file)


def _sweep(cfg, mode: _Mode) -> None:
    from omegaconf import OmegaConf

    from orchestrator.config.validate import ConfigError
    from orchestrator.sweep.plan import plan_sweep
    from orchestrator.sweep.space import apply_space_edits

    if cfg.get("sweep") is None:
        fail("sweep=None: pick a sweep with sweep=<name> (conf/sweep/)")
    sweep = OmegaConf.to_container(cfg.sweep, resolve=True, enum_to_str=True)
    try:
        sweep["space"] = apply_space_edits(sweep["space"], mode.space_edits)
        if mode.objectives:
            sweep["objectives"] = mode.objectives[-1]
        plan = plan_sweep(sweep, mode.sweep_overrides, source=mode.source)
    except ConfigError as error:
        fail(str(error))
    if mode.plan_only and mode.json:
        print_json({"name": plan.name, "num_samples": plan.num_samples, "search": plan.search, "scheduler": plan.scheduler,
                    "metric": plan.metric, "mode": plan.mode, "objectives": plan.objectives, "space": {d.key: d.describe() for d in plan.dimensions},
                    "overrides": plan.overrides, "shared_stages": plan.shared_stages})
        return
    if mode.plan_only:
        print(f"sweep {plan.name}: {plan.num_samples} trial(s), search={plan.search}, scheduler={plan.scheduler['name']}, "
              + (f"objectives={', '.join(f'{m} ({d})' for m, d in plan.objectives.items())}" if plan.objectives
                 else f"metric={plan.metric} ({plan.mode})"))
        for dim in plan.dimensions:
            print(f"  {dim.key}: {dim.describe()}")
        print("base recipe: orch run " + " ".join(plan.overrides))
        if plan.shared_stages:
            print("stages every trial shares (run once, before the trials): " + ", ".join(plan.shared_stages))
        return
    from orchestrator.launch.run_log import run_log_path
    from orchestrator.sweep.runner import print_outcome, run_sweep
    from orchestrator.track.mlflow_run import check_tracking_reachable

    from orchestrator.launch.ray_job import check_durable_in_ray_job

    try:
        check_durable_in_ray_job(plan.base_plan.storage_path, plan.base_plan.tracking)
        check_tracking_reachable(plan.base_plan.tracking.uri)
    except ConfigError as error:
        fail(str(error))
    console = _console(mode)
    log_file = None if mode.verbose else run_log_path(plan.base_plan.storage_path, plan.run_name)
    _print_log_line(console, log_file)
    try:
        with _quiet(log_file):
            outcome = run_sweep(plan, console, log_file=log_file)
    except ConfigError as error:
        fail(str(error))
    except KeyboardInterrupt:
        fail(f"interrupted; the sweep's parent run is marked KILLED in MLflow. Continue it with the same command and resume={plan.run_name}", 130)
    if mode.json:
        print_json(asdict(outcome))
    else:
        print_outcome(outcome, plan.metric, console)
    if outcome.best is None and not outcome.front:
        sys.exit(1)


def _run_hydra(command: str, argv: list[str]) -> None:
    import hydra

    from orchestrator.config import CONFIG_MODULE, ConfigSource

    if argv and argv[0] in ("--help", "-h"):
        _print_run_help(command)
        return
    plan_only = command == "plan" or "--plan" in argv
    as_json = "--json" in argv
    verbose = any(arg in ("-v", "--verbose") for arg in argv)
    argv = [arg for arg in argv if arg not in ("--plan", "--json", "-v", "--verbose")]
    given_dir = _config_dir_flag(argv)
    source = ConfigSource(Path(given_dir).resolve()) if given_dir else ConfigSource.for_directory()
    mode = _Mode(source=source, plan_only=plan_only, json=as_json, verbose=verbose, sweep=command == "sweep")
    if command == "sweep":
        # the sweep section is composed here; the trials' overrides (recipe=distill recipe.distill.teacher=...)
        # make sense on the sweep's base recipe, which the sweep composes itself
        from orchestrator.config.validate import ConfigError
        from orchestrator.sweep.plan import split_objectives, split_sweep_overrides
        from orchestrator.sweep.space import split_space_edits

        argv, mode.sweep_overrides = split_sweep_overrides(argv)
        try:  # sweep.space.KEY=... has a dotted KEY, which Hydra's grammar cannot express: orch applies it
            argv, mode.space_edits = split_space_edits(argv)
            argv, mode.objectives = split_objectives(argv)
        except ConfigError as error:
            fail(str(error))
    if not any(arg.startswith("-") for arg in argv):
        _compose_once(argv, mode)
        return
    from orchestrator.config.overrides import normalize

    argv = normalize(argv)
    sys.argv = [f"orch {command}", *argv]
    from orchestrator.config.project_conf import use_project_conf

    use_project_conf()

    from orchestrator.launch.ray_session import KeptLocalRay

    kept_ray = KeptLocalRay()

    def task(cfg) -> None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.get().mode == RunMode.MULTIRUN:
            mode.kept_ray = kept_ray
        _app(cfg, mode)

    try:
        hydra.main(config_path=f"pkg://{CONFIG_MODULE}", config_name="config", version_base="1.3")(task)()
    finally:
        kept_ray.close()


def _config_dir_flag(argv: list[str]) -> Optional[str]:
    """The value of Hydra's --config-dir/-cd flag, if given (also as --config-dir=DIR)."""
    for index, arg in enumerate(argv):
        for flag in ("--config-dir", "-cd"):
            if arg == flag and index + 1 < len(argv):
                return argv[index + 1]
            if arg.startswith(flag + "="):
                return arg.split("=", 1)[1]
    return None


def _print_run_help(command: str) -> None:
    from orchestrator.config import config_groups

    print(f"usage: orch {command} [--plan] [-v] [-m] [key=value ...]   (Hydra overrides; `orch plan` prints the resolved config)\n")
    print("  -v, --verbose: Ray's, DeepSpeed's and MLflow's output live, instead of in the run's log file\n")
    print("config groups (choose one option each, e.g. model=cnn):")
    for group, options in config_groups().items():
        print(f"  {group}: {', '.join(options)}")
    print("\nHydra's own flags (--cfg job, --info, --hydra-help, -m ...) work as usual.")


def eval_overrides(argv: list[str]) -> list[str]:
    """`orch eval MODEL [args ...]` as `orch run` arguments: recipe=evaluate recipe.input='MODEL' [args ...]. The
    reference is quoted for Hydra's grammar (models:/NAME@alias holds an '@', a path may hold anything)."""
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: orch eval MODEL [--json] [key=value ...]\n\n"
              "MODEL: an MLflow run id, runs:/<run id>/model, models:/NAME@alias, models:/NAME/VERSION, or a model folder\n"
              "evaluates it on the validation split of data=... (default: the config's data) on this machine's CPU and\n"
              "logs an MLflow run (recipe=evaluate): val_loss and val_accuracy or val_perplexity")
        sys.exit(0 if argv else 2)
    model, rest = argv[0], argv[1:]
    if model.startswith("-") or "=" in model and not Path(model).exists():
        fail(f"orch eval: expected a model reference first (run id, runs:/, models:/ or a folder), got {model!r}")
    quoted = model.replace("'", "\\'")
    return ["recipe=evaluate", f"recipe.input='{quoted}'", *rest]


def _ui(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="orch ui", description="Start the MLflow UI for the local tracking store.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument(
        "--backend-store-uri",
        default=None,
        help="default: MLFLOW_TRACKING_URI, else the local store ./mlflow.db that `orch run` writes",
    )
    parser.add_argument(
        "--insecure-public", action="store_true",
        help="serve on a non-loopback --host although the UI has no authentication: anyone who reaches the port can "
        "read and delete runs",
    )
    args = parser.parse_args(argv)
    if not _loopback(args.host) and not args.insecure_public:
        fail(f"--host={args.host}: the MLflow UI has no authentication, so anyone who reaches {args.host}:{args.port} "
             "can read and delete every run; pass --insecure-public to serve it anyway, or keep the default 127.0.0.1 "
             "and tunnel (ssh -L 5000:127.0.0.1:5000 HOST)")
    uri = args.backend_store_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    if uri.startswith("http"):
        fail(f"the tracking store is a server ({uri}); open it in a browser instead")
    print(f"MLflow UI for {uri}\n  http://{args.host}:{args.port}\n(Ctrl-C to stop)", flush=True)
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host, "--port", str(args.port), "--workers", "1"]
    try:
        sys.exit(subprocess.call(command, env=mlflow_server_environment(os.environ)))
    except KeyboardInterrupt:
        sys.exit(0)


def mlflow_server_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """An MLflow server's environment (`orch ui`'s): without MLflow's job execution unless the user asks for it.

    MLflow 3's server also starts a job runner and seven Huey consumers for its GenAI jobs (scorers, prompt
    optimization), each a Python process that imports MLflow, for jobs orch never submits. Measured on 2 cores: with
    them `orch ui` was 11 processes and 1.2 GB resident once it answered, ~27 CPU-s more; without, 3 processes and
    0.5 GB. `MLFLOW_SERVER_ENABLE_JOB_EXECUTION` set by the user wins.
    """
    return {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **environ}


def _loopback(host: str) -> bool:
    """Whether `host` is only reachable from this machine (localhost, 127.0.0.0/8, ::1)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost may resolve to any interface
        return False


def main(argv: Optional[list[str]] = None) -> None:
    """`orch ... | head` closes the pipe early: end quietly (status 1, as Python's documentation advises and as rich
    does for the commands that print through it) instead of a traceback."""
    try:
        _dispatch(list(sys.argv[1:] if argv is None else argv))
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush must not raise again
        sys.exit(1)


def _dispatch(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    from orchestrator.config.secrets import load_secret_files

    load_secret_files()  # MLFLOW_TRACKING_PASSWORD_FILE=/path (a mounted secret) → the password, in this process only
    if command == "--install-completion":
        from orchestrator.cli.completion import script

        print(script(rest[0] if rest else "bash"))
    elif command in ("ls", "cp"):
        from orchestrator.cli import catalogue

        catalogue.run(command, rest)
    elif command in HYDRA_COMMANDS:
        _run_hydra(command, rest)
    elif command == "eval":
        _run_hydra("run", eval_overrides(rest))
    elif command == "ui":
        _ui(rest)
    elif command in JOB_COMMANDS:
        from orchestrator.cli import jobs

        jobs.run(command, rest)
    else:
        print(USAGE, file=sys.stderr)
        fail(f"unknown command {command!r}; expected one of: run, plan, sweep, eval, ui, submit, status, logs, stop, list, ls, cp")

