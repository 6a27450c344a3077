"""Unique output names for input images (one map / one row per image, whatever their file names)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path, PurePath

import torch.distributed as dist

__all__ = ["OutputNamer", "path_stem"]

#: image file extensions removed to get an output stem (longest first)
_EXTENSIONS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm")


def path_stem(path: str | os.PathLike) -> str:
    """File name without its image extension (``.nii.gz`` is one): ``/d/case_1/imaging.nii.gz`` -> ``imaging``."""
    name = PurePath(path).name
    for ext in _EXTENSIONS:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name.split(".")[0] if "." in name else name


class OutputNamer:
    """Unique output names (relative paths without extension) for input images, as MONAI's ``SaveImage``.

    - With ``data_root_dir``: the image's path relative to it without extension (``case_00000/imaging``), so the
      input folder structure is kept and names are unique across ranks by construction. An image outside the root
      raises ``ValueError``.
    - Without: the file stem (``imaging``) for the first image with that stem; a different image with the same stem
      gets ``<stem>_<8 hex digits of the SHA-1 of its full path>``. In a multi-process run (where a rank cannot see
      the others' names) every name gets that suffix, so two ranks never write the same file.

    Args:
        data_root_dir: root the output paths are relative to (``None``: stems).
        always_suffix: add the path hash to every name (default: in multi-process runs only).

    Example:
        >>> namer = OutputNamer()
        >>> namer("/d/case_0/imaging.nii.gz"), namer("/d/case_1/imaging.nii.gz")
        ('imaging', 'imaging_a23b531d')
    """

    def __init__(self, data_root_dir: str | os.PathLike | None = None, always_suffix: bool | None = None) -> None:
        self.data_root_dir = None if data_root_dir is None else Path(data_root_dir).resolve()
        self.always_suffix = always_suffix
        self._sources: dict[str, str] = {}  # name -> source path

    @staticmethod
    def suffix(path: str) -> str:
        """8 hex digits of the SHA-1 of ``path``."""
        return hashlib.sha1(path.encode("utf-8")).hexdigest()[:8]

    def __call__(self, path: str | os.PathLike) -> str:
        """The name of ``path`` (the same name every time for the same path)."""
        source = str(path)
        if self.data_root_dir is not None:
            full = Path(source).resolve()
            try:
                rel = full.relative_to(self.data_root_dir)
            except ValueError as err:
                raise ValueError(f"image {source} is not under data_root_dir {self.data_root_dir}") from err
            name = (rel.parent / path_stem(rel)).as_posix()
        else:
            always = (
                self.always_suffix
                if self.always_suffix is not None
                else dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
            )
            name = path_stem(source)
            if always or self._sources.get(name, source) != source:
                name = f"{name}_{self.suffix(source)}"
        previous = self._sources.setdefault(name, source)
        if previous != source:  # a hash collision or two roots mapping to one name
            raise ValueError(f"images {previous} and {source} would both be written as {name!r}")
        return name
