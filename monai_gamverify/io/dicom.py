"""DICOM input: a series directory or a single file read as a MONAI ``MetaTensor`` (ITK/GDCM through MONAI's
``ITKReader``), the RAS affine of a series from its headers (:func:`dicom_affine`), and header reading without
pydicom (:func:`read_dicom_headers`).

Axis convention (MONAI's ``ITKReader``): array axis 0 runs along a row (the column index, DICOM's first
``ImageOrientationPatient`` vector), axis 1 down a column (the row index, the second vector), axis 2 across slices
in increasing position along the slice normal.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "dicom_affine",
    "dicom_series",
    "is_dicom_file",
    "read_dicom",
    "read_dicom_headers",
    "series_affine_from_metadata",
]

logger = logging.getLogger(__name__)

# DICOM tags as GDCM names them
_TAGS = {
    "ImageOrientationPatient": "0020|0037",
    "ImagePositionPatient": "0020|0032",
    "PixelSpacing": "0028|0030",
    "SliceThickness": "0018|0050",
    "SpacingBetweenSlices": "0018|0088",
    "SeriesInstanceUID": "0020|000e",
}
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def is_dicom_file(path: str | os.PathLike) -> bool:
    """True for a file with the DICOM preamble (``DICM`` at byte 128) or a ``.dcm`` suffix."""
    p = Path(path)
    if not p.is_file():
        return False
    if p.suffix.lower() == ".dcm":
        return True
    try:
        with p.open("rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def dicom_series(directory: str | os.PathLike) -> dict[str, list[str]]:
    """The DICOM series of a directory: GDCM series identifier (the SeriesInstanceUID, followed by details that
    split a series of mixed geometry) -> its files sorted along the slice normal.

    Example:
        >>> series = dicom_series("CT_dir")
    """
    import itk  # optional at import time: only DICOM input needs ITK (a MONAI "itk" extra)

    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"DICOM series directory not found: {d}")
    gen = itk.GDCMSeriesFileNames.New()
    gen.SetUseSeriesDetails(True)
    gen.AddSeriesRestriction("0008|0021")  # series date, as MONAI's ITKReader: the same identifiers
    gen.SetDirectory(str(d))
    return {str(uid): [str(f) for f in gen.GetFileNames(uid)] for uid in gen.GetSeriesUIDs()}


def read_dicom(path: str | os.PathLike, *, series_uid: str | None = None, channel_first: bool = True):
    """Read a DICOM series directory or a single DICOM file as a ``MetaTensor`` (RAS affine).

    Args:
        path: a directory holding one series (or several: then pass ``series_uid``) or one DICOM file.
        series_uid: the series to read from a directory of several.
        channel_first: add a channel axis in front.

    Returns:
        ``MetaTensor`` (1, X, Y, Z) (a single 2D file gives Z = 1).

    Raises:
        ValueError: no DICOM in the directory, several series without ``series_uid``, or an unknown UID.

    Example:
        >>> img = read_dicom("CT_dir")
    """
    from monai.data import ITKReader
    from monai.transforms import LoadImage

    p = Path(path)
    if p.is_dir():
        series = dicom_series(p)
        if not series:
            raise ValueError(f"no DICOM series in directory {p}")
        if series_uid is None and len(series) > 1:
            raise ValueError(f"directory {p} holds {len(series)} DICOM series {sorted(series)}; pass series_uid=")
        uid = next(iter(series))
        if series_uid is not None:
            # GDCM names a series by its SeriesInstanceUID plus details (e.g. "<uid>.1.088"): accept either
            match = [k for k in series if k == series_uid or k.startswith(f"{series_uid}.")]
            exact = [k for k in match if k == series_uid]
            if not match:
                raise ValueError(f"series {series_uid!r} not in {p}; it holds {sorted(series)}")
            if len(match) > 1 and not exact:
                raise ValueError(f"series {series_uid!r} in {p} splits into {sorted(match)}; pass one of them")
            uid = exact[0] if exact else match[0]
        reader = ITKReader(series_name=uid)
    elif p.is_file():
        reader = ITKReader()
    else:
        raise FileNotFoundError(f"DICOM file or directory not found: {p}")
    try:
        return LoadImage(reader=reader, image_only=True, ensure_channel_first=channel_first)(str(p))
    except Exception as err:  # readers raise many types; name the input
        raise ValueError(f"cannot read DICOM {p}: {type(err).__name__}: {err}") from err


def _floats(value: Any) -> list[float]:
    if isinstance(value, str):
        return [float(v) for v in value.strip().strip("\x00").split("\\") if v.strip()]
    if isinstance(value, (int, float)):
        return [float(value)]
    return [float(v) for v in value]


def _get(ds: Any, key: str) -> Any:
    if isinstance(ds, Mapping):
        return ds.get(key)
    return getattr(ds, key, None)


def read_dicom_headers(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[dict[str, Any]]:
    """Geometry headers of DICOM files read with GDCM (no pydicom needed): ``ImageOrientationPatient``,
    ``ImagePositionPatient``, ``PixelSpacing``, ``SliceThickness``, ``SpacingBetweenSlices``, ``SeriesInstanceUID``
    (absent tags are left out).

    Args:
        paths: a file, a list of files, or a directory (all its files with the DICOM preamble or ``.dcm``).

    Returns:
        One dict per file, numbers as float lists (the UID as a string).

    Example:
        >>> dicom_affine(read_dicom_headers("CT_dir"))
    """
    import itk  # optional at import time: only DICOM input needs ITK

    if isinstance(paths, (str, os.PathLike)):
        p = Path(paths)
        files = sorted(f for f in p.iterdir() if is_dicom_file(f)) if p.is_dir() else [p]
    else:
        files = [Path(f) for f in paths]
    out = []
    for f in files:
        io = itk.GDCMImageIO.New()
        io.SetFileName(str(f))
        io.ReadImageInformation()
        md = io.GetMetaDataDictionary()
        hdr: dict[str, Any] = {}
        for name, tag in _TAGS.items():
            if md.HasKey(tag):
                raw = str(md[tag])
                hdr[name] = raw.strip().strip("\x00") if name == "SeriesInstanceUID" else _floats(raw)
        out.append(hdr)
    return out


def dicom_affine(datasets: Any) -> np.ndarray:
    """RAS affine of a DICOM series from its headers, for array axes (column index, row index, slice) as MONAI's
    ``ITKReader`` returns them.

    ``ImageOrientationPatient`` = (row direction, column direction) in LPS; ``PixelSpacing`` = [row spacing,
    column spacing]: the first array axis (moving along a row, i.e. in the row direction) steps by
    ``PixelSpacing[1]``, the second by ``PixelSpacing[0]``. Slices are sorted by their position along the normal
    (row x column); the slice step is (last - first) / (n - 1) (a warning when gaps differ by more than 1 %); a
    single slice steps ``SpacingBetweenSlices``, else ``SliceThickness``, else 1 mm along the normal.

    Args:
        datasets: pydicom ``Dataset`` objects, dicts (e.g. from :func:`read_dicom_headers`), or one of them.

    Returns:
        4x4 float64 affine (index -> RAS mm).

    Example:
        >>> affine = dicom_affine(read_dicom_headers("CT_dir"))
    """
    items = [datasets] if isinstance(datasets, Mapping) or hasattr(datasets, "ImagePositionPatient") else list(datasets)
    if not items:
        raise ValueError("dicom_affine needs at least one DICOM header")
    iops = [_get(d, "ImageOrientationPatient") for d in items]
    if any(v is None for v in iops):
        raise ValueError("a DICOM header lacks ImageOrientationPatient (0020,0037)")
    iop = np.asarray(_floats(iops[0]), dtype=np.float64)
    if iop.shape != (6,):
        raise ValueError(f"ImageOrientationPatient must hold 6 numbers, got {iop.tolist()}")
    for other in iops[1:]:
        if not np.allclose(_floats(other), iop, atol=1e-4):
            raise ValueError("the slices of the series have different ImageOrientationPatient: not one volume")
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    spacing = _get(items[0], "PixelSpacing")
    if spacing is None:
        raise ValueError("a DICOM header lacks PixelSpacing (0028,0030)")
    row_spacing, col_spacing = _floats(spacing)[:2]
    positions = []
    for d in items:
        ipp = _get(d, "ImagePositionPatient")
        if ipp is None:
            raise ValueError("a DICOM header lacks ImagePositionPatient (0020,0032)")
        positions.append(np.asarray(_floats(ipp), dtype=np.float64))
    order = np.argsort([float(p @ normal) for p in positions], kind="stable")
    positions = [positions[i] for i in order]
    if len(positions) > 1:
        step = (positions[-1] - positions[0]) / (len(positions) - 1)
        gaps = np.array([float((b - a) @ normal) for a, b in zip(positions[:-1], positions[1:])])
        if gaps.min() <= 0:
            raise ValueError("two slices of the series share a position: not one volume (several series mixed?)")
        if gaps.max() - gaps.min() > 0.01 * abs(gaps.mean()):
            logger.warning("DICOM slice gaps differ (%.4g to %.4g mm): using their mean", gaps.min(), gaps.max())
    else:
        thick = _get(items[0], "SpacingBetweenSlices") or _get(items[0], "SliceThickness")
        step = normal * (_floats(thick)[0] if thick is not None else 1.0)
    lps = np.eye(4)
    lps[:3, 0] = row * col_spacing
    lps[:3, 1] = col * row_spacing
    lps[:3, 2] = step
    lps[:3, 3] = positions[0]
    return _LPS_TO_RAS @ lps


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
    return _LPS_TO_RAS @ affine if ras else affine
