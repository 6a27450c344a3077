"""Load MONAI datalists and image lists for the bundles, failing early with a message that names the bad file.

A bundle run that meets a missing dataset directory, an empty datalist, a missing or corrupted image or an image of
the wrong dimensionality should stop before training starts, with one line saying which file is wrong, not with a
stack trace from deep inside a data-loader worker. :func:`load_datalist` and :func:`list_images` check everything up
front and raise a :class:`DataError`; bundle configs call them through
:func:`monai_gamverify.data.config.exit_on_error`, which turns that error into a one-line ``SystemExit``.

Example:
    >>> train = load_datalist("data/sos/datalist.json", "training", spatial_dims=3, num_classes=5)
    >>> train[0]["image"]
    '/abs/path/data/sos/images/sos_0000.nii.gz'
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from monai_gamverify.io.dicom import is_dicom_file
from monai_gamverify.io.nifti import load_image

__all__ = [
    "DataError",
    "check_image",
    "load_datalist",
    "read_datalist_split",
    "list_images",
    "require_file",
    "PATH_KEYS",
]

#: datalist entry keys holding file paths (resolved against the datalist's directory when relative)
PATH_KEYS = ("image", "mask", "seg")


class DataError(ValueError):
    """Bad bundle input (dataset directory, datalist or image file); the message names the file."""


def require_file(path: str | os.PathLike, what: str = "file", hint: str | None = None) -> str:
    """Return ``path`` if it is an existing file, else fail with ``"<what> not found: <path> (<hint>)"``.

    Args:
        path: the file.
        what: what the file is, for the message (e.g. ``"trained weights"``).
        hint: how to fix it.

    Returns:
        ``str(path)``.

    Raises:
        DataError: ``path`` is not a file.

    Example:
        >>> require_file("models/model.pt", "trained weights", hint="train the bundle first")
    """
    if not Path(path).is_file():
        raise DataError(f"{what} not found: {path}" + (f" ({hint})" if hint else ""))
    return str(path)


def _holds_dicom(directory: Path) -> bool:
    """Whether a directory holds a DICOM file (the scan stops at the first)."""
    return any(f.is_file() and is_dicom_file(f) for f in directory.iterdir())


def _input_problem(key: str, path: str, where: str) -> str | None:
    """Why ``path`` is no image input, or ``None`` for a file or a directory holding a DICOM file (a series).

    Only existence is checked (the first DICOM file ends the directory scan); reading is :func:`check_image`'s job.
    """
    p = Path(path)
    if p.is_file():
        return None
    if p.is_dir():
        if _holds_dicom(p):
            return None
        return f"{key} directory listed in {where} holds no DICOM file: {path}"
    return f"{key} file listed in {where} not found: {path} (neither a file nor a DICOM series directory)"


def check_image(
    path: str | os.PathLike,
    spatial_dims: int | None = 3,
    num_channels: int | None = 1,
    min_size: int = 2,
    check_finite: bool = True,
) -> tuple[int, ...]:
    """Read ``path`` completely and check that it is a finite image of the expected dimensionality.

    Args:
        path: image file (NIfTI, NRRD, MHA, DICOM, ... anything MONAI's ``LoadImage`` reads) or DICOM series
            directory.
        spatial_dims: expected number of spatial axes (``None``: no check).
        num_channels: expected number of channels (``None``: no check).
        min_size: every spatial axis must have at least this many voxels (a 2D slice stored as a 3D file with one
            slice is not a volume).
        check_finite: refuse NaN or infinite voxels.

    Returns:
        The channel-first shape of the image.

    Raises:
        DataError: naming the file, when it is missing, unreadable, has the wrong shape or holds NaN/inf.

    Example:
        >>> check_image("data/sos/images/sos_0000.nii.gz", spatial_dims=3)
        (1, 32, 32, 32)
    """
    p = Path(path)
    if not p.is_file() and not p.is_dir():
        raise DataError(f"image file not found: {p} (neither a file nor a DICOM series directory)")
    try:
        img = load_image(p, channel_first=True, check_finite=check_finite)
    except (MemoryError, torch.cuda.OutOfMemoryError):
        raise  # out of memory is not a bad file
    except Exception as err:  # readers raise many types: one clear message naming the file
        raise DataError(f"cannot use image {p}: {err}") from err
    shape = tuple(int(s) for s in img.shape)
    if spatial_dims is not None and len(shape) - 1 != spatial_dims:
        raise DataError(
            f"image {p} has {len(shape) - 1} spatial dimension(s) (channel-first shape {shape}); "
            f"this bundle expects {spatial_dims}D {'volumes' if spatial_dims == 3 else 'images'}"
        )
    if num_channels is not None and shape[0] != num_channels:
        raise DataError(f"image {p} has {shape[0]} channel(s) (shape {shape}); this bundle expects {num_channels}")
    if min(shape[1:]) < min_size:
        raise DataError(
            f"image {p} has spatial shape {shape[1:]} with an axis shorter than {min_size} voxels; "
            f"expected a {spatial_dims or len(shape) - 1}D image"
        )
    return shape


def _check_label(label: Any, num_classes: int | None, where: str) -> None:
    if num_classes is None:
        return
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < num_classes:
        raise DataError(f"{where}: label {label!r} is not a class index in 0..{num_classes - 1}")


def read_datalist_split(path: str | os.PathLike, key: str = "training", allow_empty: bool = False) -> list[Any]:
    """The raw entries of one split of a Decathlon-style datalist JSON, with errors that name the file.

    Args:
        path: the datalist JSON.
        key: the split (``training``, ``validation``, ``test``, ...).
        allow_empty: return ``[]`` for a missing or empty split instead of raising.

    Returns:
        The list as stored (entries not validated: see :func:`load_datalist` for that).

    Raises:
        DataError: missing file, invalid JSON, not an object, missing/empty split, split not a list.

    Example:
        >>> entries = read_datalist_split("data/sos/datalist.json", "test")
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"datalist not found: {path}")
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"datalist {path} is not valid JSON: {err}") from err
    if not isinstance(content, dict):
        raise DataError(f"datalist {path} must be a JSON object with a {key!r} list")
    items = content.get(key)
    if not items:
        if allow_empty:
            return []
        found = [k for k, v in content.items() if isinstance(v, list) and v]
        raise DataError(f"datalist {path} has no entries under {key!r} (non-empty lists: {found or 'none'})")
    if not isinstance(items, list):
        raise DataError(f"datalist {path}: {key!r} must be a list, got {type(items).__name__}")
    return items


