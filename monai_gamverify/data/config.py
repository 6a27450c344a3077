"""Entry points for bundle configs: a bad input ends the run with one line instead of a stack trace.

Library functions (:func:`~monai_gamverify.data.datalist.load_datalist`,
:func:`~monai_gamverify.kplus1.mix_garbage_dirs`, ...) raise :class:`~monai_gamverify.data.datalist.DataError`. A
bundle config is a command line in JSON: MONAI's config parser wraps every exception of an expression in a long
traceback, so the configs call those functions through :func:`exit_on_error`, which turns a ``DataError`` into
``SystemExit("ERROR: <message>")`` (not caught by the parser's ``except Exception``). Only configs should use it;
Python callers get the exception.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from monai_gamverify.data.datalist import DataError

__all__ = ["exit_on_error"]

T = TypeVar("T")


def exit_on_error(func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``func(*args, **kwargs)``; a :class:`DataError` ends the process with ``ERROR: <message>`` (``SystemExit``).

    Args:
        func: the library function (e.g. ``monai_gamverify.data.load_datalist``).
        *args: its positional arguments.
        **kwargs: its keyword arguments.

    Returns:
        What ``func`` returns.

    Raises:
        SystemExit: ``func`` raised a ``DataError`` (the message names the bad file).

    Example (in a bundle config)::

        "data": "$monai_gamverify.data.exit_on_error(monai_gamverify.data.load_datalist, @datalist, 'training')"
    """
    try:
        return func(*args, **kwargs)
    except DataError as err:
        raise SystemExit(f"ERROR: {err}") from None
