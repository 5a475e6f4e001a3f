"""Every `orch` command the docs show is executed here, so the docs cannot drift from the code.

The commands are extracted, never copied: lines starting with `orch ` in the fenced blocks of README.md and
k8s/README.md (a `$ orch ...` line followed by `orch: error: ...` lines is a transcript of a documented failure), the
inline code of their tables (every span of a row's first cell: the synopses) and prose (`orch CMD ARG ...`: a
span naming only a command, as in "`orch submit` validates ...", is a name, not an example), and the `#   orch ...`
comment lines of every conf/**/*.yaml (the examples of the block that opens it, and any further down; a trailing
`\\` continues a command on the next comment line). A command added to any of them is picked up and run by the
next test run.

Each runs in-process (`orchestrator.cli.main`) in a directory of its own, with no Ray, no GPU and no server:
- `orch run [-m] ARGS` as `orch plan ARGS` (a multirun: every combination of its sweeps, expanded by Hydra's own
  override parser as Hydra's basic sweeper does, planned one by one); `orch sweep ARGS` as `orch sweep --plan ARGS`;
- `orch submit ...` for real against an address where nothing listens: it validates the config locally first, so
  ending with "no Ray job server answers" (exit 2) means the documented command passed every local check;
  `orch status/logs/stop/list` the same way (their arguments parsed, the client reached);
- `orch ui ...` for real with the MLflow server's start replaced by a recorder;
- `orch plan`, `orch ls`, `orch cp`, `orch --help`, `orch run --help`, `orch --install-completion` for real.
Placeholders (`<run id>`, `<run name>`, `<sweep run>`, `<job id>`), synopsis words (`[key=value ...]`, `JOB`,
`GROUP/OPTION`, ...) and the files a command names (text corpora, a pretrained directory, an exported model, a run
to resume, a sweep's best.yaml) are filled in with things this test creates; absolute paths are re-rooted in the
command's directory, and every cluster address points at a port where nothing listens. A placeholder or synopsis
word this test does not know fails the test, naming it: teach `PLACEHOLDERS` / `SYNOPSIS_WORDS` below. Local runs
are planned as on a 2-CPU laptop, whatever machine runs the test.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import shlex
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

REPO = Path(__file__).resolve().parents[2]
MARKDOWN = ("README.md", "k8s/README.md")
CONF = REPO / "conf"

FAKE_RUN_ID = "0123456789abcdef0123456789abcdef"  # an MLflow run id as orch recognises one; not looked up at plan time
JOB_ID = "raysubmit_XXXX"


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


NO_SERVER = f"http://127.0.0.1:{_closed_port()}"  # nothing listens there: a connection is refused at once
UNREACHABLE = "no Ray job server answers at " + NO_SERVER
JOB_COMMANDS = ("submit", "status", "logs", "stop", "list")

# <placeholder> → what stands for it (matched on the placeholder's words)
PLACEHOLDERS = {
    r"run id|model dir": FAKE_RUN_ID,  # <mlflow run id>, <run id>, <teacher run id>, <run id or model dir>, ...
    r"run name": "baseline",  # resume=<run name>: the run is created below
    r"sweep run": "sweep-demo",  # orch_runs/<sweep run>/best: best.yaml is written below
    r"job id": JOB_ID,
}
# synopsis words of the command tables, as whole words → what stands for them
SYNOPSIS_WORDS = {
    "key=a,b": "trainer.max_steps=20,40",
    "sweep=NAME": "sweep=default",
    "JOB": JOB_ID,
    "URL": NO_SERVER,
    "NAME": "HOME",  # --env NAME: a variable that is set
    "N": "5",
    "GROUP": "model",
    "GROUP/OPTION": "model/mlp",
    "DEST": "conf/model/mine.yaml",
    "MODEL": FAKE_RUN_ID,  # orch eval MODEL
    "data=...": "data=digits",
}
# `key=value ...` and a trailing `...` stand for "your overrides": a cluster job's needs them (shared storage and a
# tracking server, which `orch submit` checks), anything else is fine without
CLUSTER_OVERRIDES = ["trainer.storage_path=/mnt/shared/orch_runs", "tracking.uri=http://mlflow:5000"]


@dataclass(frozen=True)
class Documented:
    where: str  # file:line
    text: str  # the command as written, without its shell comment
    error: Optional[str] = None  # a transcript's `orch: error: ...` output: the command must fail with it
    inline: bool = False  # inline code: a synopsis, "your overrides" implied (a cluster job's among them)

    def __str__(self) -> str:
        return f"{self.where}: {self.text}"


# --- extraction --------------------------------------------------------------------------------------------------

FENCE = re.compile(r"^\s*```")
INLINE_CODE = re.compile(r"`([^`]+)`")
SUBSTITUTION = re.compile(r"\$\((orch [^)]*)\)")


def _command(text: str) -> Optional[str]:
    """The orch command in `text` (a line of a fenced block, or an inline code span), comment stripped; else None."""
    text = " ".join(text.split())
    inner = SUBSTITUTION.search(text)  # eval "$(orch --install-completion)"
    if inner:
        text = inner.group(1)
    if not text.startswith("orch "):
        return None
    return _strip_comment(text)


def _strip_comment(text: str) -> str:
    """Drop a trailing `# comment`, as the shell would (a # inside quotes stays)."""
    end = len(text)
    # the comment starts at the first # that is not inside quotes or a word
    quote = None
    for index, char in enumerate(text):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or text[index - 1].isspace()):
            end = index
            break
    return text[:end].strip()


