"""What every command line of the project shares, serving and training alike: the program's name as the user
typed it, old flag spellings kept as aliases that warn, and argument types that refuse nonsense with one line.

Neutral: it imports nothing of the roles, so `python -m training` and `python -m serving` both use it and the
flags mean one thing everywhere (docs/cli.md lists them).
"""

from __future__ import annotations

import argparse
import os
import sys


def prog_name(module: str) -> str:
    """`python -m serving` when run as a module, else the installed script's own name (`cnn-serve`)."""
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if not script or script in ("__main__.py", "-c") or script.endswith(".py"):
        return f"python -m {module}"
    return script


def add_alias(parser: argparse.ArgumentParser | argparse._ArgumentGroup, old: str, new: str, dest: str,
              **kwargs) -> None:
    """Accept `old` as a hidden spelling of `new`: it stores into the same `dest` and warns on stderr, so
    scripts written for the old spelling keep working while they are moved to the new one."""

    class _Alias(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            print(f"warning: {old} is deprecated; use {new}", file=sys.stderr)
            setattr(namespace, self.dest, True if self.nargs == 0 else values)

    parser.add_argument(old, dest=dest, action=_Alias, help=argparse.SUPPRESS, default=argparse.SUPPRESS, **kwargs)


def positive_int(text: str) -> int:
    """An int of at least 1 (argparse turns the ValueError into a one-line usage error)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def comma_list(text: str) -> list[str]:
    """host1:8001,host2:8001 -> a list; empty items dropped."""
    return [item.strip() for item in text.split(",") if item.strip()]


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Help that shows each flag's default (when it has a meaningful one) and keeps the description's layout."""

    def _get_help_string(self, action: argparse.Action) -> str:
        default = action.default
        # Identity, not equality: a default of 0 is worth showing where False (a switch) and "" (unset) are not.
        if default is None or default is False or default is argparse.SUPPRESS or default == "" \
                or "%(default)" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def flags(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The options of a parser (not --help): argparse keeps them in a private list, read here and only here."""
    return [a for a in parser._actions if a.option_strings and a.dest != "help"]


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """A parser's subcommands by name (argparse keeps them in a private action, read here and only here)."""
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)
