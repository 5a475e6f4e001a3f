"""`orch ls [GROUP] [--json]` and `orch cp GROUP/OPTION [DEST]`: what configs exist, and a copy of one to edit."""

from __future__ import annotations

import argparse
from pathlib import Path

from orchestrator.cli.output import fail, print_json


def run(command: str, argv: list[str]) -> None:
    from orchestrator.config import catalogue
    from orchestrator.config.validate import ConfigError

    parser = argparse.ArgumentParser(prog=f"orch {command}")
    if command == "ls":
        parser.description = "The config groups and their options, with the first comment line of each YAML."
        parser.add_argument("group", nargs="?", help="only this group")
        parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")
        parser.add_argument("--names", action="store_true", help="GROUP=OPTION per line (for shell completion)")
    else:
        parser.description = "Copy a shipped config option into ./conf/GROUP/ (or DEST) to edit; it then overrides the shipped one."
        parser.add_argument("option", metavar="GROUP/OPTION", help="e.g. model/mlp or pipeline/digits_compress")
        parser.add_argument("dest", nargs="?", type=Path, help="a file or directory (default: ./conf/GROUP/OPTION.yaml)")
    args = parser.parse_args(argv)
    try:
        if command == "cp":
            target = catalogue.copy_option(args.option, args.dest)
            print(f"{target}   (edit it; `orch plan` shows what it composes to)")
            return
        groups = catalogue.options()
        if args.group is not None:
            if args.group not in groups:
                raise ConfigError("GROUP", args.group, f"expected one of: {', '.join(groups)}")
            groups = {args.group: groups[args.group]}
    except ConfigError as error:
        fail(str(error))
    if args.json:
        print_json({g: {n: {"description": o.description, "path": str(o.path), "shipped": o.shipped} for n, o in opts.items()}
                    for g, opts in groups.items()})
    elif args.names:
        print("\n".join(f"{group}={name}" for group, opts in groups.items() for name in opts))
    else:
        width = max((len(name) for opts in groups.values() for name in opts), default=0)
        for group, opts in groups.items():
            print(f"{group}:")
            for name, option in opts.items():
                where = "" if option.shipped else "   (./conf)"
                print(f"  {name.ljust(width)}  {option.description}{where}")