def commands_in_markdown(text: str, name: str) -> list[Documented]:
    found: list[Documented] = []
    lines = text.splitlines()
    prose = list(lines)  # the text with fenced blocks blanked, for the inline code spans
    in_fence = False
    transcript: Optional[list] = None  # [line, command, output lines] of a `$ orch ...` line
    index = 0
    while index < len(lines):
        line, lineno = lines[index], index + 1
        if FENCE.match(line):
            _close(transcript, name, found)
            in_fence, transcript = not in_fence, None
            prose[index] = ""
            index += 1
            continue
        if not in_fence:
            index += 1
            continue
        prose[index] = ""
        while line.rstrip().endswith("\\") and index + 1 < len(lines):  # a command continued on the next line
            index += 1
            prose[index] = ""
            line = line.rstrip()[:-1] + " " + lines[index].strip()
        stripped = line.strip()
        if stripped.startswith("$ "):
            _close(transcript, name, found)
            command = _command(stripped[2:])
            transcript = [lineno, command, []] if command else None
        elif transcript is not None:
            transcript[2].append(stripped)
        else:
            command = _command(stripped)
            if command:
                found.append(Documented(f"{name}:{lineno}", command))
        index += 1
    _close(transcript, name, found)
    blanked = "\n".join(prose)
    for match in INLINE_CODE.finditer(blanked):
        command = _command(match.group(1))
        lineno = blanked.count("\n", 0, match.start()) + 1
        column = match.start() - blanked.rfind("\n", 0, match.start()) - 1
        in_first_cell = column < _second_cell(lines[lineno - 1])
        # a table's first cell is a synopsis; elsewhere `orch submit` alone names the command, an example has arguments
        if command and (in_first_cell or len(command.split()) > 2 or command.split()[1].startswith("-")):
            found.append(Documented(f"{name}:{lineno}", command, inline=True))
    return sorted(found, key=lambda d: int(d.where.rsplit(":", 1)[1]))


def _second_cell(row: str) -> int:
    """Where a table row's second cell starts (the first `|` after the opening one, outside inline code)."""
    if not row.lstrip().startswith("|"):
        return -1
    in_code = False
    for index in range(row.index("|") + 1, len(row)):
        if row[index] == "`":
            in_code = not in_code
        elif row[index] == "|" and not in_code:
            return index
    return len(row)


def _close(transcript: Optional[list], name: str, found: list[Documented]) -> None:
    if transcript is not None:
        lineno, command, output = transcript
        errors = [line for line in output if line.startswith("orch: error:")]
        found.append(Documented(f"{name}:{lineno}", command, errors[0] if errors else None))


