"""Tiny MONAI Deploy (App SDK 4.x) application: image file -> bundle prediction + Grad-CAM + suitability verdict.

    python examples/deploy_app/app.py -i input.nii.gz -o out/ -m bundles/sos_staging \
        [--reference verify/reference_map.nii.gz --verifier verify/verifier.skops] [--threshold 0.5] \
        [--overrides '{"network_name": "small_cnn"}'] [--allow-random-weights]

``-i``/``-o``/``-m`` are the SDK's own arguments (also read from ``HOLOSCAN_INPUT_PATH``, ``HOLOSCAN_OUTPUT_PATH`` and
``HOLOSCAN_MODEL_PATH``); the others are this app's. Writes ``out/<name>_cam.nii.gz`` (aligned with the input) and
``out/<name>_gamverify.json`` (prediction, probabilities, garbage rejection, verdict).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from monai.deploy.conditions import CountCondition
from monai.deploy.core import Application

from monai_gamverify.apps.integrations.deploy import GamverifyOperator, ImageFileLoaderOperator


def gamverify_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """This app's own options; the rest (``-i``, ``-o``, ``-m``, ``-l``) is left for the SDK."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--reference", default=None, help="reference map (.nii.gz) of the verifier")
    parser.add_argument("--verifier", default=None, help="fitted SuitabilityVerifier (.skops)")
    parser.add_argument("--threshold", type=float, default=0.5, help="P(suitable) threshold")
    parser.add_argument("--garbage-threshold", type=float, default=None, help="reject when p(garbage) >= this")
    parser.add_argument("--overrides", default=None, help="bundle config overrides as JSON")
    parser.add_argument("--allow-random-weights", action="store_true", help="run a bundle without models/model.pt")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: CUDA when available)")
    return parser.parse_known_args(argv)


class GamverifyApp(Application):
    """Loader -> GamverifyOperator; the operator writes the map and the JSON in the output folder."""

    def __init__(self, *args, gamverify_options: argparse.Namespace | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gamverify_options = gamverify_options or gamverify_args([])[0]

    def compose(self) -> None:
        ctx = Application.init_app_context(self.argv)
        opts = self.gamverify_options
        loader = ImageFileLoaderOperator(self, CountCondition(self, 1), input_path=Path(ctx.input_path), name="load")
        gamverify = GamverifyOperator(
            self,
            bundle_path=Path(ctx.model_path),
            output_folder=Path(ctx.output_path),
            reference=opts.reference,
            verifier=opts.verifier,
            threshold=opts.threshold,
            garbage_threshold=opts.garbage_threshold,
            overrides=json.loads(opts.overrides) if opts.overrides else None,
            require_weights=not opts.allow_random_weights,
            device=opts.device,
            name="gamverify",
        )
        self.add_flow(loader, gamverify, {("image", "image")})


def main(argv: list[str] | None = None) -> None:
    """Parse this app's options, then run the SDK application with the remaining arguments."""
    argv = list(sys.argv if argv is None else argv)
    opts, rest = gamverify_args(argv[1:])
    logging.basicConfig(level=logging.INFO)
    GamverifyApp([sys.executable, argv[0], *rest], gamverify_options=opts).run()


if __name__ == "__main__":
    main()
