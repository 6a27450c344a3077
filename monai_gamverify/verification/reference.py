"""Reference mean map of a reference model's attention over a reference dataset (:class:`ReferenceMap`, streaming)
and the batch helpers that the feature tables and the one-class mode share.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from monai_gamverify.io import affine_of, save_nifti, write_json
from monai_gamverify.utils import plain_tensor
from monai_gamverify.visualize.plots import overlay_png

__all__ = [
    "MapFn",
    "ReferenceMap",
    "reference_map",
    "plain_tensor",
    "progress_bar",
    "batch_image",
    "batch_ids",
]

MapFn = Callable[[torch.Tensor], torch.Tensor]


def progress_bar(data: Iterable, progress: bool, desc: str) -> Iterable:
    """Wrap ``data`` in a tqdm bar (hidden unless ``progress``)."""
    total = len(data) if hasattr(data, "__len__") else None
    return tqdm(data, total=total, desc=desc, disable=not progress, leave=False)


def batch_image(batch: Any, image_key: str) -> torch.Tensor:
    """The batched image tensor (B, C, *spatial) of a batch dict, checked."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"data must yield dicts with an {image_key!r} entry (as a DataLoader does), got {type(batch)}")
    if image_key not in batch:
        raise ValueError(f"batch has no {image_key!r} entry; keys: {sorted(batch)}")
    x = batch[image_key]
    if not isinstance(x, torch.Tensor) or x.ndim not in (4, 5):
        shape = tuple(x.shape) if hasattr(x, "shape") else type(x).__name__
        raise ValueError(
            f"{image_key!r} must be a batched tensor (B, C, *spatial) with 2 or 3 spatial axes, got {shape}"
        )
    return x


def _sum_float64(maps: torch.Tensor) -> torch.Tensor:
    # float64 so that the mean over a large cohort does not drift; MPS has no float64, so sum there in float32
    if maps.device.type == "mps":
        return maps.float().sum(0, keepdim=True).cpu().double()
    return maps.sum(0, keepdim=True, dtype=torch.float64)


