"""What configs exist, with a line of description each (`orch ls`), and copying a shipped one to edit (`orch cp`).

Read from the YAML files themselves, shipped `conf/` first and the project's `./conf` after (which adds options or
overrides shipped ones): the description is the first comment line, which every shipped YAML has (it opens with
what the option is, then the commands that use it).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Optional

from orchestrator.config import CONFIG_MODULE, ConfigSource
from orchestrator.config.validate import ConfigError

HIDDEN_GROUPS = ("schema",)  # typed schemas registered in code, not options to pick


@dataclass(frozen=True)
class Option:
    group: str
    name: str
    description: str
    path: Path
    shipped: bool  # False: from the project's own ./conf


def shipped_conf() -> Path:
    return Path(str(resources.files(CONFIG_MODULE)))


def description(path: Path) -> str:
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            return stripped.lstrip("#").strip()
        if stripped:
            break
    return ""


def options(source: Optional[ConfigSource] = None) -> dict[str, dict[str, Option]]:
    """group -> option name -> Option; a project's option of the same name replaces the shipped one."""
    source = source if source is not None else ConfigSource.for_directory()
    found: dict[str, dict[str, Option]] = {}
    for root, shipped in ((shipped_conf(), True), *((d, False) for d in source.directories())):
        for path in sorted(root.glob("*/*.yaml")):
            group = path.parent.name
            if group not in HIDDEN_GROUPS:
                found.setdefault(group, {})[path.stem] = Option(group, path.stem, description(path), path, shipped)
    return {group: dict(sorted(opts.items())) for group, opts in sorted(found.items())}


def find(reference: str, source: Optional[ConfigSource] = None) -> Option:
    """`GROUP/OPTION` (or `GROUP=OPTION`) -> the Option; ConfigError naming what exists otherwise."""
    group, sep, name = reference.replace("=", "/", 1).partition("/")
    catalogue = options(source)
    if not sep or group not in catalogue:
        raise ConfigError("GROUP/OPTION", reference, f"expected a group/option, groups: {', '.join(catalogue)}")
    if name not in catalogue[group]:
        raise ConfigError(f"{group}/OPTION", name, f"expected one of: {', '.join(catalogue[group])}")
    return catalogue[group][name]


def _shipped(group: str, name: str, reference: str) -> Option:
    path = shipped_conf() / group / f"{name}.yaml"
    if group in HIDDEN_GROUPS or not path.is_file():
        shipped = {g: [n for n, opt in o.items() if opt.shipped] for g, o in options(ConfigSource(None)).items()}
        raise ConfigError("GROUP/OPTION", reference, "expected a shipped option: " + "; ".join(
            f"{g}/{{{','.join(names)}}}" for g, names in shipped.items() if names))
    return Option(group, name, description(path), path, True)


def copy_option(reference: str, destination: Optional[Path] = None, cwd: Optional[Path] = None) -> Path:
    """Copy a shipped option into `./conf/GROUP/` (or `destination`), ready to edit; never overwrites a file."""
    cwd = cwd or Path.cwd()
    group, _, name = reference.replace("=", "/", 1).partition("/")
    option = _shipped(group, name, reference)
    target = destination if destination is not None else cwd / "conf" / option.group / f"{option.name}.yaml"
    if target.is_dir():
        target = target / f"{option.name}.yaml"
    if target.exists():
        raise ConfigError("dest", str(target), "already exists; orch cp never overwrites a file: remove it or name another")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(option.path, target)
    return target