def load_datalist(
    datalist: str | os.PathLike,
    key: str = "training",
    dataset_dir: str | os.PathLike | None = None,
    spatial_dims: int | None = 3,
    num_channels: int | None = 1,
    require_label: bool = True,
    num_classes: int | None = None,
    check: str | bool = "full",
    allow_empty: bool = False,
) -> list[dict]:
    """Entries ``datalist[key]`` of a MONAI (decathlon-style) datalist JSON with absolute paths, checked.

    Relative paths in :data:`PATH_KEYS` are resolved against the JSON's directory (as ``gamverify synth`` writes
    them). An image may be a file (NIfTI, single or multi-frame DICOM, ...) or a DICOM series directory.

    Args:
        datalist: the JSON file.
        key: list to read (``training``, ``validation``, ``test``).
        dataset_dir: the dataset directory the datalist belongs to; when given, it must exist (a clearer message
            than "datalist not found" when the whole cohort is missing).
        spatial_dims: expected spatial dimensionality of every image (``None``: not checked).
        num_channels: expected channels of every image (``None``: not checked).
        require_label: every entry must have a ``label``.
        num_classes: when given, labels must be integer class indices in ``0..num_classes-1``.
        check: ``"full"`` reads every image completely (corrupted files, shape, NaN), ``"exists"`` only checks that
            files exist (a DICOM series directory: that it holds a DICOM file), ``False``/``"none"`` checks nothing
            but the JSON itself.
        allow_empty: return ``[]`` instead of failing when the list is missing or empty.

    Returns:
        List of entry dicts (copies) with absolute paths.

    Raises:
        DataError: a missing directory, datalist or image, a bad entry or label (the message names the file).

    Example:
        >>> val = load_datalist("data/sos/datalist.json", "validation", dataset_dir="data/sos", num_classes=5)
    """
    check = "none" if check is False else "full" if check is True else str(check).lower()
    if check not in ("full", "exists", "none"):
        raise ValueError(f"check must be 'full', 'exists' or 'none', got {check!r}")
    if dataset_dir is not None and not Path(dataset_dir).is_dir():
        raise DataError(
            f"dataset directory not found: {dataset_dir} (create a cohort first, e.g. "
            f"`gamverify synth --kind sos --out {dataset_dir}`, or pass --dataset_dir)"
        )
    path = Path(datalist)
    items = read_datalist_split(path, key, allow_empty=allow_empty)
    if not items:
        return []
    base = path.parent
    out = []
    for i, item in enumerate(items):
        where = f"datalist {path}, {key}[{i}]"
        if isinstance(item, str):
            item = {"image": item}
        if not isinstance(item, dict) or "image" not in item:
            raise DataError(f"{where}: each entry needs an 'image' path, got {item!r}")
        entry = dict(item)
        for k in PATH_KEYS:
            if isinstance(entry.get(k), str):
                p = Path(entry[k]).expanduser()
                entry[k] = str(p if p.is_absolute() else (base / p).resolve())
        if require_label and "label" not in entry:
            raise DataError(f"{where} ({entry['image']}): no 'label'")
        if "label" in entry:
            _check_label(entry["label"], num_classes, f"{where} ({entry['image']})")
        if check != "none":
            for k in PATH_KEYS:
                problem = _input_problem(k, entry[k], where) if isinstance(entry.get(k), str) else None
                if problem:  # a DICOM series directory counts as a file here
                    raise DataError(problem)
        if check == "full":
            check_image(entry["image"], spatial_dims=spatial_dims, num_channels=num_channels)
        out.append(entry)
    return out


