"""``python -m monai_gamverify``: the ``gamverify`` command."""

from __future__ import annotations

from monai_gamverify.cli import main

__all__: list[str] = []

if __name__ == "__main__":
    main()
