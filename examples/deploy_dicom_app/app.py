"""MONAI Deploy (App SDK 4.x) application: DICOM study -> bundle prediction + Grad-CAM + suitability verdict (JSON).

    python examples/deploy_dicom_app/app.py -i dicom_study/ -o out/ -m models/ \
        [--bundle-name sos_staging] [--reference verify/reference_map.nii.gz --verifier verify/verifier.skops] \
        [--rules rules.json] [--threshold 0.5] [--overrides '{"network_name": "small_cnn"}'] [--allow-random-weights]

Chain: ``DICOMDataLoaderOperator`` -> ``DICOMSeriesSelectorOperator`` (CT, else MR; original primary series) ->
``SeriesCheckOperator`` (a clear error when no series matches) -> ``DICOMSeriesToVolumeOperator`` ->
``GamverifyOperator``. ``-m`` may be the bundle itself or the SDK's default layout ``<model path>/models/<bundle>``.
The bundle and its weights are checked when the app is composed, before the study is read. Writes
``out/<SeriesInstanceUID>_cam.nii.gz`` (the map on the series' grid, RAS affine from ImageOrientationPatient /
ImagePositionPatient / PixelSpacing), ``out/<SeriesInstanceUID>_gamverify.json`` (prediction, probabilities,
garbage rejection, verdict, the series' UIDs and modality) and the DICOM answer in
``out/dicom/<new SeriesInstanceUID>/``: a Comprehensive SR, the Secondary Capture overlay series and, for a
segmentation bundle, a SEG (``--no-dicom-out``: none). ``python examples/deploy_dicom_app ...`` (``__main__.py``,
what ``monai-deploy package`` runs) does the same without the SDK when it is not installed.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from monai.deploy.conditions import CountCondition
from monai.deploy.core import Application
from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator
from monai.deploy.operators.dicom_series_selector_operator import DICOMSeriesSelectorOperator
from monai.deploy.operators.dicom_series_to_volume_operator import DICOMSeriesToVolumeOperator

from monai_gamverify.apps.integrations.deploy import (
    GamverifyOperator,
    SeriesCheckOperator,
    parse_app_options,
    runner_kwargs,
)


class GamverifyDicomApp(Application):
    """DICOM loader -> series selector -> series check -> volume -> GamverifyOperator."""

    def __init__(self, *args, gamverify_options=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gamverify_options = gamverify_options or parse_app_options([], dicom=True)[0]

    def compose(self) -> None:
        ctx = Application.init_app_context(self.argv)
        opts = self.gamverify_options
        # first: the bundle is resolved, its weights checked and its network built before any DICOM file is read
        gamverify = GamverifyOperator(
            self,
            bundle_path=Path(ctx.model_path),
            output_folder=Path(ctx.output_path),
            name="gamverify",
            dicom_input=Path(ctx.input_path) if getattr(opts, "dicom_out", True) else None,
            **runner_kwargs(opts),
        )
        loader = DICOMDataLoaderOperator(self, CountCondition(self, 1), input_folder=Path(ctx.input_path), name="load")
        selector = DICOMSeriesSelectorOperator(self, rules=opts.rules, name="select")
        check = SeriesCheckOperator(self, rules=opts.rules, name="series_check")
        volume = DICOMSeriesToVolumeOperator(self, name="volume")
        self.add_flow(loader, selector, {("dicom_study_list", "dicom_study_list")})
        self.add_flow(loader, check, {("dicom_study_list", "dicom_study_list")})
        self.add_flow(selector, check, {("study_selected_series_list", "study_selected_series_list")})
        self.add_flow(check, volume, {("study_selected_series_list", "study_selected_series_list")})
        self.add_flow(volume, gamverify, {("image", "image")})


def main(argv: list[str] | None = None) -> None:
    """Parse this app's options, then run the SDK application with the remaining arguments."""
    argv = list(sys.argv if argv is None else argv)
    opts, rest = parse_app_options(argv[1:], dicom=True)
    logging.basicConfig(level=logging.INFO)
    GamverifyDicomApp([sys.executable, argv[0], *rest], gamverify_options=opts).run()


if __name__ == "__main__":
    main()
