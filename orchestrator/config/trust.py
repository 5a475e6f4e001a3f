"""The trust boundary for model configs: what a model.yaml read from a run, a folder or a checkpoint may build.

Your own config is trusted: `model._target_` and the classes you list in `trust.model_targets`. A model config read
from data (an exported model.yaml, a checkpoint's orch_model.yaml, an MLflow run's model artifact) is not: it may
name one allowlisted class and give it plain values, nothing Hydra would turn into a call. Checked here, on the
string alone, before anything is imported; the loaders then build it with `hydra.utils.instantiate`.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

from orchestrator.config.validate import ConfigError

# orch's own models. Hugging Face architectures come only through HFCausalLM's keys (model_type + config, or a local
# pretrained_path), which transformers builds from its own classes: it never runs a model folder's code unless
# trust_remote_code is passed, and orch never passes it.
BUILT_IN_MODEL_TARGETS = (
    "orchestrator.models.mlp.MLP",
    "orchestrator.models.cnn.CNN",
    "orchestrator.models.gpt.GPT",
    "orchestrator.models.hf_causal_lm.HFCausalLM",
)
# Hydra keys that change what instantiate calls or how: positional arguments, a functools.partial instead of the
# object, recursion into nested _target_s.
HYDRA_CALL_KEYS = ("_target_", "_partial_", "_args_", "_recursive_", "_convert_")


def trusted_model_targets(config: Optional[Mapping[str, Any]] = None) -> tuple[str, ...]:
    """The classes a model read from data may be, for a resolved config: orch's own, the model your config names,
    and `trust.model_targets`. Never widened by anything an artifact says."""
    targets = list(BUILT_IN_MODEL_TARGETS)
    if config:
        own = (config.get("model") or {}).get("_target_")
        targets += [own] if isinstance(own, str) else []
        targets += list((config.get("trust") or {}).get("model_targets") or [])
    return tuple(dict.fromkeys(targets))


def checked_model_config(
    cfg: Any, key: str, allowed: Iterable[str] = BUILT_IN_MODEL_TARGETS, origin: Optional[str] = None
) -> dict[str, Any]:
    """`cfg` as a plain dict, if it builds exactly one allowed class from plain values; else a ConfigError on `key`
    (the config key that named the model, e.g. recipe.input, or the file itself). `origin`: the file it came from."""
    allowed = tuple(allowed)
    where = f"the model config in {origin}" if origin and origin != key else "the model config"
    if not isinstance(cfg, Mapping):
        raise ConfigError(key, type(cfg).__name__, f"{where} is not a mapping with a _target_")
    target = cfg.get("_target_")
    if not isinstance(target, str) or target not in allowed:
        raise ConfigError(
            key, target,
            f"{where} names this _target_; a model read from a folder, a run or a checkpoint may only be one of "
            f"{', '.join(allowed)} (your own config can trust more classes: trust.model_targets=[pkg.module.Class])",
        )
    for path, value in _walk(cfg, ""):
        name = path.rsplit(".", 1)[-1]
        if name in HYDRA_CALL_KEYS and path != "_target_":
            raise ConfigError(
                key, path,
                f"{where} holds the Hydra key {name}: a model read from data builds one allowlisted class from "
                f"plain values, so {', '.join(k for k in HYDRA_CALL_KEYS if k != '_target_')} and nested _target_ "
                "are refused",
            )
        if isinstance(value, str) and "${" in value:
            raise ConfigError(key, path, f"{where} holds an interpolation ({value!r}); a model read from data holds plain values")
    return dict(cfg)


def _walk(node: Any, prefix: str) -> Iterable[tuple[str, Any]]:
    """(dotted path, value) of every key and list item below `node`."""
    items = node.items() if isinstance(node, Mapping) else enumerate(node) if isinstance(node, (list, tuple)) else ()
    for name, value in items:
        path = f"{prefix}.{name}" if prefix else str(name)
        yield path, value
        yield from _walk(value, path)