def commands_in_yaml(text: str, name: str) -> list[Documented]:
    """`#   orch ...` comment lines: the header's examples, and any further down (a line ending in `\\` continues
    on the next comment line)."""
    found = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        lineno, line = index + 1, lines[index].strip()
        command = line.lstrip("#").strip() if re.match(r"#\s{2,}orch ", line) else ""  # `#   orch ...`, as headers
        if command:
            while command.endswith("\\") and index + 1 < len(lines) and lines[index + 1].lstrip().startswith("#"):
                index += 1
                command = command[:-1].rstrip() + " " + lines[index].strip().lstrip("#").strip()
            found.append(Documented(f"{name}:{lineno}", _strip_comment(command)))
        index += 1
    return found


def documented_commands() -> list[Documented]:
    found = []
    for name in MARKDOWN:
        found += commands_in_markdown((REPO / name).read_text(), name)
    for path in sorted(CONF.rglob("*.yaml")):
        found += commands_in_yaml(path.read_text(), str(path.relative_to(REPO)))
    return found


DOCUMENTED = documented_commands()


# --- from a documented command to what runs here -----------------------------------------------------------------

RUN_ID = re.compile(r"[0-9a-f]{32}")
PLACEHOLDER = re.compile(r"<([^<>]+)>")
OPTIONAL = re.compile(r"(?<!\S)\[([^\[\]]*)\]")  # `[--port 5000]`, never a value's list (`=[64]`, `,[16,32]`)
QUOTED = re.compile(r"('[^']*'|\"[^\"]*\")")  # optional parts are outside quotes: '{uniform: [1e-3, 1e-2]}' is a value


class UnknownPlaceholder(Exception):
    pass


def words_of(text: str, synopsis: bool = False) -> list[str]:
    """The argv after `orch`, placeholders and synopsis words filled in. A synopsis (inline code: `orch submit
    --follow` in a sentence) implies the overrides a user adds, as `...` and `key=value` do."""

    def placeholder(match: re.Match) -> str:
        for pattern, value in PLACEHOLDERS.items():
            if re.search(pattern, match.group(1)):
                return value
        raise UnknownPlaceholder(f"placeholder {match.group(0)!r}: add it to PLACEHOLDERS in {Path(__file__).name}")

    text = PLACEHOLDER.sub(placeholder, text)
    text = "".join(part if part[:1] in "'\"" else OPTIONAL.sub(lambda match: match.group(1), part)
                   for part in QUOTED.split(text))
    words = shlex.split(text, comments=True)
    assert words[0] == "orch", text
    words = words[1:]
    command = words[0] if words else ""
    filled: list[str] = []
    if synopsis and "..." not in words and "key=value" not in words:
        words.append("...")
    for index, word in enumerate(words):
        if word in ("...", "key=value"):  # "your overrides"
            if command == "submit" and not any(w.startswith("trainer.storage_path=") for w in words):
                filled += [w for w in CLUSTER_OVERRIDES if w not in filled]
            continue
        if word in SYNOPSIS_WORDS:
            filled.append(SYNOPSIS_WORDS[word])
        elif re.fullmatch(r"[A-Z][A-Z_/]*", word) or "<" in word or ">" in word:
            raise UnknownPlaceholder(f"synopsis word {word!r}: add it to SYNOPSIS_WORDS in {Path(__file__).name}")
        elif index > 0 and words[index - 1] == "--address":
            filled.append(NO_SERVER)  # never a real server, whatever the docs name
        else:
            filled.append(word)
    return filled


def rerooted(words: list[str], root: Path) -> list[str]:
    """Absolute paths in overrides (/shared/corpus.txt, /models/my-gpt2, /mnt/shared/orch_runs) under `root`."""
    out = []
    for word in words:
        key, sep, value = word.partition("=")
        out.append(f"{key}={root}{value}" if sep and value.startswith("/") else word)
    return out


def override(words: list[str], key: str) -> Optional[str]:
    values = [w.split("=", 1)[1] for w in words if w.split("=", 1)[0].lstrip("+") == key]
    return values[-1] if values else None


SAMPLE_TEXT = "The quick brown fox jumps over the lazy dog. " * 200


