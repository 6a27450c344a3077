"""NIfTI maps aligned with their image (the one writer), affines, and image reading with clear errors."""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.transforms import LoadImage

from monai_gamverify.io.dicom import is_dicom_file, read_dicom
from monai_gamverify.io.files import atomic_path

__all__ = ["affine_of", "save_nifti", "save_map", "load_image"]


def affine_of(reference: Any) -> np.ndarray:
    """4x4 affine of ``reference``: a ``MetaTensor`` (first item if batched), an array, or ``None`` (identity)."""
    if reference is None:
        return np.eye(4)
    affine = getattr(reference, "affine", reference)
    affine = np.asarray(affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
    if affine.ndim == 3:  # batched MetaTensor
        affine = affine[0]
    if affine.shape == (3, 3):  # 2D image: embed into 3D
        full = np.eye(4)
        full[:2, :2], full[:2, 3] = affine[:2, :2], affine[:2, 2]
        affine = full
    if affine.shape != (4, 4):
        raise ValueError(f"expected a 4x4 affine, got shape {affine.shape}")
    return affine


def save_nifti(data: Any, path: str | os.PathLike, reference: Any = None, dtype: Any = np.float32) -> Path:
    """Write ``data`` as NIfTI with the affine of ``reference`` so it overlays its image in 3D Slicer / ITK-SNAP.

    Args:
        data: array or tensor of shape (*spatial) or (1, *spatial); a leading channel of size 1 is dropped.
        path: output file (``.nii`` or ``.nii.gz``); written atomically.
        reference: the image the map belongs to (``MetaTensor``), an affine, or ``None`` (identity).
        dtype: stored data type.

    Returns:
        The written path.

    Example:
        >>> save_nifti(cam_map[0], "map.nii.gz", reference=image)
    """

    arr = data.detach().cpu().numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
    if arr.ndim in (3, 4) and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim not in (2, 3):
        raise ValueError(f"save_nifti expects (*spatial) or (1, *spatial) with 2 or 3 spatial axes, got {arr.shape}")
    ref = reference
    if isinstance(reference, (str, os.PathLike)):
        ref = nib.load(str(reference)).affine
    img = nib.Nifti1Image(np.ascontiguousarray(arr.astype(dtype)), affine_of(ref))
    out = Path(path)
    with atomic_path(out) as tmp:
        nib.save(img, str(tmp))
    return out


def save_map(cam: Any, path: str | os.PathLike, reference: Any = None, durable: bool = True) -> Path:
    """Write a map as float32 ``.nii.gz`` atomically: the bytes ``io.save_nifti`` writes before compression, gzip
    level 1 (nibabel's default level), built with ``Nifti1Image.to_bytes`` and one ``zlib`` call.

    ``nibabel.save`` adds ~3 ms of per-file bookkeeping to a 32^3 map; this does not, and zlib releases the GIL, so
    in the writer thread the compression runs beside the next item's forward pass. The gzip header holds no time
    stamp: the same map gives the same file.

    Args:
        cam: (*spatial) or (1, *spatial) array or tensor.
        path: output ``.nii.gz`` file.
        reference: the image the map belongs to (``MetaTensor``), its 4x4 affine, or ``None`` (identity).
        durable: write atomically and ``fsync`` (results that must survive a crash); ``False`` writes the bytes
            straight into ``path`` (a server's temporary answer file, deleted once sent: the sync costs more than
            the map).

    Returns:
        The written path.
    """

    arr = cam.detach().cpu().numpy() if isinstance(cam, torch.Tensor) else np.asarray(cam)
    if arr.ndim in (3, 4) and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim not in (2, 3):
        raise ValueError(f"a map must have shape (*spatial) or (1, *spatial) with 2 or 3 spatial axes, got {arr.shape}")
    raw = nib.Nifti1Image(np.ascontiguousarray(arr, dtype=np.float32), affine_of(reference)).to_bytes()
    gz = zlib.compressobj(1, zlib.DEFLATED, 31)  # wbits 31: gzip container
    out = Path(path)
    data = gz.compress(raw) + gz.flush()
    if not durable:
        out.write_bytes(data)
        return out
    with atomic_path(out) as tmp:
        tmp.write_bytes(data)
    return out


def load_image(
    path: str | os.PathLike, *, channel_first: bool = True, check_finite: bool = True, series_uid: str | None = None
):
    """Load a medical image as a MONAI ``MetaTensor`` with a clear error on bad input: a file (NIfTI, NRRD, MHA,
    a single DICOM file, ...) or a DICOM series directory.

    Args:
        path: the file, or a directory holding a DICOM series.
        channel_first: add/move a channel axis in front.
        check_finite: raise on NaN/inf voxels.
        series_uid: the series to read from a directory holding several.

    Returns:
        ``MetaTensor`` of shape (C, *spatial) (or (*spatial) if ``channel_first=False``) carrying the RAS affine.

    Example:
        >>> img = load_image("CT_series_dir")   # or "ct.nii.gz", "slice.dcm"
    """

    p = Path(path)
    if p.is_dir():
        img = read_dicom(p, series_uid=series_uid, channel_first=channel_first)
    elif not p.is_file():
        raise FileNotFoundError(f"image file not found: {p} (neither a file nor a DICOM series directory)")
    elif is_dicom_file(p):
        img = read_dicom(p, channel_first=channel_first)
    else:
        try:
            img = LoadImage(image_only=True, ensure_channel_first=channel_first)(str(p))
        except Exception as err:  # readers raise many types; name the file
            raise ValueError(f"cannot read image {p}: {type(err).__name__}: {err}") from err
    if check_finite and not torch.isfinite(img).all():
        raise ValueError(f"image {p} contains NaN or infinite voxels")
    return img
