"""Command-line overrides as users write them, and composition errors as one line with a did-you-mean.

Free-form mappings (`trainer.deepspeed`, `cluster.env`, `sweep.space`) are typed `Dict[str, Any]` in the schema, and a
plain Hydra override of one (`trainer.deepspeed={zero_optimization: {overlap_comm: true}}`) fails in struct mode
("not in struct", with a hint to use `+`). orch writes such overrides as Hydra's force-add (`++KEY=VALUE`), which
merges the value in, as the README documents; every other key keeps Hydra's strict rules, so a typo is an error.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Optional, Sequence

FREE_FORM = ("trainer.deepspeed", "cluster.env", "sweep.space")


def normalize(overrides: Sequence[str]) -> list[str]:
    normalized = []
    for override in overrides:
        key = override.split("=", 1)[0]
        free = any(key == f or key.startswith(f + ".") for f in FREE_FORM)
        normalized.append(f"++{override}" if free and "=" in override and not key.startswith(("+", "~")) else override)
    return normalized


def explain(error: BaseException, cfg: Any = None) -> str:
    """One line for a composition error: the key or option, what is wrong, and the closest names that exist.

    `cfg`: a composed config to look the existing keys up in (a default composition will do)."""
    text = f"{error}\n{error.__cause__ or ''}"
    yaml_file = re.search(r'in "([^"]+\.yaml)", line (\d+), column (\d+)', text)
    if yaml_file:  # a YAML of the project's ./conf (or a shipped one) does not parse
        problem = " ".join(line.strip() for line in str(error).splitlines() if not line.strip().startswith("in \""))
        return f"{yaml_file.group(1)}:{yaml_file.group(2)}:{yaml_file.group(3)}: not valid YAML ({problem})"
    if type(error).__name__ == "OverrideParseException":
        override = str(error).splitlines()[0].split(": ", 1)[-1]
        return (f"{override}: not an override Hydra can parse; quote a value holding spaces, quotes or brackets, "
                f"e.g. 'key=\"a value\"' (https://hydra.cc/docs/advanced/override_grammar/basic/)")
    missing_option = re.search(r"Could not find '([^']+)/([^']+)'", text)
    if missing_option:
        group, option = missing_option.groups()
        listed = text.split("Available options", 1)[1].split("Config search path", 1)[0] if "Available options" in text else ""
        available = re.findall(r"^\t(\S+)$", listed, re.M)
        return _line(f"{group}={option}", "no such option", option, available, f"options: {', '.join(available)}" if available else "")
    conversion = re.search(r"Value '([^']*)' of type '(\w+)' could not be converted to (\w+)\s+full_key: (\S+)", text)
    if conversion:
        value, _, wanted, full_key = conversion.groups()
        return f"{full_key}={value}: expected {wanted.lower()}"
    unknown_key = re.search(r"full_key: (\S+)", text)
    if unknown_key and ("not in" in text or "not in struct" in text or "Could not override" in text):
        full_key = unknown_key.group(1)
        parent, _, leaf = full_key.rpartition(".")
        siblings = _keys_at(cfg, parent)
        if siblings is not None and leaf not in siblings:
            return _line(full_key, "no such key", leaf, siblings, "", prefix=f"{parent}." if parent else "")
    first = str(error).splitlines()[0] if str(error) else type(error).__name__
    cause = str(error.__cause__).splitlines()[0] if error.__cause__ is not None else ""
    return f"{first}: {cause}" if cause and cause not in first else first


def _line(key: str, problem: str, name: str, candidates: Sequence[str], extra: str, prefix: str = "") -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    hint = f"; did you mean {prefix}{close[0]}?" if close else ""
    return f"{key}: {problem}{hint}" + (f" ({extra})" if extra else "")


def _keys_at(cfg: Any, path: str) -> Optional[list[str]]:
    from omegaconf import DictConfig, OmegaConf

    if cfg is None:
        return None
    node = OmegaConf.select(cfg, path) if path else cfg
    return [str(k) for k in node.keys()] if isinstance(node, DictConfig) else None