def prepare(words: list[str], cwd: Path) -> None:
    """Create what the command names: corpora, a pretrained directory, an exported model, a run, a best.yaml."""
    for word in words:
        key, sep, value = word.partition("=")
        key = key.lstrip("+")
        if not sep:
            continue
        if key == "data.path":
            path = cwd / value.replace("*", "sample")
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.suffix == ".jsonl":
                field = override(words, "data.text_field") or "text"
                path.write_text("".join(json.dumps({field: line}) + "\n" for line in SAMPLE_TEXT.split(". ")))
            else:
                path.write_text(SAMPLE_TEXT)
        elif key == "model.pretrained_path":
            pretrained_dir(cwd / value, override(words, "model") or "hf_causal_lm")
        elif key in ("recipe.input", "recipe.distill.teacher") and not RUN_ID.fullmatch(value):
            exported_model(cwd / value)
        elif key == "resume":
            storage = override(words, "trainer.storage_path") or "orch_runs"
            (cwd / storage / value).mkdir(parents=True, exist_ok=True)
    if "--config-dir" in words:
        directory = cwd / words[words.index("--config-dir") + 1]
        name = words[words.index("--config-name") + 1] if "--config-name" in words else "config"
        best_yaml(directory / f"{name}.yaml")


def pretrained_dir(path: Path, model: str) -> None:
    """A save_pretrained directory of a tiny model and its tokenizer (byte-level, 256 tokens): what orch reads of
    it before Ray starts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPT2Config, LlamaConfig, PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    if model == "hf_llama":
        config = LlamaConfig(vocab_size=256, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                             bos_token_id=0, eos_token_id=0)
    else:
        config = GPT2Config(vocab_size=256, n_embd=16, n_layer=1, n_head=2, n_positions=128,
                            bos_token_id=0, eos_token_id=0)
    config.save_pretrained(path)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={char: i for i, char in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(path)


def exported_model(path: Path) -> None:
    """An exported model directory as `orch run` writes it, as far as planning reads it (model.yaml, the default
    MLP; the weights are read when the stage runs)."""
    import yaml
    from omegaconf import OmegaConf

    from orchestrator.config import compose

    path.mkdir(parents=True, exist_ok=True)
    model = OmegaConf.to_container(compose([]).cfg.model, resolve=True)
    (path / "model.yaml").write_text(yaml.safe_dump(model, sort_keys=False))


def best_yaml(path: Path) -> None:
    """best.yaml as a sweep writes it: the default config as a primary config of its own."""
    import yaml

    from orchestrator.config import compose
    from orchestrator.sweep.best import best_config

    composed = compose([])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(best_config(composed.cfg, composed.choices), sort_keys=False))


def multirun_jobs(overrides: list[str]) -> list[list[str]]:
    """Every job of `orch run -m OVERRIDES`: the product of the sweeps, as Hydra's basic sweeper expands them."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    choices = []
    for word in overrides:
        if word.startswith("-"):
            choices.append([word])
            continue
        parsed = parser.parse_override(word)
        if parsed.is_sweep_override():
            key = parsed.get_key_element()
            choices.append([f"{key}={value}" for value in parsed.sweep_string_iterator()])
        else:
            choices.append([word])
    return [list(job) for job in itertools.product(*choices)]


@dataclass
class Check:
    argv: list[str]
    expect: str  # "ok", "unreachable" (a job command that got past every local check), or an error line


def checks_for(doc: Documented, cwd: Path) -> list[Check]:
    words = rerooted(words_of(doc.text, synopsis=doc.inline), cwd)
    prepare(words, cwd)
    command, args = (words[0], words[1:]) if words else ("", [])
    if doc.error:
        return [Check(["plan", *args] if command == "run" else words, doc.error)]
    if command == "run" and "--help" not in args:
        if "-m" in args or "--multirun" in args:
            args = [a for a in args if a not in ("-m", "--multirun")]
            return [Check(["plan", *job], "ok") for job in multirun_jobs(args)]
        return [Check(["plan", *args], "ok")]
    if command == "eval" and args and "--help" not in args:
        # `orch eval MODEL ...` is `orch run recipe=evaluate recipe.input=MODEL ...`: planned the same way
        model, rest = args[0], args[1:]
        if not model.startswith(("models:/", "runs:/")) and model != FAKE_RUN_ID:
            (cwd / model).mkdir(parents=True, exist_ok=True)  # a model folder (an orch run's folder)
        return [Check(["plan", "recipe=evaluate", f"recipe.input={model}", *rest], "ok")]
    if command == "sweep" and "--plan" not in args and "--help" not in args:
        return [Check(["sweep", "--plan", *args], "ok")]
    if command in JOB_COMMANDS:
        return [Check(words, "unreachable")]
    return [Check(words, "ok")]


