"""Tiny MONAI Deploy (App SDK 4.x) application: image file -> bundle prediction + Grad-CAM + suitability verdict.

    python examples/deploy_app/app.py -i input.nii.gz -o out/ -m bundles/sos_staging \
        [--reference verify/reference_map.nii.gz --verifier verify/verifier.skops] [--threshold 0.5] \
        [--overrides '{"network_name": "small_cnn"}'] [--bundle-name NAME] [--allow-random-weights]

``-i``/``-o``/``-m`` are the SDK's own arguments (also read from ``HOLOSCAN_INPUT_PATH``, ``HOLOSCAN_OUTPUT_PATH`` and
``HOLOSCAN_MODEL_PATH``); the others are this app's. Writes ``out/<name>_cam.nii.gz`` (aligned with the input) and
``out/<name>_gamverify.json`` (prediction, probabilities, garbage rejection, verdict).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from monai.deploy.conditions import CountCondition
from monai.deploy.core import Application

from monai_gamverify.apps.integrations.deploy import (
    GamverifyOperator,
    ImageFileLoaderOperator,
    parse_app_options,
    runner_kwargs,
)


class GamverifyApp(Application):
    """Loader -> GamverifyOperator; the operator writes the map and the JSON in the output folder."""

    def __init__(self, *args, gamverify_options=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gamverify_options = gamverify_options or parse_app_options([])[0]

    def compose(self) -> None:
        ctx = Application.init_app_context(self.argv)
        opts = self.gamverify_options
        # first: the bundle is resolved, its weights checked and its network built before the input is read
        gamverify = GamverifyOperator(
            self,
            bundle_path=Path(ctx.model_path),
            output_folder=Path(ctx.output_path),
            name="gamverify",
            **runner_kwargs(opts),
        )
        loader = ImageFileLoaderOperator(self, CountCondition(self, 1), input_path=Path(ctx.input_path), name="load")
        self.add_flow(loader, gamverify, {("image", "image")})


def main(argv: list[str] | None = None) -> None:
    """Parse this app's options, then run the SDK application with the remaining arguments."""
    argv = list(sys.argv if argv is None else argv)
    opts, rest = parse_app_options(argv[1:])
    logging.basicConfig(level=logging.INFO)
    GamverifyApp([sys.executable, argv[0], *rest], gamverify_options=opts).run()


if __name__ == "__main__":
    main()
