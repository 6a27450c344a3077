"""Entry point of the packaged app (``monai-deploy package`` runs ``python <app folder>``): the SDK application when
the MONAI Deploy App SDK is installed, else the same study -> SR + overlay (+ SEG) route without it
(:func:`monai_gamverify.apps.integrations.deploy.folder_main`)."""

from __future__ import annotations

import sys

from monai_gamverify.apps.integrations.deploy import folder_main, sdk_available

if __name__ == "__main__":
    if sdk_available():
        from app import main  # this folder is sys.path[0] when run as `python <folder>`

        main()
    else:
        sys.exit(folder_main())