def _images_in(directory: Path) -> list[str]:
    """The images of a directory: its ``*.nii.gz``, ``*.nii``, ``*.nrrd``, ``*.mha``, ``*.mhd`` files and DICOM series
    (each subdirectory holding DICOM files is one series); a directory holding DICOM files itself, and no other
    image, is one series."""
    found = sorted(f for ext in ("nii.gz", "nii", "nrrd", "mha", "mhd") for f in glob.glob(str(directory / f"*.{ext}")))
    series = sorted(str(d) for d in directory.iterdir() if d.is_dir() and _holds_dicom(d))
    if not found and not series and _holds_dicom(directory):
        return [str(directory)]
    if not found and not series:
        kinds = "*.nii.gz, *.nii, *.nrrd, *.mha, *.mhd, or DICOM series subdirectories"
        raise DataError(f"no images ({kinds}) in directory {directory}")
    return sorted(found + series)


def list_images(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    spatial_dims: int | None = 3,
    num_channels: int | None = 1,
    check: str | bool = "full",
) -> list[dict]:
    """``[{"image": path}, ...]`` for inference from a directory, a glob pattern, one file or a list of files.

    Args:
        inputs: directory (its ``*.nii.gz``, ``*.nii``, ``*.nrrd``, ``*.mha``, ``*.mhd`` files and its subdirectories
            holding a DICOM series; a directory of DICOM files alone is one series), glob pattern, file, or a list of
            those.
        spatial_dims: expected spatial dimensionality (``None``: not checked).
        num_channels: expected channels (``None``: not checked).
        check: ``"full"`` (read every image), ``"exists"`` or ``"none"``.

    Returns:
        Sorted list of ``{"image": absolute path}``.

    Raises:
        DataError: no image found, or a missing / bad image (the message names it).

    Example:
        >>> list_images("data/sos/images")[:1]
        [{'image': '/abs/data/sos/images/sos_0000.nii.gz'}]
    """
    entries = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    files: list[str] = []
    for entry in entries:
        p = Path(entry).expanduser()
        if p.is_dir():
            files += _images_in(p)
        elif any(ch in str(entry) for ch in "*?["):
            found = sorted(glob.glob(str(p)))
            if not found:
                raise DataError(f"no file matches {entry}")
            files += found
        else:
            files.append(str(p))
    if not files:
        raise DataError("no input images given")
    check = "none" if check is False else "full" if check is True else str(check).lower()
    out = []
    for f in files:
        f = str(Path(f).resolve())
        if check != "none" and not Path(f).is_file():
            raise DataError(f"image file not found: {f}")
        if check == "full":
            check_image(f, spatial_dims=spatial_dims, num_channels=num_channels)
        out.append({"image": f})
    return out
