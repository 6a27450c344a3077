"""File input/output shared by the whole package: atomic writes, NIfTI maps aligned with their image, tables."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["atomic_path", "save_nifti", "load_image", "write_json", "write_csv", "affine_of"]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path`` (never a half-written file).

    Example:
        >>> with atomic_path("table.csv") as tmp:
        ...     df.to_csv(tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # keep the real suffix so writers that infer the format from the name (nibabel, pandas) still work
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix="".join(path.suffixes) or ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600 files; give the result the permissions a plain open() would (umask applied)
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


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
    import nibabel as nib

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


def load_image(path: str | os.PathLike, *, channel_first: bool = True, check_finite: bool = True):
    """Load a medical image (NIfTI, NRRD, MHA, ...) as a MONAI ``MetaTensor`` with a clear error on bad files.

    Args:
        path: the file to read.
        channel_first: add/move a channel axis in front.
        check_finite: raise on NaN/inf voxels.

    Returns:
        ``MetaTensor`` of shape (C, *spatial) (or (*spatial) if ``channel_first=False``) carrying the affine.
    """
    from monai.transforms import LoadImage

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"image file not found: {p}")
    try:
        img = LoadImage(image_only=True, ensure_channel_first=channel_first)(str(p))
    except Exception as err:  # readers raise many types; name the file
        raise ValueError(f"cannot read image {p}: {type(err).__name__}: {err}") from err
    if check_finite and not torch.isfinite(img).all():
        raise ValueError(f"image {p} contains NaN or infinite voxels")
    return img


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented JSON atomically (numpy scalars and arrays converted)."""

    def default(o: Any) -> Any:
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, (np.ndarray, torch.Tensor)):
            return o.tolist()
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"not JSON serialisable: {type(o).__name__}")

    out = Path(path)
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=default) + "\n")
    return out


def write_csv(df: Any, path: str | os.PathLike, **kwargs: Any) -> Path:
    """Write a pandas DataFrame as CSV atomically (``index=False`` unless given)."""
    kwargs.setdefault("index", False)
    out = Path(path)
    with atomic_path(out) as tmp:
        df.to_csv(tmp, **kwargs)
    return out
