"""Every command-line flag of the simulation scripts, ``fedgan-run`` and ``python -m app.loopback``
has help text, and its ``--help`` shows the default (argparse's ``(default: X)``, or in words
where the default is None or empty)."""

from __future__ import annotations

import argparse
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(f"simulations.{p.stem}" for p in (ROOT / "simulations").glob("*.py")
                 if "ArgumentParser(" in p.read_text())
COMMANDS = [*SCRIPTS, "app.launch", "app.loopback"]


class _Captured(Exception):
    pass


def parser_of(module: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser ``module.main`` builds, caught at its ``parse_args`` call (nothing runs)."""
    seen: list[argparse.ArgumentParser] = []

    def capture(self, args=None, namespace=None):
        seen.append(self)
        raise _Captured

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(_Captured):
        importlib.import_module(module).main([])
    return seen[0]


def parsers(parser: argparse.ArgumentParser, name: str):
    """``(name, parser)`` for the parser and each of its subcommands."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from parsers(sub, f"{name} {sub_name}")


def help_blocks(parser: argparse.ArgumentParser) -> dict[str, str]:
    """First option string -> its whole entry in ``--help`` (lines joined)."""
    blocks: dict[str, str] = {}
    current = None
    for line in parser.format_help().splitlines():
        if m := re.match(r"^  (-[-\w]+)", line):
            current = m.group(1)
            blocks[current] = line
        elif current and line.startswith("    "):
            blocks[current] += " " + line.strip()
        else:
            current = None
    return blocks


def test_the_scripts_are_found():
    assert {"simulations.run", "simulations.compare_strategies", "simulations.train_evaluator"} <= set(SCRIPTS)


@pytest.mark.parametrize("module", COMMANDS)
def test_every_flag_has_help_and_shows_its_default(module, monkeypatch):
    top = parser_of(module, monkeypatch)
    checked = 0
    for name, parser in parsers(top, module):
        blocks = help_blocks(parser)
        for action in parser._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            flag = action.option_strings[0]
            assert action.help and action.help != argparse.SUPPRESS, f"{name} {flag}: no help text"
            assert flag in blocks, f"{name} {flag}: not in --help"
            entry = " ".join(blocks[flag].split())
            assert len(entry) > len(" ".join(action.option_strings)) + 8, f"{name} {flag}: {entry!r}"
            if not action.required:
                assert "default" in entry.lower(), f"{name} {flag}: --help does not show its default: {entry!r}"
            checked += 1
    assert checked >= 2


def test_the_default_is_the_real_one():
    from app.launch import HelpFormatter

    p = argparse.ArgumentParser(formatter_class=HelpFormatter)
    p.add_argument("--rounds", type=int, default=7, help="how many")
    p.add_argument("--out", default="", help="a file (default: print only)")
    p.add_argument("--name", help="a name")
    text = " ".join(p.format_help().split())
    assert "how many (default: 7)" in text
    assert "a file (default: print only)" in text and "(default: )" not in text
    assert "a name (default" not in text   # None: the help must say it in words (the test above checks that)
