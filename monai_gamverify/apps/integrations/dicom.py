"""The affine of a DICOM series volume, correct for non-square pixels, without the MONAI Deploy SDK.

DICOM ``PixelSpacing`` is ``[row spacing, column spacing]``: ``PixelSpacing[0]`` is the distance between the centres
of adjacent *rows* (a step along the column direction, ``ImageOrientationPatient[3:6]``) and ``PixelSpacing[1]`` the
distance between adjacent *columns* (a step along the row direction, ``ImageOrientationPatient[0:3]``; DICOM PS3.3
C.7.6.2.1.1). MONAI Deploy App SDK 4.0 (``DICOMSeriesToVolumeOperator.compute_affine_transform``) scales the row
direction by ``PixelSpacing[0]``: its ``dicom_affine_transform`` and ``nifti_affine_transform`` are wrong whenever the
two spacings differ (ITK and MONAI's ``PydicomReader`` agree with the standard). The functions here rebuild the affine
from the series' own attributes.

Index order: the affine maps ``(i, j, k)`` = (column, row, slice) indices, i.e. the SDK's (D, H, W) array swapped to
(W, H, D), which is also ITK's index order and what ``MonaiBundleInferenceOperator`` feeds a bundle.

Example:
    >>> affine = series_affine_from_metadata(image.metadata())  # SDK Image from DICOMSeriesToVolumeOperator
    >>> affine = dicom_affine(pydicom_datasets)                   # the slices of one series, any order
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["lps_to_ras", "series_affine_from_metadata", "dicom_affine", "sort_slices"]

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def lps_to_ras(affine: np.ndarray) -> np.ndarray:
    """DICOM patient (LPS) affine -> NIfTI/MONAI (RAS) affine: negate the first two world axes."""
    return _LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)


def _vec(value: Any, n: int, what: str) -> np.ndarray:
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"DICOM {what} must be {n} numbers, got {value!r}") from err
    if arr.shape != (n,) or not np.isfinite(arr).all():
        raise ValueError(f"DICOM {what} must be {n} finite numbers, got {value!r}")
    return arr


def _build(
    row_cos: np.ndarray, col_cos: np.ndarray, spacing: np.ndarray, origin: np.ndarray, slice_step: np.ndarray
) -> np.ndarray:
    if spacing[0] <= 0 or spacing[1] <= 0:
        raise ValueError(f"DICOM PixelSpacing must be positive, got {spacing.tolist()}")
    affine = np.eye(4)
    affine[:3, 0] = row_cos * spacing[1]  # i (column index) moves along the row direction by the column spacing
    affine[:3, 1] = col_cos * spacing[0]  # j (row index) moves along the column direction by the row spacing
    affine[:3, 2] = slice_step
    affine[:3, 3] = origin
    return affine


def series_affine_from_metadata(meta: Mapping[str, Any], *, ras: bool = True) -> np.ndarray:
    """Affine of a ``DICOMSeriesToVolumeOperator`` image from its metadata, for the array swapped to (W, H, D).

    Uses ``row_direction_cosine`` / ``col_direction_cosine`` (``ImageOrientationPatient``), ``row_pixel_spacing`` /
    ``col_pixel_spacing`` (``PixelSpacing[0]`` / ``[1]``, as the SDK's loader stores them), and from the SDK's
    ``dicom_affine_transform`` only what it gets right: the first slice's ``ImagePositionPatient`` (column 3) and the
    step between slices, ``(IPP_last - IPP_first) / (n - 1)`` (column 2). Without it (a single slice), the slice
    step is the slice normal times ``depth_pixel_spacing`` (1 by default, as the SDK and ITK do).

    Args:
        meta: the SDK ``Image``'s ``metadata()``.
        ras: return the RAS (NIfTI, MONAI) affine; ``False`` gives the DICOM LPS one.

    Returns:
        4x4 float64 affine.

    Raises:
        ValueError: naming the missing or malformed attribute.

    Example:
        >>> arr = np.swapaxes(image.asnumpy(), 0, 2)  # (D, H, W) -> (W, H, D)
        >>> affine = series_affine_from_metadata(image.metadata())
    """
    missing = [
        k
        for k in ("row_direction_cosine", "col_direction_cosine", "row_pixel_spacing", "col_pixel_spacing")
        if meta.get(k) is None
    ]
    if missing:
        raise ValueError(f"DICOM series metadata lacks {missing}: cannot place the volume in patient space")
    row_cos = _vec(meta["row_direction_cosine"], 3, "row direction cosine (ImageOrientationPatient[0:3])")
    col_cos = _vec(meta["col_direction_cosine"], 3, "column direction cosine (ImageOrientationPatient[3:6])")
    spacing = _vec([meta["row_pixel_spacing"], meta["col_pixel_spacing"]], 2, "PixelSpacing")
    sdk = meta.get("dicom_affine_transform")
    if sdk is not None:
        sdk = np.asarray(sdk, dtype=np.float64)
        if sdk.shape != (4, 4) or not np.isfinite(sdk).all():
            raise ValueError(f"DICOM series metadata dicom_affine_transform must be a finite 4x4, got {sdk.shape}")
        origin, step = sdk[:3, 3], sdk[:3, 2]
    else:
        origin = _vec(meta.get("image_position_patient", (0.0, 0.0, 0.0)), 3, "ImagePositionPatient")
        normal = meta.get("depth_direction_cosine")
        normal = np.cross(row_cos, col_cos) if normal is None else _vec(normal, 3, "slice normal")
        step = normal * float(meta.get("depth_pixel_spacing") or 1.0)
    affine = _build(row_cos, col_cos, spacing, origin, step)
    return lps_to_ras(affine) if ras else affine


def sort_slices(datasets: Sequence[Any]) -> list[Any]:
    """The slices of one series sorted by position along the slice normal (as ITK and the SDK order them)."""
    if not datasets:
        raise ValueError("no DICOM slices given")
    iop = _vec(datasets[0].ImageOrientationPatient, 6, "ImageOrientationPatient")
    normal = np.cross(iop[:3], iop[3:])
    return sorted(datasets, key=lambda ds: float(normal @ _vec(ds.ImagePositionPatient, 3, "ImagePositionPatient")))


def dicom_affine(datasets: Sequence[Any], *, ras: bool = True) -> np.ndarray:
    """Affine of a series from its pydicom datasets, for the (column, row, slice) index order.

    Args:
        datasets: the slices of one series (``ImageOrientationPatient``, ``ImagePositionPatient``, ``PixelSpacing``),
            in any order; they are sorted along the slice normal.
        ras: RAS (NIfTI, MONAI) affine; ``False`` gives the DICOM LPS one.

    Returns:
        4x4 float64 affine.

    Example:
        >>> affine = dicom_affine([pydicom.dcmread(f) for f in files])
    """
    slices = sort_slices(datasets)
    first, last = slices[0], slices[-1]
    for ds in (first, last):
        for key in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing"):
            if key not in ds:
                raise ValueError(f"DICOM slice {getattr(ds, 'SOPInstanceUID', '?')} lacks {key}")
    iop = _vec(first.ImageOrientationPatient, 6, "ImageOrientationPatient")
    spacing = _vec(first.PixelSpacing, 2, "PixelSpacing")
    p1 = _vec(first.ImagePositionPatient, 3, "ImagePositionPatient")
    pn = _vec(last.ImagePositionPatient, 3, "ImagePositionPatient")
    n = len(slices)
    if n > 1:
        step = (pn - p1) / (n - 1)
    else:
        step = np.cross(iop[:3], iop[3:]) * float(getattr(first, "SliceThickness", None) or 1.0)
    affine = _build(iop[:3], iop[3:], spacing, p1, step)
    return lps_to_ras(affine) if ras else affine
