"""What every ``gamverify`` command line shares: a parser whose errors are one ``ERROR:`` line with exit code 2, and
deprecated flag spellings that still work but say what replaced them.

Used by the one parser of :mod:`monai_gamverify.cli` and by the pass-through commands that keep a parser of their own
(``gamverify cohort`` = ``python -m monai_gamverify.apps.cohort``; a ``deploy``/``pacs`` command would do the same).

Example:
    >>> ap = CommandParser(prog="gamverify cohort")
    >>> ap.add_argument("--seg_labels", nargs="+")
    >>> add_deprecated_alias(ap, "--labels", "--seg_labels", nargs="+")
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

__all__ = ["CommandParser", "DeprecatedAlias", "add_deprecated_alias", "EXIT_USAGE"]

#: exit code of a command-line mistake (a mistyped flag, a bad value), as argparse uses it
EXIT_USAGE = 2


class CommandParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are exactly one line on stderr, ``ERROR: <prog>: <message> (see <prog>
    --help)``, and exit code 2; abbreviated flags are refused (``--out`` never silently means ``--out_dir``).

    Subparsers made with ``add_subparsers`` are of the same class, so ``gamverify screen fit --nope`` errs the same way.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        """Print one ``ERROR:`` line and exit with code 2 (argparse's default prints the usage block too)."""
        line = " ".join(str(message).split())
        print(f"ERROR: {self.prog}: {line} (see {self.prog} --help)", file=sys.stderr, flush=True)
        sys.exit(EXIT_USAGE)


class DeprecatedAlias(argparse.Action):
    """An old flag spelling: stores into the new flag's destination and warns once on stderr that it is deprecated.

    Args:
        option_strings: the old spelling(s).
        dest: the new flag's destination.
        new: the new spelling, named in the warning.
        kwargs: the rest of ``add_argument``'s keywords (``nargs``, ``type``, ...).
    """

    def __init__(self, option_strings: Sequence[str], dest: str, new: str = "", **kwargs: Any) -> None:
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: str | None = None
    ) -> None:
        print(
            f"WARNING: {option} is deprecated and will be removed; use {self.new} (same values)",
            file=sys.stderr,
            flush=True,
        )
        setattr(namespace, self.dest, values)


def add_deprecated_alias(parser: argparse.ArgumentParser, old: str, new: str, **kwargs: Any) -> argparse.Action:
    """Let ``old`` keep working as ``new`` (same destination), with a warning; listed in ``--help`` as deprecated.

    Args:
        parser: the parser that defines ``new``.
        old: the deprecated spelling, e.g. ``"--labels"``.
        new: the current spelling, e.g. ``"--seg_labels"``.
        kwargs: ``add_argument`` keywords of the old flag (``nargs``, ``type``).

    Returns:
        The added action.
    """
    dest = new.lstrip("-").replace("-", "_")
    kwargs.setdefault("default", argparse.SUPPRESS)  # the new flag sets the default
    return parser.add_argument(old, action=DeprecatedAlias, dest=dest, new=new, help=f"deprecated: use {new}", **kwargs)