# --- running them ------------------------------------------------------------------------------------------------


_OUTCOMES: dict[tuple[str, ...], tuple[int, str]] = {}  # the same command, documented twice, runs once


def outcome(argv: list[str], cwd: Path, capsys) -> tuple[int, str]:
    """Exit code and stderr of `orch ARGV` in `cwd` (paths under it shown as {cwd}); the same ARGV runs once."""
    key = tuple(arg.replace(str(cwd), "{cwd}") for arg in argv)
    if key not in _OUTCOMES or key[0] == "ui":
        code, _, err = orch(argv, capsys)
        _OUTCOMES[key] = (code, err.replace(str(cwd), "{cwd}"))
    return _OUTCOMES[key]


def orch(argv: list[str], capsys) -> tuple[int, str, str]:
    from hydra.core.global_hydra import GlobalHydra

    from orchestrator.cli import main

    capsys.readouterr()
    try:
        main(list(argv))
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        GlobalHydra.instance().clear()  # hydra.main (--config-dir ...) leaves its global state behind
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """A directory of its own, no cluster, no tracking server from the environment, no MLflow UI started."""
    from orchestrator import cli
    from orchestrator.config import validate

    monkeypatch.chdir(tmp_path)
    # the commands are for a laptop: the docs' local runs must plan on 2 CPUs, whatever machine runs this test
    monkeypatch.setattr(validate, "local_cpu_count", lambda: 2.0)
    monkeypatch.setenv("RAY_ADDRESS", NO_SERVER)  # README: export RAY_ADDRESS=http://HEAD:8265
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "ORCH_KUBERAY_SCHEMAS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # hydra.main's path sets it
    started: list[list[str]] = []
    monkeypatch.setattr(cli.subprocess, "call", lambda command, *a, **k: started.append(command) or 0)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield tmp_path, started
    root.handlers[:], root.level = handlers, level  # hydra.main's job logging: a handler on the captured stdout


@pytest.mark.parametrize("doc", DOCUMENTED, ids=str)
def test_documented_command_runs(doc: Documented, isolated, capsys):
    cwd, started = isolated
    for check in checks_for(doc, cwd):
        code, err = outcome(check.argv, cwd, capsys)
        shown = f"{doc}\n  ran: orch {shlex.join(check.argv)}\n  exit {code}\n{err[-3000:]}"
        if check.expect == "ok":
            assert code == 0, shown
        elif check.expect == "unreachable":
            assert code == 2 and UNREACHABLE in err, shown
        else:
            documented = check.expect.removesuffix("...").rstrip()
            assert code == 2 and err.strip().splitlines()[-1].startswith(documented), shown
    if doc.text.split()[1] == "ui":
        assert started and started[-1][1:4] == ["-m", "mlflow", "ui"], started


# --- the extraction itself ---------------------------------------------------------------------------------------


def test_every_doc_and_every_yaml_header_shows_commands_and_all_are_found():
    by_file: dict[str, list[Documented]] = {}
    for doc in DOCUMENTED:
        by_file.setdefault(doc.where.rsplit(":", 1)[0], []).append(doc)
    yamls = {str(p.relative_to(REPO)) for p in CONF.rglob("*.yaml") if "schema" not in p.parts}
    assert yamls <= set(by_file), f"YAMLs without a command in their header: {sorted(yamls - set(by_file))}"
    assert set(MARKDOWN) <= set(by_file)
    verbs = {doc.text.split()[1] for doc in DOCUMENTED}
    assert verbs >= {"run", "plan", "sweep", "submit", "status", "logs", "stop", "list", "ls", "cp", "ui"}, verbs
    assert any(doc.error for doc in DOCUMENTED)  # README's `$ orch run trainer.zero_stage=4` transcript


