"""Packaging: configs and recipes work from an installed (non-editable) package, not only from the source tree;
every third-party package the code imports is declared in pyproject.toml; the test extra carries the k8s/ tools."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
# Code whose imports must be declared in [project] dependencies (benchmarks/ is not installed, but runs from a
# clone with the project's own dependencies).
SOURCE_DIRS = ("orchestrator", "recipes", "benchmarks")
FIRST_PARTY = {"orchestrator", "recipes", "benchmarks", "conf"}


def test_installed_wheel_composes_plans_and_finds_its_recipe(tmp_path):
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(REPO)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    [wheel] = wheels.glob("orchestrator-*.whl")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    code = (
        "import orchestrator, importlib; from pathlib import Path\n"
        "from orchestrator.config import compose\n"
        "from orchestrator.plan import build_plan\n"
        "plan = build_plan(compose(['model=gpt', 'data=text']), cwd=Path.cwd())\n"
        "importlib.import_module('orchestrator.recipes.' + plan.stages[0].recipe)\n"
        "print(orchestrator.__file__); print(plan.stages[0].config['data']['path'])\n"
    )
    # from an empty directory, with the installed copy first on the path (ahead of any editable install)
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    module_file, sample_path = out.stdout.split()
    assert module_file.startswith(str(target)) and sample_path.startswith(str(target))
    assert Path(sample_path).is_file()


def _requirements(extra: str | None = None) -> dict[str, Requirement]:
    reqs = PYPROJECT["dependencies"] if extra is None else PYPROJECT["optional-dependencies"][extra]
    return {canonicalize_name(r.name): r for r in map(Requirement, reqs)}


def _guarded(tree: ast.AST) -> set[ast.AST]:
    """Import nodes inside `try: ... except ImportError/ModuleNotFoundError`: optional, need not be declared."""
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try):
            names = set()
            for handler in node.handlers:
                for t in handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]:
                    if isinstance(t, ast.Name):
                        names.add(t.id)
            if names & {"ImportError", "ModuleNotFoundError"}:
                guarded.update(n for stmt in node.body for n in ast.walk(stmt))
    return guarded


def third_party_imports(*dirs: str) -> dict[str, set[str]]:
    """Top-level modules imported anywhere (module level or inside functions) under dirs, neither standard library
    nor first party: {module: {files}}."""
    found: dict[str, set[str]] = {}
    for d in dirs:
        for path in sorted((REPO / d).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            guarded = _guarded(tree)
            for node in ast.walk(tree):
                if node in guarded:
                    continue
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in FIRST_PARTY:
                        found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return found


def test_every_imported_third_party_package_is_declared():
    imports = third_party_imports(*SOURCE_DIRS)
    assert {"torch", "yaml", "ray"} <= set(imports), sorted(imports)  # the scan sees imports at all
    declared = set(_requirements())
    distributions = importlib.metadata.packages_distributions()
    problems = []
    for module, files in sorted(imports.items()):
        dists = {canonicalize_name(d) for d in distributions.get(module, [])}
        where = ", ".join(sorted(files)[:3])
        if not dists:
            problems.append(f"{module} (imported in {where}) is not installed, so not declared either")
        elif not dists & declared:
            problems.append(f"{module} (imported in {where}) comes from {sorted(dists)}, not in [project] dependencies")
    assert not problems, "add to pyproject.toml's dependencies:\n" + "\n".join(problems)


def test_declared_lower_bounds_admit_the_installed_versions():
    # the environment the tests run in satisfies every declared range (bounds follow what is tested)
    bad = []
    for name, req in {**_requirements(), **_requirements("test")}.items():
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            bad.append(f"{req}: not installed")
            continue
        if not req.specifier.contains(version, prereleases=True):
            bad.append(f"{req}: installed {version}")
    assert not bad, "\n".join(bad)


def test_test_extra_carries_the_k8s_validation_tools():
    # k8s/requirements-validate.txt (k8s/README.md installs it on its own) and the test extra must not drift apart
    text = (REPO / "k8s" / "requirements-validate.txt").read_text()
    lines = [re.sub(r"\s+#.*", "", line).strip() for line in text.splitlines()]
    wanted = [Requirement(line) for line in lines if line and not line.startswith("#")]
    assert wanted
    have = {**_requirements(), **_requirements("test")}
    for req in wanted:
        name = canonicalize_name(req.name)
        assert name in have, f"{req} (k8s/requirements-validate.txt) is missing from the test extra"
        assert have[name].specifier == req.specifier, f"{have[name]} in pyproject.toml, {req} in requirements-validate"
