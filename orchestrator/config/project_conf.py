"""A project's own `./conf` first on Hydra's search path, so its YAMLs override shipped options of the same name
(conf/model/mlp.yaml replaces orch's) as well as adding new ones.

Hydra's `--config-dir` and `hydra.searchpath` both place a directory *after* the primary config's, where a file of
the same name never wins; a SearchPathPlugin is Hydra's way to put one in front. Registered with Hydra's plugin
registry (rather than shipped under `hydra_plugins/`, which Hydra cannot scan in an editable install) by
`use_project_conf()`, which every composition of orch calls first: `orch run` / `orch sweep` (hydra.main) and
`orchestrator.config.compose` (plan, pipeline stages, sweep trials, submit, the Python API).
"""

from __future__ import annotations

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class ProjectConfFirst(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        from orchestrator.config import user_config_dir

        project = user_config_dir()
        if project is not None:
            search_path.prepend(provider="orchestrator-project", path=f"file://{project}")


def use_project_conf() -> None:
    from hydra.core.plugins import Plugins

    Plugins.instance().register(ProjectConfFirst)  # a no-op once registered
