"""Configs and recipes work from an installed (non-editable) package, not only from the source tree."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


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
