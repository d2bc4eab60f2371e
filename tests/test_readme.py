"""The README stays true: its test command is what CI runs, and it documents the real CLI."""

from __future__ import annotations

import re

import pytest
import typer.main
from conftest import REPO_ROOT

from bench.cli import app

README = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
CI_SCRIPT = REPO_ROOT / ".ci" / "run"
COMMANDS = typer.main.get_command(app).commands  # type: ignore[attr-defined]


def _leaves() -> dict[str, object]:
    """Every runnable command by its full name ("run", "phantom export", ...)."""
    leaves: dict[str, object] = {}
    for name, command in COMMANDS.items():
        sub = getattr(command, "commands", None)
        if sub:
            leaves.update({f"{name} {child}": leaf for child, leaf in sub.items()})
        else:
            leaves[name] = command
    return leaves


LEAVES = _leaves()

#: Options the README does not mention yet (each is a strict xfail below: a doc bug).
UNDOCUMENTED: set[tuple[str, str]] = set()


def command_sections() -> dict[str, str]:
    """README text of each ``### `bench NAME ...` `` section, by command name."""
    sections = {}
    for match in re.finditer(r"^### `bench (\w+)[^`]*`\n(.*?)(?=^##)", README + "\n##", flags=re.M | re.S):
        sections[match.group(1)] = match.group(2)
    return sections


SECTIONS = command_sections()


def options(command: str) -> list[str]:
    """Long form of every option of ``bench COMMAND`` (``--save-maps`` of ``--save-maps/--no-save-maps``)."""
    found = []
    for param in LEAVES[command].params:  # type: ignore[attr-defined]
        if param.param_type_name == "option":
            found.extend(o for o in param.opts if o.startswith("--"))
    return found


def option_cases() -> list[object]:
    cases = []
    for command in sorted(LEAVES):
        for option in options(command):
            marks = (
                [
                    pytest.mark.xfail(
                        strict=True, reason=f"BUG: README.md does not document `bench {command} {option}`"
                    )
                ]
                if (command, option) in UNDOCUMENTED
                else []
            )
            cases.append(
                pytest.param(command, option, marks=marks, id=f"{command.replace(' ', '-')}{option}")
            )
    return cases


def fenced_block_after(marker: str, language: str = "bash") -> str:
    """The first fenced block of ``language`` after the first line starting with ``marker``."""
    match = re.search(rf"^{re.escape(marker)}.*?^```{language}\n(.*?)^```", README, flags=re.M | re.S)
    assert match, f"no ```{language} block after a line starting with {marker!r}"
    return match.group(1).strip()


def ci_command() -> str:
    """The command line of ``.ci/run``: its last non-comment line, after the ``set``/``cd`` preamble."""
    lines = [line.strip() for line in CI_SCRIPT.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    body = [line for line in lines if not re.match(r"(set|cd)\s", line)]
    assert len(body) == 1, f".ci/run should run one command line after its set/cd preamble, found {body}"
    assert body[0] == lines[-1]
    return body[0]


def test_readme_test_command_is_what_ci_runs() -> None:
    readme_command = fenced_block_after("Run the tests")
    assert "\n" not in readme_command
    assert readme_command == ci_command()
    assert "pytest" in readme_command and "ruff check" in readme_command


def test_ci_script_is_executable_bash() -> None:
    text = CI_SCRIPT.read_text(encoding="utf-8")
    assert text.startswith("#!/usr/bin/env bash") or text.startswith("#!/bin/bash")
    assert "set -euo pipefail" in text


def test_every_command_has_a_readme_section() -> None:
    assert set(COMMANDS) == {"run", "table", "compare", "figure", "methods", "datasets", "phantom"}
    assert set(SECTIONS) == set(COMMANDS)
    for leaf in LEAVES:
        if " " in leaf:  # a group's section names each of its subcommands
            assert f"bench {leaf}" in SECTIONS[leaf.split()[0]], f"`bench {leaf}` is not in its section"


@pytest.mark.parametrize(("command", "option"), option_cases())
def test_every_option_is_documented(command: str, option: str) -> None:
    """`bench run` flags in its own section (the flag table); the others anywhere (e.g. --data-root)."""
    where = (
        SECTIONS["run"] if command == "run" else SECTIONS[command.split()[0]] if " " in command else README
    )
    assert re.search(rf"{re.escape(option)}(?![\w-])", where), f"`bench {command} {option}` is undocumented"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_documented_options_exist(command: str) -> None:
    """No stale docs: every ``--flag`` a command's section names is an option of that command
    (of one of its subcommands, for a group such as ``bench phantom``)."""
    leaves = [leaf for leaf in LEAVES if leaf.split()[0] == command]
    known = {option for leaf in leaves for option in options(leaf)}
    for leaf in leaves:
        for param in LEAVES[leaf].params:  # type: ignore[attr-defined]
            known.update(getattr(param, "secondary_opts", []))
    text = re.sub(r"^#SBATCH.*$", "", SECTIONS[command], flags=re.M)  # scheduler options, not ours
    mentioned = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", text))
    assert mentioned - known == set(), f"README names options `bench {command}` does not have"


def test_quick_start_uses_real_run_flags() -> None:
    command = fenced_block_after("Run the main job")
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", command.split("bench run", 1)[1]))
    assert flags <= set(options("run"))


def test_methods_table_matches_the_registry() -> None:
    from bench.registry import available_methods

    section = re.search(r"^## Methods\n(.*?)^## ", README, flags=re.M | re.S)
    assert section
    rows = dict(re.findall(r"^\| `([\w-]+)` \| ([^|]+) \|", section.group(1), flags=re.M))
    builtins = {
        name: cls for name, cls in available_methods().items() if cls.__module__.startswith("methods.")
    }
    assert set(rows) == set(builtins)
    for name, cls in builtins.items():
        documented = {t.strip() for t in rows[name].split(",")}
        assert documented == {str(t) for t in cls.tasks}, name
