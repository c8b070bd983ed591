"""The flag table of docs/cli.md is the truth about the command lines: every row is checked against the real
parsers of `python -m serving` and `python -m training`, so the page cannot drift from the code."""

from __future__ import annotations

import argparse
import contextlib
import io
import re
from pathlib import Path

import pytest

from serving.__main__ import build_parser as serving_parser
from serving.cli_support import flags, subcommands
from training.__main__ import build_parser as training_parser

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
FLAG = re.compile(r"--[a-z][a-z0-9-]*")


def commands() -> dict[str, argparse.ArgumentParser]:
    training = subcommands(training_parser())
    # `training models` takes no flags; `models` in the table is the client's command.
    found = {**subcommands(serving_parser()), "train": training["train"], "export": training["export"]}
    found["repository"] = subcommands(found["repository"])["index"]  # its flags live on each action
    return found


def table_rows() -> list[dict[str, str]]:
    """The first table of the page ('Shared flags'), one dict per row."""
    lines = DOC.read_text().split("## Shared flags", 1)[1].split("\n## ", 1)[0].splitlines()
    rows = [line.strip().strip("|").split("|") for line in lines if line.startswith("|")]
    header = [cell.strip() for cell in rows[0]]
    return [dict(zip(header, (cell.strip() for cell in row), strict=True)) for row in rows[2:]]


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in flags(parser) for s in a.option_strings}


def test_the_table_is_linked_from_the_readme():
    assert "docs/cli.md" in (DOC.parents[1] / "README.md").read_text()


@pytest.mark.parametrize("row", table_rows(), ids=lambda row: row["idea"])
def test_every_command_of_a_row_has_its_flags(row):
    parsers = commands()
    flags = FLAG.findall(row["flag"])
    assert flags, row
    for command in (c.strip() for c in row["commands"].split(",")):
        missing = set(flags) - option_strings(parsers[command])
        assert not missing, f"{command} lacks {missing}"


@pytest.mark.parametrize("row", [r for r in table_rows() if FLAG.search(r["old spelling"])],
                         ids=lambda row: row["idea"])
def test_old_spellings_still_work_and_warn(row, tmp_path):
    new = FLAG.findall(row["flag"])[0]
    for old, where in re.findall(r"`(--[a-z-]+)` \(([a-z, ]+)\)", row["old spelling"]):
        for command in (c.strip() for c in where.split(",")):
            parser = commands()[command]
            positional = ["checkpoint.pt"] if command == "export" else []
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                args = parser.parse_args([*positional, old, str(tmp_path)])
            dest = next(a.dest for a in flags(parser) if new in a.option_strings)
            assert getattr(args, dest) == str(tmp_path)  # the old spelling does what the new one does
            assert f"warning: {old} is deprecated; use {new}" in err.getvalue()
