"""One layering, read from the source: a module imports only from its own package or from layers below it.

    cli → plan_view → sweep → pipeline → stage_runner → launch, track → recipes → train → artifacts → compress → plan
      → memory → models, data → config → timeline

A sweep's trials can be pipelines (`orch sweep` with recipe=pipeline), so sweep sits above pipeline; a pipeline
knows nothing of sweeps. Packages that share a layer (launch and track; models and data) do not import each other. The
recipes are loaded by name (`recipe.name`) and never imported by the library. Lazy imports inside functions count the
same as top-level ones: a back-edge is a back-edge wherever it is written.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LAYERS: list[set[str]] = [
    {"cli"},
    {"plan_view"},
    {"sweep"},
    {"pipeline"},
    {"stage_runner"},
    {"launch", "track"},
    {"recipes"},
    {"train"},
    {"artifacts"},
    {"compress"},
    {"plan"},
    {"memory"},
    {"models", "data"},
    {"config", "conf"},
    {"timeline", "environment"},
]
RANK = {package: rank for rank, packages in enumerate(LAYERS) for package in packages}


def _modules() -> dict[str, Path]:
    modules = {}
    for path in (REPO / "orchestrator").rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in (REPO / "recipes").glob("*.py"):
        name = "orchestrator.recipes" if path.stem == "__init__" else f"orchestrator.recipes.{path.stem}"
        modules[name] = path
    return modules


def _imports(path: Path, module: str) -> set[str]:
    found = set()
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("orchestrator"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base == "orchestrator":  # `from orchestrator import timeline`: the names are modules
                found.update(f"orchestrator.{alias.name}" for alias in node.names)
            elif base.startswith("orchestrator"):
                found.add(base)
    return found


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_library_package_has_a_layer():
    packages = {_top(module) for module in _modules()} - {""}
    assert packages <= set(RANK), f"give these a layer in LAYERS: {sorted(packages - set(RANK))}"


def test_imports_only_go_down():
    back_edges = []
    for module, path in sorted(_modules().items()):
        source = _top(module)
        if not source:
            continue
        for imported in sorted(_imports(path, module)):
            target = _top(imported)
            if not target or target == source:
                continue
            if RANK[target] <= RANK[source]:
                back_edges.append(f"{module} imports {imported} ({source} is layer {RANK[source]}, {target} is {RANK[target]})")
    assert not back_edges, "imports against the layering:\n" + "\n".join(back_edges)


def test_the_library_never_imports_a_recipe():
    offenders = [
        module
        for module, path in _modules().items()
        if _top(module) != "recipes" and any(_top(imported) == "recipes" for imported in _imports(path, module))
    ]
    assert not offenders, f"these import orchestrator.recipes; load a recipe by name instead: {offenders}"


def test_the_checker_sees_a_back_edge(tmp_path):
    # the test above must be able to fail: an import of the CLI from train/ is reported
    fake = tmp_path / "steps.py"
    fake.write_text("from orchestrator.cli import main\nfrom orchestrator import timeline\n")
    assert _imports(fake, "orchestrator.train.steps") == {"orchestrator.cli", "orchestrator.timeline"}
    assert RANK[_top("orchestrator.cli")] < RANK[_top("orchestrator.train.steps")]
