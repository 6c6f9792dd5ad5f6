"""`edgefleet --help` and every command's --help: each command is listed by its parent with a
line saying what it does, and each option and argument says what it is for."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from controller.cli import build_parser

EDGEFLEET = str(Path(sys.executable).parent / "edgefleet")


def commands(
    parser: argparse.ArgumentParser, path: str = "edgefleet"
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every command of the tree, as ``("edgefleet rollouts create", parser)``, the root first."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, f"{path} {name}")


def subcommands(parser: argparse.ArgumentParser) -> dict[str, str | None]:
    """A parser's subcommands and the help line its --help shows for each."""
    found: dict[str, str | None] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helped = {a.dest: a.help for a in action._choices_actions}
            found |= {name: helped.get(name) for name in action.choices}
    return found


def test_every_command_is_listed_by_its_parent_with_a_help_line() -> None:
    missing = [
        f"{path} {name}"
        for path, parser in commands(build_parser())
        for name, help_ in subcommands(parser).items()
        if not help_ or help_ == argparse.SUPPRESS
    ]
    assert missing == [], "commands their parent's --help does not list"
    for path, parser in commands(build_parser()):
        shown = parser.format_help()
        for name in subcommands(parser):
            assert f"\n    {name} " in shown or f"\n    {name}\n" in shown, f"`{path} --help` omits {name}"


def test_every_option_and_argument_says_what_it_is_for() -> None:
    missing = [
        f"{path}: {'/'.join(action.option_strings) or action.dest}"
        for path, parser in commands(build_parser())
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction | argparse._SubParsersAction)
        and (not action.help or action.help == argparse.SUPPRESS)
    ]
    assert missing == []


def test_help_is_what_the_installed_command_prints() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    for args in ([], ["rollouts"], ["models"], ["retraining"], ["rollouts", "create"]):
        done = subprocess.run(
            [EDGEFLEET, *args, "--help"], capture_output=True, text=True, env=env, timeout=120
        )
        assert done.returncode == 0 and done.stderr == "", (args, done.stderr)
        parser = dict(commands(build_parser()))[" ".join(["edgefleet", *args])]
        for name in subcommands(parser):
            assert name in done.stdout, (args, name)
    bare = subprocess.run([EDGEFLEET], capture_output=True, text=True, env=env, timeout=120)
    assert bare.returncode == 2 and "usage: edgefleet" in bare.stdout and "rollouts" in bare.stdout
    rollouts = subprocess.run([EDGEFLEET, "rollouts", "--help"], capture_output=True, text=True, env=env)
    assert all(f"    {c} " in rollouts.stdout for c in ("list", "show", "watch", "create", "events"))
