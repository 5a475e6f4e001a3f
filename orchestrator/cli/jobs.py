"""`orch submit | status | logs | stop | list`: Ray Jobs on a cluster, with the conventions of Ray's own job CLI.

`orch submit` checks on the laptop what lives there (the config composes and plans), prints the job id and returns
(`--no-wait`, the default; `--follow` streams the output and exits with the job's outcome, as `ray job submit` does
without `--no-wait`). `orch status` exits 1 for a FAILED or STOPPED job, so scripts can branch on it. `--json` on
submit, status and list prints one JSON document instead of text.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from orchestrator.cli.output import fail, print_json

UNSUCCESSFUL = ("FAILED", "STOPPED")


def parser_for(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"orch {command}")
    parser.add_argument("--address", default=None, help="Ray job server, http://HEAD:8265 (default: RAY_ADDRESS)")
    if command in ("submit", "status", "list"):
        parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    if command == "submit":
        parser.add_argument("--env", action="append", default=[], metavar="NAME", help="pass this variable to the job")
        wait = parser.add_mutually_exclusive_group()
        wait.add_argument("--follow", action="store_true", help="stream the job's output; exit with its outcome")
        wait.add_argument("--no-wait", action="store_true", help="print the job id and return (the default)")
        parser.add_argument("--sweep", action="store_true", help="run `orch sweep` (conf/sweep/) instead of `orch run`")
        parser.add_argument("-v", "--verbose", action="store_true",
                            help="the job's run shows Ray's, DeepSpeed's and MLflow's output in the job's logs")
        parser.add_argument("overrides", nargs="*", help="key=value config overrides, as for orch run")
    elif command in ("status", "logs", "stop"):
        parser.add_argument("job_id")
        if command == "logs":
            parser.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
            parser.add_argument("--tail", type=int, default=None, metavar="N", help="only the last N lines")
    return parser


def run(command: str, argv: list[str]) -> None:
    from orchestrator.launch import jobs

    # intermixed: overrides may come before and after the options (`orch submit data=digits --address URL x=1`)
    args = parser_for(command).parse_intermixed_args(argv)
    try:
        if command == "submit":
            submit(args)
        elif command == "status":
            info = jobs.client(args.address).get_job_info(args.job_id)
            status = info.status.value
            if args.json:
                print_json({"job_id": args.job_id, "status": status, "message": info.message,
                            "entrypoint": info.entrypoint, "start_time": info.start_time, "end_time": info.end_time})
            else:
                print(f"{args.job_id}: {status}" + (f" ({info.message})" if info.message else ""))
            if status in UNSUCCESSFUL:
                sys.exit(1)
        elif command == "logs":
            if args.follow:
                jobs.follow_logs(args.address, args.job_id)
            else:
                text = jobs.client(args.address).get_job_logs(args.job_id)
                if args.tail is not None:
                    text = "".join(text.splitlines(keepends=True)[-args.tail:] if args.tail > 0 else [])
                print(text, end="")
        elif command == "stop":
            stopped = jobs.stop(args.address, args.job_id)
            print(f"{args.job_id}: {'stop requested' if stopped else 'already finished'}")
        else:
            listed = jobs.client(args.address).list_jobs()
            if args.json:
                print_json([{"job_id": info.submission_id or info.job_id, "status": info.status.value,
                             "entrypoint": info.entrypoint, "start_time": info.start_time} for info in listed])
            for info in listed if not args.json else ():
                print(f"{info.submission_id or info.job_id}\t{info.status.value}\t{info.entrypoint}")
    except jobs.ClusterUnreachable as error:
        fail(str(error))
    except KeyError as error:
        fail(str(error.args[0]))
    except RuntimeError as error:  # the job server's own errors (unknown job id, ...): its message, no traceback
        fail(str(error))


def submit(args: argparse.Namespace) -> None:
    from orchestrator.launch import jobs

    cfg = validate_for_cluster(args.overrides, sweep=args.sweep)
    from orchestrator.config.secrets import SECRET_ENV

    for name in SECRET_ENV:
        if name in os.environ and f"{name}_FILE" not in os.environ:
            print(f"orch: {name} is not sent to the job (its environment is readable by anyone who can list jobs); "
                  f"the cluster needs it as a file, {name}_FILE=/path/on/the/nodes, or in its own environment",
                  file=sys.stderr)
    excludes = jobs.upload_excludes(Path.cwd(), cfg.trainer.storage_path, cfg.tracking.uri)
    job_id = jobs.submit(args.address, args.overrides, args.env, Path.cwd(), command="sweep" if args.sweep else "run",
                         excludes=excludes, verbose=args.verbose)
    if args.json:
        print_json({"job_id": job_id})
    else:
        print(job_id)
        print(f"follow: orch logs {job_id} --follow   status: orch status {job_id}   stop: orch stop {job_id}", file=sys.stderr)
    if args.follow:
        jobs.follow_logs(args.address, job_id)
        status = jobs.client(args.address).get_job_status(job_id).value
        if status != "SUCCEEDED":
            fail(f"job {job_id} ended {status}", 1)


def validate_for_cluster(overrides: list[str], sweep: bool = False) -> Any:
    """Compose and validate locally so a bad key fails here, in a second, not minutes later on the cluster."""
    from omegaconf.errors import OmegaConfBaseException

    from orchestrator.config import ConfigSource
    from orchestrator.config.validate import ConfigError
    from orchestrator.pipeline.plan import build_run_plan

    source = ConfigSource.for_directory()
    try:
        if sweep:
            from orchestrator.sweep.plan import plan_sweep_from_overrides

            cfg = plan_sweep_from_overrides(["cluster=ray", *overrides], paths_here=False).base
        else:
            composed = source.compose(["cluster=ray", *overrides])
            cfg = composed.cfg
            # files and runs the config names live on the cluster: the job's driver checks them at its start
            build_run_plan(composed, overrides, source=source, paths_here=False)
    except ConfigError as error:
        fail(str(error))
    except OmegaConfBaseException as error:
        fail(str(error).replace("\n", "\n    "))
    except Exception as error:  # noqa: BLE001 - Hydra composition errors: one line naming the key, no traceback
        from orchestrator.config.overrides import explain

        fail(explain(error, _default_config(source)))
    if cfg.trainer.storage_path is None:
        fail("trainer.storage_path=None: a cluster job needs storage every node can reach, e.g. "
             "trainer.storage_path=/mnt/shared/orch_runs (NFS) or s3://bucket/orch_runs")
    if cfg.tracking.uri is None and "MLFLOW_TRACKING_URI" not in os.environ:
        fail("tracking.uri=None: a cluster job needs a tracking server it can reach, e.g. "
             "tracking.uri=http://mlflow:5000 (or export MLFLOW_TRACKING_URI)")
    return cfg


def _default_config(source):
    try:
        return source.compose(["cluster=ray"]).cfg
    except Exception:  # noqa: BLE001 - no suggestion then
        return None
