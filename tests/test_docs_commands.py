"""Every ``tensorslm ...`` command shown in README.md and docs/*.md parses: its subcommand
exists (and its ``--help`` works), every option it uses is an option of that subcommand, and
a value given to a choice option is one of the choices.

Commands are read from fenced code blocks (a line starting with ``tensorslm``, after an
optional ``$ ``, ``sudo``, environment assignments or a ``.venv/bin/`` path; ``\\`` joins lines)
and from inline code spans starting with ``tensorslm ``. Shell syntax ends a command (``&&``,
``;``, ``>``, ``&``, ``#``, a pipe into another program); ``[...]`` and ``a | --b`` written as
usage alternatives are read as options too.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from tensorslm.cli import cli

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
ENV = re.compile(r"^[A-Z_][A-Z0-9_]*=\S*$")
ENDS = {"&&", "||", ";", "&", ">", ">>", "2>", "2>&1", "<", "#"}


@dataclass(frozen=True)
class Shown:
    page: str
    line: int
    text: str

    def __str__(self) -> str:
        return f"{self.page}:{self.line}: {self.text}"


def _command_start(line: str) -> str | None:
    """The line from its ``tensorslm`` word on, if the line runs tensorslm."""
    line = line.strip()
    if line.startswith("$ "):
        line = line[2:]
    words = line.split()
    while words and (words[0] == "sudo" or ENV.match(words[0])):
        words.pop(0)
    if words and (words[0] == "tensorslm" or words[0].endswith("/bin/tensorslm")):
        return " ".join(["tensorslm", *words[1:]])
    return None


def shown_commands(page: Path) -> list[Shown]:
    text = page.read_text(encoding="utf-8")
    name = page.relative_to(ROOT).as_posix()
    found: list[Shown] = []
    in_block = False
    pending: tuple[int, str] | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        if line.lstrip().startswith("```"):
            in_block = not in_block
            pending = None
            continue
        if in_block:
            if pending is not None:
                start, so_far = pending
                so_far += " " + line.strip()
            else:
                command = _command_start(line)
                if command is None:
                    continue
                start, so_far = number, command
            if so_far.endswith("\\"):
                pending = (start, so_far[:-1].rstrip())
            else:
                pending = None
                found.append(Shown(name, start, so_far))
        else:
            for span in re.findall(r"`(tensorslm [^`]+)`", line):
                found.append(Shown(name, number, span))
    return found


def command_words(text: str) -> list[str]:
    """The words of one command up to the first shell syntax that ends it."""
    text = re.sub(r"\s#.*$", "", text)             # a trailing comment
    try:
        words = shlex.split(text, posix=True)
    except ValueError:                              # an unbalanced quote in prose
        words = text.split()
    kept: list[str] = []
    for index, word in enumerate(words):
        if word in ENDS or word.startswith((">", "2>")):
            break
        if word == "|":
            following = words[index + 1] if index + 1 < len(words) else ""
            if following.lstrip("[").startswith("-"):
                continue                            # usage: --device X | --fleet
            break                                   # a pipe into another program
        word = word.strip("[]")
        if word and word not in ("...", "…"):
            kept.append(word)
    return kept


def resolve(words: list[str]) -> tuple[list[str], click.Command, list[str]]:
    """The subcommand path, its click command and the words after it."""
    command: click.Command = cli
    path: list[str] = []
    rest = words[1:]
    while isinstance(command, click.Group):
        # global options of a group (e.g. -v) may come before its subcommand
        while rest and rest[0].startswith("-") and _option(command, rest[0]) is not None:
            rest = rest[1:]
        if not rest:
            break
        sub = command.get_command(click.Context(command), rest[0])
        if sub is None:
            raise AssertionError(f"no subcommand {rest[0]!r} under {' '.join(['tensorslm', *path]) }; "
                                 f"known: {', '.join(sorted(command.list_commands(click.Context(command))))}")
        path.append(rest[0])
        command, rest = sub, rest[1:]
    return path, command, rest


def _option(command: click.Command, word: str) -> click.Option | None:
    name = word.split("=", 1)[0]
    for param in command.get_params(click.Context(command)):
        if isinstance(param, click.Option) and name in (*param.opts, *param.secondary_opts):
            return param
    return None


def check(words: list[str]) -> list[str]:
    """What is wrong with one command; empty when it parses."""
    problems: list[str] = []
    path, command, rest = resolve(words)
    index = 0
    while index < len(rest):
        word = rest[index]
        index += 1
        if not word.startswith("-") or word in ("-", "--") or re.fullmatch(r"-\d[\d.]*", word):
            continue                                # an argument (or a negative number)
        option = _option(command, word)
        if option is None:
            known = sorted(o for p in command.get_params(click.Context(command))
                           if isinstance(p, click.Option) for o in (*p.opts, *p.secondary_opts))
            problems.append(f"{' '.join(['tensorslm', *path])} has no option {word.split('=')[0]} "
                            f"(options: {', '.join(known)})")
            continue
        if option.is_flag or option.count:
            continue
        if "=" in word:
            value = word.split("=", 1)[1]
        elif index < len(rest):
            value, index = rest[index], index + 1
        else:
            problems.append(f"{word} needs a value")
            continue
        if isinstance(option.type, click.Choice) and value not in option.type.choices \
                and not re.fullmatch(r"[A-Z_]+|<.*>", value):
            problems.append(f"{word} {value!r} is not one of {', '.join(option.type.choices)}")
    return problems


SHOWN = [shown for page in PAGES for shown in shown_commands(page)]


def test_the_readme_and_the_docs_show_commands():
    pages = {shown.page for shown in SHOWN}
    assert "README.md" in pages
    readme = [s for s in SHOWN if s.page == "README.md"]
    assert {resolve(command_words(s.text))[0][0] for s in readme} >= {
        "demo", "compress", "serve", "ask", "dashboard"}, [str(s) for s in readme]


@pytest.mark.parametrize("shown", SHOWN, ids=str)
def test_each_command_shown_parses(shown):
    words = command_words(shown.text)
    problems = check(words)
    assert not problems, f"{shown}\n" + "\n".join(problems)


@pytest.mark.parametrize("path", sorted({tuple(resolve(command_words(s.text))[0]) for s in SHOWN}),
                         ids=" ".join)
def test_each_subcommand_shown_has_help(path):
    result = CliRunner().invoke(cli, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


@pytest.mark.parametrize("text, problem", [
    ("tensorslm compress smollm2-135m -o out --colour red", "has no option --colour"),
    ("tensorslm evaluate store --head wide", "'wide' is not one of dense, tied"),
    ("tensorslm policy chek deploy/policies/battery.yaml", "no subcommand 'chek'"),
])
def test_a_wrong_command_is_caught(text, problem):
    try:
        problems = check(command_words(text))
    except AssertionError as exc:
        problems = [str(exc)]
    assert any(problem in p for p in problems), problems


def test_shell_syntax_and_usage_alternatives():
    assert command_words('tensorslm ask "hi there" --device pi-01 | --fleet --group lab '
                         '[--broker mqtt://h] 2>/dev/null') == [
        "tensorslm", "ask", "hi there", "--device", "pi-01", "--fleet", "--group", "lab",
        "--broker", "mqtt://h"]
    assert command_words("tensorslm inspect store | head -5  # first rows") == [
        "tensorslm", "inspect", "store"]
    assert _command_start("sudo OMP_NUM_THREADS=2 .venv/bin/tensorslm demo --prompts 4") == \
        "tensorslm demo --prompts 4"


def test_the_readme_tour_configs_load(tmp_path):
    """The agent.yaml and collector.yaml of the README's tour are valid as written, and the
    agent's power section opens (a simulated battery)."""
    from tensorslm.agent.config import load_config as load_agent_config
    from tensorslm.controller.power.sources import open_source
    from tensorslm.fleet.collector import load_config as load_collector_config

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    agent_yaml = next(block for block in re.findall(r"```yaml\n(.*?)```", readme, re.S)
                      if "device:" in block)
    collector_yaml = re.search(r"cat > collector.yaml <<'EOF'\n(.*?)\nEOF", readme, re.S).group(1)
    (tmp_path / "agent.yaml").write_text(agent_yaml)       # in a copy of the repository root
    (tmp_path / "deploy" / "policies").mkdir(parents=True)
    (tmp_path / "deploy" / "policies" / "battery.yaml").write_bytes(
        (ROOT / "deploy" / "policies" / "battery.yaml").read_bytes())
    (tmp_path / "collector.yaml").write_text(collector_yaml)

    agent = load_agent_config(tmp_path / "agent.yaml")
    assert agent.model.store == tmp_path / "stores" / "smollm2"     # relative to the file
    source = open_source(agent.power)
    try:
        assert source.read().battery_percent == pytest.approx(80, abs=1)
    finally:
        source.close()
    assert load_collector_config(tmp_path / "collector.yaml").database == tmp_path / "central.db"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_points_at_a_file(page):
    text = page.read_text(encoding="utf-8")
    missing = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue                                # a URL or an anchor on the same page
        path = (page.parent / target.split("#", 1)[0]).resolve()
        if not path.exists():
            missing.append(target)
    assert not missing, f"{page.relative_to(ROOT)} links to missing files: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_benchmark_named_exists(page):
    """A page that quotes `python bench/x.py ...` names a benchmark the repository has."""
    named = set(re.findall(r"\bbench/([A-Za-z0-9_]+\.py)\b", page.read_text(encoding="utf-8")))
    missing = sorted(name for name in named if not (ROOT / "bench" / name).is_file())
    assert not missing, f"{page.relative_to(ROOT)} names missing benchmarks: {missing}"