def test_extraction_picks_up_fenced_inline_transcript_and_header_commands():
    markdown = "\n".join([
        "| command | what |",
        "| `orch ls [GROUP]` | the groups |",
        "| `orch list` | see `orch status` and `orch logs JOB` |",
        "Prose naming `orch submit` and showing `orch run -m a=1,2`.",
        "```bash",
        "export RAY_ADDRESS=http://HEAD:8265",
        "orch run model=cnn   # a comment",
        "orch submit --address http://HEAD:8265 a=1 \\",
        "  b='x # y'",
        "python -m pytest",
        "```",
        "```",
        "$ orch run trainer.zero_stage=4",
        "orch: error: trainer.zero_stage=4: nope",
        "```",
    ])
    found = commands_in_markdown(markdown, "X.md")
    assert [(d.where, d.text, d.error) for d in found] == [
        ("X.md:2", "orch ls [GROUP]", None),
        ("X.md:3", "orch list", None),
        ("X.md:3", "orch logs JOB", None),
        ("X.md:4", "orch run -m a=1,2", None),
        ("X.md:7", "orch run model=cnn", None),
        ("X.md:8", "orch submit --address http://HEAD:8265 a=1 b='x # y'", None),
        ("X.md:13", "orch run trainer.zero_stage=4", "orch: error: trainer.zero_stage=4: nope"),
    ]
    yaml_text = "\n".join([
        "# What it is.",
        "#   orch run model=x   # comment",
        "#   # not a command: orch run",
        "#   orch submit a=1 \\",
        "#     b=2 --address http://HEAD:8265",
        "key: 1  # orch run no",
        "  #   orch plan c=3",
        "  # orch keeps its outputs: prose",
    ])
    assert [(d.where, d.text) for d in commands_in_yaml(yaml_text, "c.yaml")] == [
        ("c.yaml:2", "orch run model=x"), ("c.yaml:4", "orch submit a=1 b=2 --address http://HEAD:8265"),
        ("c.yaml:7", "orch plan c=3")]


def test_synopsis_words_and_placeholders_are_filled_and_unknown_ones_are_named():
    assert words_of("orch submit [--address URL] [--env NAME] [--follow] [--sweep] [key=value ...]") == [
        "submit", "--address", NO_SERVER, "--env", "HOME", "--follow", "--sweep", *CLUSTER_OVERRIDES]
    lists = "model.hidden_sizes=[64],[256,256]"
    assert words_of(f"orch run -m model=mlp {lists}")[-1] == lists
    assert words_of("orch run recipe.input=<mlflow run id of a pruned model>") == ["run", f"recipe.input={FAKE_RUN_ID}"]
    with pytest.raises(UnknownPlaceholder, match="<your thing>"):
        words_of("orch run model=<your thing>")
    with pytest.raises(UnknownPlaceholder, match="WIDGET"):
        words_of("orch cp WIDGET")
    assert multirun_jobs(["model=cnn", "model.channels=[8,16],[16,32]", "trainer.seed=0,1"]) == [
        ["model=cnn", "model.channels=[8,16]", "trainer.seed=0"],
        ["model=cnn", "model.channels=[8,16]", "trainer.seed=1"],
        ["model=cnn", "model.channels=[16,32]", "trainer.seed=0"],
        ["model=cnn", "model.channels=[16,32]", "trainer.seed=1"],
    ]


BENCHMARK = re.compile(r"python -m (benchmarks\.[a-z_]+)")


@pytest.mark.parametrize("module", sorted({m for doc in MARKDOWN for m in BENCHMARK.findall((REPO / doc).read_text())}))
def test_documented_benchmark_runs_as_written(module):
    """The benchmarks the docs name are run as `python -m benchmarks.NAME` from the repository root (they import
    each other as `benchmarks.*`): each one starts and answers --help."""
    import subprocess

    out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "usage:" in out.stdout, out.stderr[-2000:]