class ReferenceMap:
    """Streaming mean of a reference model's normalised maps: a float64 running sum and a count, never all maps.

    Args:
        check_range: refuse maps with values outside [0, 1] (normalised maps are expected).

    Attributes:
        count: number of maps accumulated.
        affine: 4x4 affine of the first image seen by :func:`reference_map` (or loaded), used when saving.
        background: first image (channel 0) seen by :func:`reference_map`, the PNG's background.

    Example:
        >>> ref = ReferenceMap()
        >>> for batch in loader:
        ...     ref.update(cam(batch["image"]))
        >>> ref.value.shape          # (1, 1, *spatial)
        >>> ref.save("report/")
    """

    def __init__(self, check_range: bool = True) -> None:
        self.check_range = check_range
        self.count = 0
        self.affine: np.ndarray | None = None
        self.background: torch.Tensor | None = None
        self._sum: torch.Tensor | None = None

    def update(self, maps: torch.Tensor) -> ReferenceMap:
        """Add a (B, 1, *spatial) batch of maps to the running sum; returns ``self``."""
        if not isinstance(maps, torch.Tensor):
            raise TypeError(f"maps must be a torch.Tensor, got {type(maps).__name__}")
        maps = plain_tensor(maps).detach()
        if maps.ndim not in (4, 5) or maps.shape[1] != 1 or maps.shape[0] == 0:
            raise ValueError(
                f"maps must have shape (B, 1, H, W) or (B, 1, D, H, W) with B > 0, got {tuple(maps.shape)}"
            )
        if not torch.isfinite(maps).all():
            raise ValueError("maps contain NaN or infinite values")
        if self.check_range and (maps.min() < 0 or maps.max() > 1):
            raise ValueError(
                f"maps must be normalised to [0, 1], got range [{float(maps.min()):.4g}, {float(maps.max()):.4g}]"
            )
        batch_sum = _sum_float64(maps)
        if self._sum is None:
            self._sum = batch_sum
        elif batch_sum.shape != self._sum.shape:
            raise ValueError(
                f"map spatial shape {tuple(maps.shape[2:])} differs from earlier maps {tuple(self._sum.shape[2:])}"
            )
        else:
            self._sum = self._sum + batch_sum.to(self._sum.device)
        self.count += int(maps.shape[0])
        return self

    @property
    def value(self) -> torch.Tensor:
        """The mean map, (1, 1, *spatial) float32."""
        if self._sum is None or self.count == 0:
            raise ValueError("the reference map is empty: no maps were accumulated")
        return (self._sum / self.count).float()

    def save(
        self, out_dir: str | os.PathLike, reference_image: Any = None, name: str = "reference_map"
    ) -> dict[str, Path]:
        """Write ``{name}.nii.gz`` (with the image affine), ``{name}.png`` (overlay) and ``{name}.json`` (count).

        Args:
            out_dir: output directory (created).
            reference_image: image (MetaTensor/array, (*spatial) or (1, *spatial)) for the affine and PNG background;
                default: the first image seen by :func:`reference_map`, else identity affine and the map itself.
            name: file stem.

        Returns:
            Dict ``{"nifti", "png", "json"}`` -> written paths.
        """
        out = Path(out_dir)
        value = self.value[0, 0]
        affine = affine_of(reference_image) if hasattr(reference_image, "affine") else self.affine
        background = reference_image if reference_image is not None else self.background
        if background is None:
            background = value
        bg_shape = tuple(np.shape(background))[-value.ndim :]
        if bg_shape != tuple(value.shape):
            # a map on a coarser common grid (verification_grid.CommonGrid): voxels scaled, the map its own background
            if affine is not None and len(bg_shape) == value.ndim:
                affine = np.array(affine, dtype=np.float64, copy=True)
                for i, (b, v) in enumerate(zip(bg_shape, value.shape)):
                    affine[:3, i] *= b / v
            background = value
        paths = {
            "nifti": save_nifti(value, out / f"{name}.nii.gz", reference=affine),
            "png": overlay_png(background, value, out / f"{name}.png", title=f"reference map (mean of {self.count})"),
            "json": write_json({"count": self.count, "shape": list(value.shape)}, out / f"{name}.json"),
        }
        return paths

    @classmethod
    def load(cls, path: str | os.PathLike) -> ReferenceMap:
        """Read a map written by :meth:`save` (the ``.nii.gz``, or its directory for the default name).

        The count comes from the ``.json`` sidecar when present (else 1), so updating can continue.
        """
        import json

        import nibabel as nib

        p = Path(path)
        if p.is_dir():
            p = p / "reference_map.nii.gz"
        if not p.is_file():
            raise FileNotFoundError(f"reference map not found: {p}")
        img = nib.load(str(p))
        data = torch.as_tensor(np.asarray(img.get_fdata(), dtype=np.float64))
        sidecar = p.with_name(p.name.removesuffix(".gz").removesuffix(".nii") + ".json")
        count, shape = 1, tuple(data.shape)
        if sidecar.is_file():
            meta = json.loads(sidecar.read_text())
            count, shape = int(meta["count"]), tuple(meta["shape"])
        ref = cls()
        ref._sum = data.reshape(1, 1, *shape) * count
        ref.count = count
        ref.affine = np.asarray(img.affine, dtype=np.float64)
        return ref


def reference_map(
    cam: MapFn,
    data: Iterable[Mapping[str, Any]],
    *,
    image_key: str = "image",
    progress: bool = True,
) -> ReferenceMap:
    """Mean normalised map of a reference model over a dataset, streamed batch by batch.

    Args:
        cam: callable ``x -> (B, 1, *spatial)`` maps in [0, 1], e.g. ``GradCAM(net, "layer4")`` or
            ``FeatureMap(net, "layer1")``; ``x`` is given as the data yields it.
        data: iterable of batch dicts (a ``DataLoader``) with ``image_key`` of shape (B, C, *spatial).
        image_key: key of the image in each batch.
        progress: show a progress bar.

    Returns:
        The filled :class:`ReferenceMap` (its affine/background taken from the first image).

    Example:
        >>> ref = reference_map(GradCAM(ref_net, "layer4"), loader)
    """
    ref = ReferenceMap()
    for batch in progress_bar(data, progress, "reference map"):
        x = batch_image(batch, image_key)
        if ref.background is None:
            ref.background = plain_tensor(x)[0, 0].detach().float().cpu()
            ref.affine = affine_of(x) if hasattr(x, "affine") else None
        ref.update(cam(x))
    if ref.count == 0:
        raise ValueError("data yielded no batches: cannot build a reference map")
    return ref


def batch_ids(batch: Mapping[str, Any], key: str, n: int, default: list[Any]) -> list[Any]:
    """The ``n`` ids of a batch entry (``default`` when the entry is absent)."""
    value = batch.get(key)
    if value is None:
        return default
    if isinstance(value, torch.Tensor):
        value = value.reshape(-1).tolist()
    elif isinstance(value, (str, int)):
        value = [value]
    value = list(value)
    if len(value) != n:
        raise ValueError(f"batch entry {key!r} has {len(value)} values for {n} images")
    return value
