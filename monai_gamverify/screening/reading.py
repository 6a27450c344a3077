"""Read what a user points the screen at: NIfTI/NRRD/MHA files, one DICOM file or a DICOM series directory.

Example:
    >>> img = read_image("series_dir/")      # channel-first MetaTensor with the series' affine
    >>> pre = preprocessing_after_loading(load_bundle("bundles/sos_staging"))
    >>> x = pre(img)                          # what the bundle's network sees
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["read_image", "preprocessing_after_loading", "ImageReadError"]


class ImageReadError(ValueError):
    """An image the screen cannot read; the message names the file."""


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in (".dcm", ".dicom", ".ima"):
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


@functools.lru_cache(maxsize=4)
def _loader(reader: str | None) -> Any:
    """One ``LoadImage`` per reader choice (building one registers every reader, which logs on each build)."""
    from monai.transforms import LoadImage

    return LoadImage(image_only=True, reader=reader)


def read_image(path: str | os.PathLike) -> Any:
    """Load an image as a channel-first MONAI ``MetaTensor`` in native units (no resampling, no scaling).

    A directory is read as one DICOM series (ITK/GDCM, slices sorted by position); a file with a ``.dcm`` suffix or
    the DICOM magic bytes is read by ITK; other files by MONAI's default readers (NIfTI, NRRD, MHA, ...).

    Args:
        path: file or DICOM series directory.

    Returns:
        ``MetaTensor`` (C, *spatial) with the affine and ``filename_or_obj`` in its meta.

    Raises:
        FileNotFoundError: the path does not exist.
        ImageReadError: it cannot be read (the message names it and the reader's reason).

    Example:
        >>> read_image("ct.nii.gz").shape
        torch.Size([1, 512, 512, 120])
    """
    from monai.transforms import EnsureChannelFirst

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"image not found: {p}")
    if p.is_dir():
        if not any(f.is_file() for f in p.iterdir()):
            raise ImageReadError(f"cannot read image {p}: the directory is empty (expected a DICOM series)")
        reader: Any = "ITKReader"
    elif _is_dicom(p):
        reader = "ITKReader"
    else:
        reader = None
    try:
        try:
            img = _loader(reader)(str(p))
        except Exception:
            if reader is not None or p.is_dir():
                raise
            img = _loader("NibabelReader")(str(p))  # formats ITK lacks (e.g. FreeSurfer .mgz)
        img = EnsureChannelFirst()(img)
    except Exception as err:  # readers raise many types; name the file and keep the reader's reason
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        kind = "DICOM series directory" if p.is_dir() else "file"
        raise ImageReadError(f"cannot read image {kind} {p}: {type(err).__name__}: {reason}") from err
    if not isinstance(img, torch.Tensor):
        raise ImageReadError(f"cannot read image {p}: the reader returned {type(img).__name__}")
    img.meta["filename_or_obj"] = str(p)
    return img


def preprocessing_after_loading(bundle: Any, key: str = "image") -> Callable[[Any], torch.Tensor]:
    """The bundle's inference ``preprocessing`` applied to an already loaded channel-first image.

    The loading transforms (``LoadImage(d)``, ``EnsureChannelFirst(d)``) are left out; everything else (orientation,
    spacing, intensity window, crop/pad, type) runs as in the bundle. A bundle without ``preprocessing`` gives a
    function that only converts to float32.

    Args:
        bundle: a :class:`monai_gamverify.bundle.BundleModel` (or any object with a ``preprocessing()`` method).
        key: the image key of the bundle's dictionary transforms.

    Returns:
        ``f(image (C, *spatial)) -> (C, *spatial') float32 tensor``.
    """
    from monai.transforms import Compose, EnsureChannelFirst, EnsureChannelFirstd, LoadImage, LoadImaged

    pre = bundle.preprocessing()
    if pre is None:
        return lambda img: torch.as_tensor(img, dtype=torch.float32)
    ts = list(pre.transforms) if isinstance(pre, Compose) else [pre]
    skip = (LoadImage, LoadImaged, EnsureChannelFirst, EnsureChannelFirstd)
    rest = Compose([t for t in ts if not isinstance(t, skip)])
    dict_mode = any(hasattr(t, "keys") for t in rest.transforms)

    def run(img: Any) -> torch.Tensor:
        out = rest({key: img.clone()})[key] if dict_mode else rest(img.clone())
        return torch.as_tensor(out, dtype=torch.float32)

    return run
