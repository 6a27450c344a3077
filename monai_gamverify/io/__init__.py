"""Files: atomic writes (:mod:`.files`), the one NIfTI writer/reader (:mod:`.nifti`), DICOM series and their affine
(:mod:`.dicom`), the way back to the input grid (:mod:`.grid`) and unique output names (:mod:`.names`)."""

from __future__ import annotations

from monai_gamverify.io.dicom import (
    dicom_affine,
    dicom_series,
    is_dicom_file,
    read_dicom,
    read_dicom_headers,
    series_affine_from_metadata,
)
from monai_gamverify.io.files import FILE_MODE, atomic_path, write_csv, write_json
from monai_gamverify.io.grid import fast_invert, invert_to_input, to_input_grid
from monai_gamverify.io.nifti import affine_of, load_image, save_map, save_nifti

__all__ = [
    "FILE_MODE",
    "atomic_path",
    "write_csv",
    "write_json",
    "affine_of",
    "load_image",
    "save_map",
    "save_nifti",
    "fast_invert",
    "invert_to_input",
    "to_input_grid",
    "dicom_affine",
    "dicom_series",
    "is_dicom_file",
    "read_dicom",
    "read_dicom_headers",
    "series_affine_from_metadata",
]
