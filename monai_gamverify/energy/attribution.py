"""Attribution energy (AE): the sum of a volume's *raw* (unnormalised, ReLU'd) Grad-CAM values.

For a 2D model applied slice by slice AE is the sum over all slices. :func:`attribution_energy` sums given maps;
:func:`volume_energy` / :func:`volume_energy_multi` / :func:`cohort_energy` compute the maps and sum them; and
:func:`energy_from_maps` reads saved raw maps.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from monai_gamverify.io.nifti import load_image
from monai_gamverify.utils import plain_tensor

__all__ = [
    "attribution_energy",
    "volume_energy",
    "volume_energy_multi",
    "cohort_energy",
    "energy_from_maps",
]


def attribution_energy(raw_maps: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """Attribution energy: each map summed over every axis but the batch axis.

    Sums are accumulated in float64 (a volume has millions of voxels; float32 loses digits). On devices without
    float64 (Apple MPS) float32 is used.

    Args:
        raw_maps: raw (``normalize=False``) maps of shape (B, 1, *spatial) or any (B, ...); tensor or array.

    Returns:
        AE of shape (B,): a float64 tensor on the input's device for tensor input, a float64 array otherwise.

    Raises:
        ValueError: if the maps have no batch axis or contain NaN/inf.

    Example:
        >>> maps = cam(x, normalize=False)  # (B, 1, D, H, W)
        >>> attribution_energy(maps)  # (B,)
    """
    if isinstance(raw_maps, torch.Tensor):
        maps = plain_tensor(raw_maps)  # MetaTensor -> plain tensor
        if maps.ndim < 2:
            raise ValueError(f"attribution_energy expects maps of shape (B, ...), got shape {tuple(maps.shape)}")
        dtype = torch.float32 if maps.device.type == "mps" else torch.float64
        maps = maps.detach().to(dtype)
        if not torch.isfinite(maps).all():
            raise ValueError("attribution_energy: maps contain NaN or infinite values")
        return maps.reshape(maps.shape[0], -1).sum(dim=1)
    arr = np.asarray(raw_maps, dtype=np.float64)
    if arr.ndim < 2:
        raise ValueError(f"attribution_energy expects maps of shape (B, ...), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("attribution_energy: maps contain NaN or infinite values")
    return arr.reshape(arr.shape[0], -1).sum(axis=1)


def _prepare_volume(volume: Any, slice_axis: int | None, batch_size: int) -> tuple[torch.Tensor, int | None]:
    """(C, *spatial) tensor of one image and the slice axis as an index into its shape (``None``: whole image)."""
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    x = torch.as_tensor(volume)
    x = plain_tensor(x)  # MetaTensor -> plain tensor
    if x.ndim == 5:
        if x.shape[0] != 1:
            raise ValueError(f"expected one volume, got a batch of {x.shape[0]} (shape {tuple(x.shape)})")
        x = x[0]
    if not x.is_floating_point():
        x = x.float()
    if slice_axis is None:
        if x.ndim not in (3, 4):
            raise ValueError(f"expected one image (C, *spatial) with 2 or 3 spatial axes, got {tuple(x.shape)}")
        return x, None
    if x.ndim != 4:
        raise ValueError(f"slice-by-slice AE needs one 3D volume (C, D, H, W) or (1, C, D, H, W), got {tuple(x.shape)}")
    if isinstance(slice_axis, bool) or not isinstance(slice_axis, (int, np.integer)) or not -3 <= slice_axis <= 2:
        raise ValueError(f"slice_axis must be a spatial axis 0, 1, 2 (or -3..-1) or None, got {slice_axis!r}")
    return x, 1 + int(slice_axis) % 3


def _slice_batches(x: torch.Tensor, axis: int | None, batch_size: int, device: Any, progress: bool, desc: str) -> Any:
    """Yield (b, C, ...) batches: 2D slices along ``axis`` (a view; copies only ``batch_size`` at a time)."""
    if axis is None:
        yield x[None].to(device)
        return
    slices = x.movedim(axis, 0)  # (S, C, h, w) view
    n = slices.shape[0]
    for start in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, leave=False):
        yield slices[start : start + batch_size].contiguous().to(device)


def _call_cam(cam: Callable[..., Any], xb: torch.Tensor, class_idx: Any, kwargs: Mapping[str, Any]) -> torch.Tensor:
    maps = cam(xb, class_idx=class_idx, normalize=False, **kwargs)
    if isinstance(maps, Mapping):
        raise ValueError("volume_energy needs a CAM with a single target layer (got a dict of layers)")
    if not isinstance(maps, torch.Tensor) or maps.shape[0] != xb.shape[0]:
        raise ValueError(
            f"the CAM returned {type(maps).__name__} {getattr(maps, 'shape', '')} for a batch of {len(xb)}"
        )
    return maps


def volume_energy(
    cam: Callable[..., Any],
    volume: Any,
    *,
    slice_axis: int | None = 2,
    batch_size: int = 16,
    class_idx: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    **cam_kwargs: Any,
) -> float:
    """AE of one volume: raw CAM maps (``normalize=False``) summed over the volume.

    With ``slice_axis`` set, ``cam`` wraps a 2D model that is applied to every slice along that spatial axis,
    ``batch_size`` slices per call, and the maps are summed as they come (a volume's maps are never all held).
    With ``slice_axis=None``, ``cam`` wraps a model taking the whole image and AE = ``attribution_energy(cam(x))``.

    Args:
        cam: a CAM object following the package contract (e.g. ``GradCAM(model, target_layers="layer4")``).
        volume: one volume (C, D, H, W) or (1, C, D, H, W), tensor or array; with ``slice_axis=None`` also a 2D
            image (C, H, W). Integer images are cast to float32.
        slice_axis: spatial axis the slices are taken along (0 = first spatial axis; 2, the default, is axial for
            a RAS-oriented NIfTI loaded by MONAI), or ``None`` for a 3D model.
        batch_size: slices per CAM call.
        class_idx: output column to explain (regression) or class; ``None`` = argmax per slice.
        device: where each slice batch is sent (default: the volume's device), so a volume can stay on the CPU
            while the model runs on a GPU.
        progress: progress bar over slice batches.
        cam_kwargs: passed on to the CAM call (e.g. ``score_fn``).

    Returns:
        AE as a Python float.

    Example:
        >>> cam = GradCAM(net2d, target_layers="layer4")
        >>> volume_energy(cam, ct, slice_axis=2, class_idx=0)
    """
    x, axis = _prepare_volume(volume, slice_axis, batch_size)
    device = x.device if device is None else torch.device(device)
    total = None
    for xb in _slice_batches(x, axis, batch_size, device, progress, "AE slices"):
        ae = attribution_energy(_call_cam(cam, xb, class_idx, cam_kwargs)).sum()
        total = ae if total is None else total + ae  # stays on device: one sync at the end
    return float(total)


def volume_energy_multi(
    cam: Callable[..., Any],
    volume: Any,
    columns: Mapping[str, int] | Sequence[int],
    *,
    slice_axis: int | None = 2,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    progress: bool = True,
    **cam_kwargs: Any,
) -> dict[Any, float]:
    """AE of one volume for several outputs (e.g. the quality categories of a multi-output regressor), one pass.

    How several outputs' gradients come from one CAM call: each slice batch (b slices) is repeated once per column
    into a batch of ``K * b`` and explained with a per-sample ``class_idx`` (block k asks for column k). The CAM
    does one forward and one backward of the summed selected outputs; because samples of a batch do not interact
    in an eval-mode network (the package's CAMs run the network in ``eval()``), each sample's gradient is that of
    its own column, exactly as K separate calls would give. A call holds ``K * batch_size`` slices, so lower
    ``batch_size`` for many columns.

    Args:
        cam: a CAM object following the package contract.
        volume: one volume (C, D, H, W) or (1, C, D, H, W) (see :func:`volume_energy`).
        columns: category -> output column, or a sequence of columns (then the keys are the columns).
        slice_axis: spatial axis of the slices, or ``None`` for a 3D model (see :func:`volume_energy`).
        batch_size: slices per CAM call (before the K-fold repetition).
        device: where each batch is sent (default: the volume's device).
        progress: progress bar over slice batches.
        cam_kwargs: passed on to the CAM call.

    Returns:
        dict key -> AE (Python floats), in the order of ``columns``.

    Example:
        >>> volume_energy_multi(cam, ct, {"parotid": 0, "submandibular": 1, "larynx": 2, "mandible": 3, "overall": 4})
    """
    if isinstance(columns, Mapping):
        keys, cols = list(columns.keys()), list(columns.values())
    elif isinstance(columns, Sequence) and not isinstance(columns, str):
        keys, cols = list(columns), list(columns)
    else:
        raise TypeError(f"columns must be a mapping name -> column or a sequence of columns, got {type(columns)}")
    if not cols:
        raise ValueError("columns is empty")
    if any(isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 0 for c in cols):
        raise ValueError(f"output columns must be non-negative integers, got {cols}")
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate column keys: {keys}")
    x, axis = _prepare_volume(volume, slice_axis, batch_size)
    device = x.device if device is None else torch.device(device)
    k = len(cols)
    total = None
    for xb in _slice_batches(x, axis, batch_size, device, progress, "AE slices"):
        b = xb.shape[0]
        rep = xb.repeat(k, *([1] * (xb.ndim - 1)))  # block j (samples j*b .. j*b+b-1) explains column j
        idx = torch.as_tensor(cols, device=xb.device).repeat_interleave(b)
        ae = attribution_energy(_call_cam(cam, rep, idx, cam_kwargs)).reshape(k, b).sum(dim=1)
        total = ae if total is None else total + ae
    values = total.cpu().tolist()
    return dict(zip(keys, values))


def cohort_energy(
    cam: Callable[..., Any],
    volumes: Mapping[Any, Any] | Iterable[tuple[Any, Any]],
    columns: Mapping[str, int] | Sequence[int],
    *,
    slice_axis: int | None = 2,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    progress: bool = True,
    **cam_kwargs: Any,
) -> pd.DataFrame:
    """AE of every volume of a cohort and every column: the wide table :func:`energy_report` reads.

    Args:
        cam: a CAM object following the package contract.
        volumes: id -> volume, or (id, volume) pairs; a volume may be a tensor/array or an image path
            (read with :func:`monai_gamverify.io.files.load_image`). Volumes are loaded one at a time.
        columns: category -> output column (or a sequence of columns), see :func:`volume_energy_multi`.
        slice_axis, batch_size, device, cam_kwargs: as in :func:`volume_energy_multi`.
        progress: progress bar over volumes.

    Returns:
        DataFrame ``id, <category>...`` (one row per volume, input order).

    Example:
        >>> df = cohort_energy(cam, {"case01": "case01.nii.gz"}, {"parotid": 0, "overall": 4})
        >>> write_csv(df, "ae.csv")
    """
    items = list(volumes.items()) if isinstance(volumes, Mapping) else list(volumes)
    rows = []
    for vid, vol in tqdm(items, desc="AE volumes", disable=not progress):
        if isinstance(vol, (str, os.PathLike)):
            vol = load_image(vol)
        ae = volume_energy_multi(
            cam, vol, columns, slice_axis=slice_axis, batch_size=batch_size, device=device, progress=False, **cam_kwargs
        )
        rows.append({"id": vid, **ae})
    if not rows:
        raise ValueError("no volume given")
    return pd.DataFrame(rows)


def energy_from_maps(root: str | os.PathLike, pattern: str = "*.nii*") -> pd.DataFrame:
    """AE from raw maps saved as NIfTI: ``root/<category>/<id>.nii.gz`` (or ``root/<id>.nii.gz``: one category).

    A 2D model's slice maps are expected stacked into one volume per image; AE is the sum of all its values.

    Args:
        root: folder of maps.
        pattern: file glob inside each folder.

    Returns:
        Wide DataFrame ``id, <category>...`` (a single flat folder gives the column ``energy``).

    Example:
        >>> energy_from_maps("maps/")  # maps/parotid/case01.nii.gz ...
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"maps folder not found: {root}")
    groups = {d.name: d for d in sorted(root.iterdir()) if d.is_dir()} or {"energy": root}
    cols: dict[str, dict[str, float]] = {}
    for cat, folder in groups.items():
        files = sorted(folder.glob(pattern))
        for f in files:
            data = np.asanyarray(nib.load(str(f)).dataobj, dtype=np.float64)
            if not np.isfinite(data).all():
                raise ValueError(f"map {f} contains NaN or infinite values")
            vid = re.sub(r"(\.nii(\.gz)?|\.[^.]+)$", "", f.name)
            cols.setdefault(cat, {})[vid] = float(data.sum())
    if not cols:
        raise ValueError(f"no map files matching {pattern!r} under {root}")
    df = pd.DataFrame(cols)
    return df.rename_axis("id").reset_index()
