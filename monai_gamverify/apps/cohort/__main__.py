"""``python -m monai_gamverify.apps.cohort`` / ``torchrun -m monai_gamverify.apps.cohort``: the same parser and exit
codes as ``gamverify cohort`` (:func:`monai_gamverify.apps.cohort.command.main`)."""

from __future__ import annotations

import os
import sys

from monai_gamverify.apps.cohort.command import main


def _exit(code: int) -> None:
    """Exit with ``code``; a worker of a multi-process run skips the interpreter's teardown (after flushing), where
    gloo's C++ threads can abort an already finished process ("terminate called without an active exception")."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    _exit(main(prog="python -m monai_gamverify.apps.cohort"))
