"""Secrets by reference: a credential reaches orch's processes as a file path (`NAME_FILE`, e.g. a mounted Kubernetes
Secret) or from the machine's own environment, never as a value in a Ray runtime_env, a param or a logged config.

Ray keeps a job's and an actor's runtime_env in its state, where anyone who can list jobs (`ray job list`, the
dashboard) reads it in plain text; MLflow params and `config/resolved.yaml` are readable by everyone with access to
the experiment. So orch forwards the *path* of a secret file and each process that needs the value (the job's driver,
rank 0, which logs metrics) reads it itself.
"""

from __future__ import annotations

import os
import re
from typing import Any, MutableMapping

# Credentials orch itself uses; their `<NAME>_FILE` forms are what is forwarded to jobs and workers.
SECRET_ENV = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
# An environment variable with such a name holds a secret: never sent as a value (`orch submit --env`).
SECRET_NAME = re.compile(r"PASSWORD|PASSWD|TOKEN|SECRET|CREDENTIAL|PRIVATE|(^|_)KEY($|_)|API_?KEY", re.IGNORECASE)
REDACTED = "<redacted>"


def looks_secret(name: str) -> bool:
    return bool(SECRET_NAME.search(name)) and not name.endswith("_FILE")


def load_secret_files(environ: MutableMapping[str, str] = os.environ) -> None:
    """For each credential orch uses that is not set but whose `<NAME>_FILE` is, read the file into `<NAME>` of this
    process's environment, where MLflow's client reads it. A missing file is left to MLflow's own error."""
    for name in SECRET_ENV:
        path = environ.get(f"{name}_FILE")
        if name not in environ and path and os.path.isfile(path):
            with open(path, encoding="utf-8") as handle:
                environ[name] = handle.read().strip()


def redacted(config: Any) -> Any:
    """The resolved config as it may be recorded: `cluster.env` values (any of which may be a credential) replaced by
    REDACTED, names kept. A new dict; the config the workers get is unchanged."""
    if not isinstance(config, dict) or not isinstance(config.get("cluster"), dict) or not config["cluster"].get("env"):
        return config
    cluster = {**config["cluster"], "env": {name: REDACTED for name in config["cluster"]["env"]}}
    return {**config, "cluster": cluster}
