"""The command line speaks its ecosystem's conventions: list and copy configs, machine-readable output, completion."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ORCH = [sys.executable, "-m", "orchestrator.cli"]


def orch(cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*ORCH, *args], cwd=cwd, capture_output=True, text=True, timeout=120, env=env)


def test_ls_lists_groups_and_options_with_their_description(tmp_path):
    out = orch(tmp_path, "ls")
    assert out.returncode == 0, out.stderr
    assert "model:" in out.stdout and "pipeline:" in out.stdout and "schema" not in out.stdout
    assert "Multi-layer perceptron over the flattened input." in out.stdout
    listed = json.loads(orch(tmp_path, "ls", "--json").stdout)
    assert set(listed["recipe"]) >= {"train", "prune", "finetune", "distill", "quantize", "pipeline"}
    assert listed["model"]["gpt"]["shipped"] is True
    only = orch(tmp_path, "ls", "sweep").stdout
    assert only.startswith("sweep:") and "model:" not in only
    unknown = orch(tmp_path, "ls", "modle")
    assert unknown.returncode == 2 and "GROUP='modle'" in unknown.stderr and "model" in unknown.stderr


def test_cp_copies_a_shipped_option_that_then_overrides_it_and_never_overwrites(tmp_path):
    copied = orch(tmp_path, "cp", "model/mlp")
    assert copied.returncode == 0, copied.stderr
    target = tmp_path / "conf" / "model" / "mlp.yaml"
    text = target.read_text()
    target.write_text(text.replace("hidden_sizes: [128, 128]", "hidden_sizes: [7]") if "hidden_sizes: [128, 128]" in text
                      else text + "hidden_sizes: [7]\n")
    # the project's file of the same name wins over the shipped one, in plan as in run
    plan = json.loads(orch(tmp_path, "plan", "--json").stdout)
    assert plan["stages"][0]["config"]["model"]["hidden_sizes"] == [7]
    assert "(./conf)" in orch(tmp_path, "ls", "model").stdout
    edited = target.read_text()
    again = orch(tmp_path, "cp", "model/mlp")
    assert again.returncode == 2 and "already exists" in again.stderr and target.read_text() == edited
    missing = orch(tmp_path, "cp", "model/nope")
    assert missing.returncode == 2 and "model/{" in missing.stderr


def test_plan_json_is_one_document(tmp_path):
    out = orch(tmp_path, "plan", "--json", "trainer.zero_stage=2")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert plan["stages"][0]["deepspeed"]["zero_optimization"]["stage"] == 2
    pipeline = json.loads(orch(tmp_path, "plan", "--json", "recipe=pipeline").stdout)
    assert [s["name"] for s in pipeline["stages"]][:2] == ["teacher", "pruned"] and pipeline["name"] == "digits_compress"
    sweep = json.loads(orch(tmp_path, "sweep", "--plan", "--json").stdout)
    assert sweep["metric"] == "val_accuracy" and "trainer.optimizer.lr" in sweep["space"]


@pytest.mark.skipif(not Path("/bin/bash").exists(), reason="needs bash")
def test_bash_completion_completes_commands_groups_options_and_keys(tmp_path):
    driver = """
eval "$(orch --install-completion bash)"
complete_line() {
  COMP_LINE="$1"; COMP_POINT=${#COMP_LINE}
  read -ra COMP_WORDS <<< "$COMP_LINE"
  COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))
  _orch_complete
  echo "${COMPREPLY[*]}"
}
complete_line "orch pl"
complete_line "orch run model=c"
complete_line "orch plan trainer.zero_st"
complete_line "orch cp pipeline/digits_s"
"""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run(["bash", "-c", driver], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["plan", "model=cnn", "trainer.zero_stage=", "pipeline/digits_structured"]
    zsh = orch(tmp_path, "--install-completion", "zsh").stdout
    assert "bashcompinit" in zsh and "complete -o nospace" in zsh
    assert orch(tmp_path, "--install-completion", "fish").returncode == 2


def test_output_into_a_closed_pipe_ends_quietly(tmp_path):
    """`orch ls | head -1`: the reader is gone before orch writes; no traceback, the documented status 1."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run([*ORCH, "ls"], cwd=tmp_path, stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr
